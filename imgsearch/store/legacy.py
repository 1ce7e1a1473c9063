"""Converting an index of format 1 (one FAISS file, rewritten whole by every
commit) to format 2 (segments), in place and crash-safe.

The old vectors file is checked against its recorded checksum and written
out as segment 1; one SQLite transaction then adds the new tables and
switches the manifest.  A crash before that transaction leaves the format 1
index as it was (the next writer removes the half-made segment); after it,
only the old file is left to delete, which the next writer also does.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
from pathlib import Path

import numpy as np

from ..errors import BadIndexError, DamagedIndexError
from . import ann
from .files import deferred_signals, write_atomic
from .segments import write_segment


def convert_if_old(directory: Path, db: sqlite3.Connection) -> bool:
    """Convert the index if it is of format 1 (the writer lock is held)."""
    from . import store as current

    try:
        manifest = json.loads(db.execute("SELECT value FROM state WHERE key = 'manifest'").fetchone()[0])
    except (sqlite3.DatabaseError, TypeError, ValueError):
        return False  # reported as damage by the ordinary open
    if manifest.get("format_version") != 1:
        return False
    ids, vectors = _read_v1_vectors(directory, manifest)
    info = write_segment(directory, 1, ids, vectors) if len(ids) else None
    new = {key: value for key, value in manifest.items() if key not in ("vectors_file", "vectors_sha256")}
    new.update(format_version=current.FORMAT_VERSION, segments=int(info is not None), ann=None,
               search={"type": "auto", "target_recall": ann.DEFAULT_TARGET_RECALL, "max_memory": None},
               generation=int(manifest.get("generation", 0)) + 1,
               revision=int(manifest.get("revision", 0)) + 1,
               content_revision=int(manifest.get("revision", 0)) + 1, updated=current.now())
    # A signal is held until the commit and what follows agree: were Ctrl-C
    # raised just after the commit, the handler below would remove segment 1.
    with deferred_signals():
        try:
            _convert_rows(db, info, new)
        except BaseException as exc:
            db.rollback()
            if info is not None:
                (directory / info.file).unlink(missing_ok=True)
            if isinstance(exc, sqlite3.DatabaseError):
                raise BadIndexError(f"cannot convert index {directory} to format 2 ({exc}); "
                                    "it is unchanged") from None
            raise
    write_atomic(directory / current.MANIFEST_FILE, current._manifest_bytes(new))
    if manifest.get("vectors_file"):
        (directory / manifest["vectors_file"]).unlink(missing_ok=True)
    return True


def _convert_rows(db: sqlite3.Connection, info, manifest: dict) -> None:
    """One transaction: the images table rebuilt in the format 2 layout (a
    segment column; no index on the content hash, see store.py), the new
    tables, the segment and the manifest."""
    from . import store as current

    db.execute("BEGIN")  # DDL too: sqlite3 would otherwise run it outside the transaction
    columns = "id, path, sha256, size, mtime, label, width, height"
    statements = [part for part in (current._SCHEMA + current._SEGMENT_SCHEMA).split(";") if part.strip()]
    images = next(st for st in statements if "CREATE TABLE images (" in st)
    db.execute(images.replace("CREATE TABLE images (", "CREATE TABLE images_new ("))
    db.execute(f"INSERT INTO images_new ({columns}, segment) SELECT {columns}, ? FROM images",
               (info.number if info is not None else 0,))
    # Dropped, then the new one renamed: the aliases' reference to `images`
    # keeps naming the right table.
    db.execute("DROP TABLE images")
    db.execute("ALTER TABLE images_new RENAME TO images")
    for statement in statements:
        if any(f"CREATE {kind}" in statement for kind in ("TABLE segments", "TABLE tombstones", "INDEX images_segment")):
            db.execute(statement)
    if info is not None:
        db.execute("INSERT INTO segments (number, file, count, bytes, sha256, created) VALUES (?, ?, ?, ?, ?, ?)",
                   (info.number, info.file, info.count, info.bytes, info.sha256, current.now()))
    db.execute("UPDATE state SET value = ? WHERE key = 'manifest'", (json.dumps(manifest),))
    db.execute("INSERT INTO state (key, value) VALUES ('next_segment', '2')")
    db.commit()


def _read_v1_vectors(directory: Path, manifest: dict) -> tuple[np.ndarray, np.ndarray]:
    import faiss

    name = manifest.get("vectors_file")
    dim = int(manifest["dim"])
    if not name:
        return np.empty(0, np.int64), np.empty((0, dim), np.float32)
    try:
        data = (directory / name).read_bytes()
    except OSError:
        raise DamagedIndexError(f"index {directory} is damaged: its vectors file {name} is missing") from None
    if manifest.get("vectors_sha256") and hashlib.sha256(data).hexdigest() != manifest["vectors_sha256"]:
        raise DamagedIndexError(f"index {directory} is damaged: {name} does not match the checksum recorded "
                                "when it was written; it cannot be converted")
    try:
        index = faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8))
        ids = faiss.vector_to_array(index.id_map).astype(np.int64)
        vectors = index.index.reconstruct_n(0, index.ntotal) if index.ntotal else np.empty((0, dim), np.float32)
    except (RuntimeError, AttributeError):
        raise DamagedIndexError(f"index {directory} is damaged: cannot read {name}") from None
    return ids, np.ascontiguousarray(vectors, dtype=np.float32)
