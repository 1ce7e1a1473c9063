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

from ..errors import BadIndexError
from .files import write_atomic
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
               search={"type": "auto", "target_recall": 0.95, "max_memory": None},
               generation=int(manifest.get("generation", 0)) + 1,
               revision=int(manifest.get("revision", 0)) + 1, updated=current.now())
    try:
        db.execute("BEGIN")  # DDL too: sqlite3 would otherwise run it outside the transaction
        db.execute("ALTER TABLE images ADD COLUMN segment INTEGER NOT NULL DEFAULT 0")
        for statement in current._SEGMENT_SCHEMA.split(";"):
            if statement.strip():
                db.execute(statement)
        if info is not None:
            db.execute("INSERT INTO segments (number, file, count, bytes, sha256, created) VALUES (?, ?, ?, ?, ?, ?)",
                       (info.number, info.file, info.count, info.bytes, info.sha256, current.now()))
            db.execute("UPDATE images SET segment = 1")
        db.execute("UPDATE state SET value = ? WHERE key = 'manifest'", (json.dumps(new),))
        db.execute("INSERT INTO state (key, value) VALUES ('next_segment', '2')")
        db.commit()
    except BaseException as exc:
        db.rollback()
        if info is not None:
            (directory / info.file).unlink(missing_ok=True)
        if isinstance(exc, sqlite3.DatabaseError):
            raise BadIndexError(f"cannot convert index {directory} to format 2 ({exc}); it is unchanged") from None
        raise
    write_atomic(directory / current.MANIFEST_FILE, current._manifest_bytes(new))
    if manifest.get("vectors_file"):
        (directory / manifest["vectors_file"]).unlink(missing_ok=True)
    return True


def _read_v1_vectors(directory: Path, manifest: dict) -> tuple[np.ndarray, np.ndarray]:
    import faiss

    name = manifest.get("vectors_file")
    dim = int(manifest["dim"])
    if not name:
        return np.empty(0, np.int64), np.empty((0, dim), np.float32)
    try:
        data = (directory / name).read_bytes()
    except OSError:
        raise BadIndexError(f"index {directory} is damaged: its vectors file {name} is missing") from None
    if manifest.get("vectors_sha256") and hashlib.sha256(data).hexdigest() != manifest["vectors_sha256"]:
        raise BadIndexError(f"index {directory} is damaged: {name} does not match the checksum recorded "
                            "when it was written; it cannot be converted")
    try:
        index = faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8))
        ids = faiss.vector_to_array(index.id_map).astype(np.int64)
        vectors = index.index.reconstruct_n(0, index.ntotal) if index.ntotal else np.empty((0, dim), np.float32)
    except (RuntimeError, AttributeError):
        raise BadIndexError(f"index {directory} is damaged: cannot read {name}") from None
    return ids, np.ascontiguousarray(vectors, dtype=np.float32)
