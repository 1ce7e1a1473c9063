"""The on-disk index: FAISS vectors, SQLite metadata and a manifest.

An index is a directory::

    metadata.sqlite        rows of images, and the state (manifest, generation)
    vectors-000007.faiss   the vectors of generation 7: exact inner product
                           over L2-normalised vectors, keyed by stable ids
    manifest.json          a readable copy of the manifest
    write.lock             held by the one process that writes

The SQLite transaction is the single commit point.  A commit first writes the
next generation's vectors file beside the current one (temporary name, fsync,
rename), then records rows and the new generation in one transaction, and only
then removes the old vectors file.  A crash at any moment leaves either the old
or the new generation complete, with FAISS and the metadata in agreement.

This module is the one place that turns FAISS ids into metadata rows.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import BadIndexError, IndexLockedError

FORMAT_VERSION = 1
METADATA_FILE = "metadata.sqlite"
MANIFEST_FILE = "manifest.json"
LOCK_FILE = "write.lock"
METRIC = "inner_product"

_SCHEMA = """
CREATE TABLE images (
    id INTEGER PRIMARY KEY,
    path TEXT NOT NULL UNIQUE,
    sha256 TEXT NOT NULL,
    size INTEGER NOT NULL,
    mtime REAL NOT NULL,
    label TEXT,
    width INTEGER,
    height INTEGER
);
CREATE INDEX images_sha256 ON images (sha256);
CREATE TABLE state (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""
_COLUMNS = "id, path, sha256, size, mtime, label, width, height"


@dataclass(frozen=True)
class Entry:
    """One indexed image."""

    id: int | None
    path: str
    sha256: str
    size: int
    mtime: float
    label: str | None
    width: int
    height: int


@dataclass(frozen=True)
class Hit:
    entry: Entry
    score: float


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _vectors_name(generation: int) -> str:
    return f"vectors-{generation:06d}.faiss"


def _fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _new_faiss(dim: int):
    import faiss

    return faiss.IndexIDMap2(faiss.IndexFlatIP(dim))


class Store:
    """An open index directory.  Use :meth:`create` or :meth:`open`."""

    def __init__(self, directory: Path, connection: sqlite3.Connection, writable: bool):
        self.directory = directory
        self._db = connection
        self.writable = writable
        self._lock_handle = None
        self.created_here = False
        self._made_folder = False
        if writable:
            # The state must be read under the lock, or a writer could start
            # from a generation another writer is about to replace.
            self._acquire_lock()
        try:
            self._load_state()
            if writable:
                self._remove_leftovers()
        except BaseException:
            self.close()
            raise

    # -- opening ---------------------------------------------------------
    @staticmethod
    def exists(directory) -> bool:
        return (Path(directory) / METADATA_FILE).is_file()

    @classmethod
    def create(cls, directory, *, encoder: dict, dim: int) -> "Store":
        """A new, empty index.  The folder must not exist or be empty."""
        directory = Path(directory)
        if directory.exists():
            if not directory.is_dir():
                raise BadIndexError(f"{directory} exists and is not a folder")
            if any(directory.iterdir()):
                raise BadIndexError(
                    f"{directory} is not an imgsearch index and not empty; refusing to write there"
                )
        made_folder = not directory.exists()
        try:
            directory.mkdir(parents=True, exist_ok=True)
            tmp = directory / (METADATA_FILE + ".new")
            tmp.unlink(missing_ok=True)
        except OSError as exc:
            raise BadIndexError(f"cannot create index folder {directory}: {exc.strerror or exc}") from None
        db = sqlite3.connect(tmp)
        manifest = {
            "format_version": FORMAT_VERSION,
            "encoder": encoder,
            "dim": int(dim),
            "metric": METRIC,
            "normalized": True,
            "count": 0,
            "generation": 0,
            "vectors_file": None,
            "created": _now(),
            "updated": _now(),
        }
        with db:
            db.executescript(_SCHEMA)
            db.executemany(
                "INSERT INTO state (key, value) VALUES (?, ?)",
                [("manifest", json.dumps(manifest)), ("next_id", "1")],
            )
        db.close()
        # The metadata file appears whole or not at all, so a crash here never
        # leaves a folder that looks like an index but is not one.
        os.replace(tmp, directory / METADATA_FILE)
        _fsync_dir(directory)
        store = cls.open(directory, writable=True)
        store.created_here, store._made_folder = True, made_folder
        store._write_manifest_copy()
        return store

    @classmethod
    def open(cls, directory, *, writable: bool = False) -> "Store":
        directory = Path(directory)
        if not directory.exists():
            raise BadIndexError(f"no index at {directory} (create one with 'imgsearch index')")
        if not directory.is_dir():
            raise BadIndexError(f"{directory} is not a folder, so not an index")
        path = directory / METADATA_FILE
        if not path.is_file():
            raise BadIndexError(f"{directory} is not an imgsearch index (it has no {METADATA_FILE})")
        try:
            if writable:
                db = sqlite3.connect(path, timeout=30)
            else:
                db = sqlite3.connect(f"{path.absolute().as_uri()}?mode=ro", uri=True, timeout=30)
            db.execute("SELECT count(*) FROM images").fetchone()
        except sqlite3.DatabaseError as exc:
            raise BadIndexError(f"the metadata of index {directory} is damaged ({exc})") from None
        return cls(directory, db, writable)

    def close(self) -> None:
        self._db.close()
        if self._lock_handle is not None:
            self._lock_handle.close()
            self._lock_handle = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _acquire_lock(self) -> None:
        try:
            import fcntl
        except ImportError:  # no advisory locks on this platform; single writer is on the user
            return
        try:
            handle = open(self.directory / LOCK_FILE, "a+")
        except OSError as exc:
            raise BadIndexError(f"cannot write to index {self.directory}: {exc.strerror or exc}") from None
        try:
            # flock is dropped by the kernel when the holder dies, so a crashed
            # writer never leaves the index locked.
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            raise IndexLockedError(
                f"index {self.directory} is being written by another process; try again when it finishes"
            ) from None
        self._lock_handle = handle

    def _load_state(self, attempts: int = 3) -> None:
        for attempt in range(attempts):
            try:
                # One read transaction: the state and the row count belong to
                # the same commit.
                self._db.execute("BEGIN")
                try:
                    state = dict(self._db.execute("SELECT key, value FROM state"))
                    count = self._db.execute("SELECT count(*) FROM images").fetchone()[0]
                finally:
                    self._db.execute("COMMIT")
                self.manifest = json.loads(state["manifest"])
                self._next_id = int(state["next_id"])
            except (sqlite3.DatabaseError, KeyError, ValueError) as exc:
                raise BadIndexError(f"the metadata of index {self.directory} is damaged ({exc})") from None
            version = self.manifest.get("format_version")
            if version != FORMAT_VERSION:
                raise BadIndexError(
                    f"index {self.directory} has format version {version}; "
                    f"this imgsearch reads version {FORMAT_VERSION}"
                )
            try:
                self._faiss = self._read_vectors(count)
                return
            except FileNotFoundError:
                # A writer committed and removed the generation we were about
                # to read; the next read sees the new one.
                if attempt == attempts - 1:
                    raise BadIndexError(
                        f"index {self.directory} is damaged: its vectors file "
                        f"{self.manifest.get('vectors_file')} is missing"
                    ) from None

    def _remove_leftovers(self) -> None:
        """Files of commits that never finished (the lock is held)."""
        current = self.manifest.get("vectors_file")
        for path in self.directory.glob("vectors-*"):
            if path.name != current:
                path.unlink(missing_ok=True)
        for path in self.directory.glob("*.tmp"):
            path.unlink(missing_ok=True)

    def _read_vectors(self, count: int):
        import faiss

        name = self.manifest.get("vectors_file")
        if name is None:
            index = _new_faiss(self.dim)
        else:
            path = self.directory / name
            if not path.is_file():
                raise FileNotFoundError(path)
            try:
                index = faiss.read_index(str(path))
            except RuntimeError:
                raise BadIndexError(f"index {self.directory} is damaged: cannot read {name}") from None
        if index.ntotal != count or index.d != self.dim:
            raise BadIndexError(
                f"index {self.directory} is damaged: {index.ntotal} vectors of dimension {index.d} "
                f"but {count} metadata rows of dimension {self.dim}"
            )
        return index

    # -- reading ---------------------------------------------------------
    @property
    def dim(self) -> int:
        return int(self.manifest["dim"])

    @property
    def count(self) -> int:
        return int(self._faiss.ntotal)

    def _entries(self, where: str = "", params=()) -> list[Entry]:
        rows = self._db.execute(f"SELECT {_COLUMNS} FROM images {where}", params)
        return [Entry(*row) for row in rows]

    def entries(self) -> list[Entry]:
        return self._entries("ORDER BY id")

    def by_path(self) -> dict[str, Entry]:
        return {entry.path: entry for entry in self._entries()}

    def by_sha256(self) -> dict[str, Entry]:
        return {entry.sha256: entry for entry in self._entries()}

    def labels(self) -> dict[str, int]:
        rows = self._db.execute(
            "SELECT label, count(*) FROM images WHERE label IS NOT NULL GROUP BY label ORDER BY label"
        )
        return dict(rows)

    def vectors(self, ids) -> np.ndarray:
        """The stored vectors of ``ids`` (as they are in the index)."""
        return np.stack([self._faiss.reconstruct(int(i)) for i in ids]) if len(ids) else np.empty((0, self.dim), np.float32)

    def search(self, queries: np.ndarray, k: int) -> list[list[Hit]]:
        """The ``k`` nearest entries of each row of ``queries`` (normalised),
        best first.  Fewer when the index holds fewer than ``k``."""
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        k = min(int(k), self.count)
        if k <= 0 or len(queries) == 0:
            return [[] for _ in range(len(queries))]
        scores, ids = self._faiss.search(queries, k)
        wanted = sorted({int(i) for i in ids.ravel() if i >= 0})
        rows: dict[int, Entry] = {}
        for start in range(0, len(wanted), 500):  # SQLite caps bound parameters
            chunk = wanted[start : start + 500]
            marks = ",".join("?" * len(chunk))
            for entry in self._entries(f"WHERE id IN ({marks})", chunk):
                rows[entry.id] = entry
        results = []
        for row_scores, row_ids in zip(scores, ids):
            # FAISS pads with id -1 when it has fewer than k vectors.
            results.append(
                [Hit(rows[int(i)], float(s)) for s, i in zip(row_scores, row_ids) if i >= 0 and int(i) in rows]
            )
        return results

    # -- writing ---------------------------------------------------------
    def commit(self, entries: list[Entry], vectors: np.ndarray, remove: list[int] = ()) -> list[int]:
        """Add or replace entries with their (normalised) vectors and drop the
        ids in ``remove``, all in one atomic step.

        An entry whose ``id`` is set replaces that id's row and vector (its
        file changed); one without gets a new id.  Returns the entries' ids.
        """
        if not self.writable:
            raise RuntimeError("store opened read-only")
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if not len(entries):
            vectors = vectors.reshape(0, self.dim)
        if vectors.ndim != 2 or vectors.shape != (len(entries), self.dim):
            raise ValueError(f"expected vectors of shape {(len(entries), self.dim)}, not {vectors.shape}")
        if not entries and not len(remove):
            return []
        ids = []
        next_id = self._next_id
        for entry in entries:
            if entry.id is None:
                ids.append(next_id)
                next_id += 1
            else:
                ids.append(int(entry.id))
        dropped = np.asarray(
            [e.id for e in entries if e.id is not None] + [int(i) for i in remove], dtype=np.int64
        )

        import faiss

        updated = faiss.clone_index(self._faiss)
        if len(dropped):
            updated.remove_ids(dropped)
        if ids:
            updated.add_with_ids(vectors, np.asarray(ids, dtype=np.int64))

        generation = int(self.manifest["generation"]) + 1
        name = _vectors_name(generation)
        self._write_vectors(updated, name)
        manifest = dict(self.manifest, count=int(updated.ntotal), generation=generation,
                        vectors_file=name, updated=_now())
        try:
            with self._db:
                if len(remove):
                    self._db.executemany("DELETE FROM images WHERE id = ?", [(int(i),) for i in remove])
                self._db.executemany(
                    f"INSERT OR REPLACE INTO images ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    [
                        (i, e.path, e.sha256, e.size, e.mtime, e.label, e.width, e.height)
                        for i, e in zip(ids, entries)
                    ],
                )
                self._db.executemany(
                    "UPDATE state SET value = ? WHERE key = ?",
                    [(json.dumps(manifest), "manifest"), (str(next_id), "next_id")],
                )
                count = self._db.execute("SELECT count(*) FROM images").fetchone()[0]
                if count != updated.ntotal:
                    raise BadIndexError(
                        f"refusing to commit: {count} metadata rows but {updated.ntotal} vectors"
                    )
        except BaseException as exc:
            (self.directory / name).unlink(missing_ok=True)
            if isinstance(exc, sqlite3.OperationalError):
                raise BadIndexError(
                    f"cannot write index {self.directory} ({exc}); it is unchanged"
                ) from None
            raise
        old = self.manifest.get("vectors_file")
        self.manifest, self._faiss, self._next_id = manifest, updated, next_id
        # From here the commit stands; the rest only tidies up.
        with contextlib.suppress(OSError):
            self._write_manifest_copy()
            if old:
                (self.directory / old).unlink(missing_ok=True)
        return ids

    def relabel(self, labels: dict[int, str | None]) -> None:
        """Change the labels of existing entries (metadata only)."""
        if labels:
            with self._db:
                self._db.executemany("UPDATE images SET label = ? WHERE id = ?",
                                     [(label, int(i)) for i, label in labels.items()])

    def discard(self) -> None:
        """Remove an index this process created and never committed to."""
        if not (self.created_here and self.count == 0):
            raise RuntimeError("only a new, empty index can be discarded")
        self.close()
        for name in (METADATA_FILE, MANIFEST_FILE, LOCK_FILE):
            (self.directory / name).unlink(missing_ok=True)
        if self._made_folder:
            with contextlib.suppress(OSError):
                self.directory.rmdir()

    def _write_vectors(self, index, name: str) -> None:
        """Write a vectors file whole or not at all, with a clear error."""
        import faiss

        tmp = self.directory / (name + ".tmp")
        try:
            faiss.write_index(index, str(tmp))
            with open(tmp, "rb") as handle:
                os.fsync(handle.fileno())
            os.replace(tmp, self.directory / name)
            _fsync_dir(self.directory)
        except (RuntimeError, OSError) as exc:
            tmp.unlink(missing_ok=True)
            reason = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
            raise BadIndexError(
                f"cannot write index file {tmp.name} in {self.directory} ({reason}); the index is unchanged"
            ) from None

    def _write_manifest_copy(self) -> None:
        _write_atomic(
            self.directory / MANIFEST_FILE,
            (json.dumps(self.manifest, indent=2, sort_keys=True) + "\n").encode(),
        )
