"""The on-disk index: FAISS vectors, SQLite metadata and a manifest.

An index is a directory::

    metadata.sqlite        rows of images, other paths of the same content
                           (aliases), and the state (manifest, generation)
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
import hashlib
import json
import os
import signal
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import BadIndexError, IndexLockedError, first_line
from .hashing import sha256_file

FORMAT_VERSION = 1
METADATA_FILE = "metadata.sqlite"
MANIFEST_FILE = "manifest.json"
LOCK_FILE = "write.lock"
METRIC = "inner_product"

# One row per distinct content (one vector each); further paths holding the
# same bytes are aliases of that row, so a picture is never found twice.
_SCHEMA = """
CREATE TABLE images (
    id INTEGER PRIMARY KEY,
    path TEXT NOT NULL UNIQUE,
    sha256 TEXT NOT NULL UNIQUE,
    size INTEGER NOT NULL,
    mtime REAL NOT NULL,
    label TEXT,
    width INTEGER,
    height INTEGER
);
CREATE TABLE aliases (
    path TEXT PRIMARY KEY,
    image_id INTEGER NOT NULL REFERENCES images (id),
    size INTEGER NOT NULL,
    mtime REAL NOT NULL,
    label TEXT
);
CREATE INDEX aliases_image ON aliases (image_id);
CREATE TABLE state (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""
_COLUMNS = "id, path, sha256, size, mtime, label, width, height"
# What a creation killed before its metadata file appeared can leave behind.
_CREATION_LEFTOVERS = frozenset({
    MANIFEST_FILE, MANIFEST_FILE + ".tmp", METADATA_FILE + ".new", METADATA_FILE + ".new-journal", LOCK_FILE,
})


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
class Alias:
    """Another path whose file has the same content as image ``image_id``."""

    path: str
    image_id: int
    size: int
    mtime: float
    label: str | None


@dataclass(frozen=True)
class Hit:
    entry: Entry
    score: float
    also_at: tuple[str, ...] = ()


@dataclass
class Changes:
    """The work of one commit.

    ``added`` are new images, with ids the caller took from
    :attr:`Store.next_id` upwards; ``replaced`` are existing ids with new
    content.  Both come with one vector each, in that order, in ``vectors``.
    ``updated`` entries change metadata only (a moved file, a label, a
    refreshed mtime).  ``removed`` ids lose their vector, row and aliases.
    """

    added: list[Entry] = field(default_factory=list)
    replaced: list[Entry] = field(default_factory=list)
    vectors: list[np.ndarray] = field(default_factory=list)
    updated: list[Entry] = field(default_factory=list)
    removed: list[int] = field(default_factory=list)
    aliases: list[Alias] = field(default_factory=list)
    unaliased: list[str] = field(default_factory=list)

    @property
    def embedded(self) -> list[Entry]:
        return self.added + self.replaced

    def __len__(self) -> int:
        return (len(self.added) + len(self.replaced) + len(self.updated) + len(self.removed)
                + len(self.aliases) + len(self.unaliased))


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


@contextlib.contextmanager
def deferred_signals():
    """Hold SIGINT and SIGTERM until the block is done, then deliver them.

    A commit interrupted between SQLite's commit and the bookkeeping after it
    would believe it failed and remove the vectors file it had just made
    current; the signal is only postponed by the milliseconds a commit takes.
    """
    if threading.current_thread() is not threading.main_thread():
        yield  # only the main thread receives signals
        return
    received: list[int] = []
    watched = (signal.SIGINT, signal.SIGTERM)
    previous = {sig: signal.signal(sig, lambda signum, frame: received.append(signum)) for sig in watched}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if received:
            signal.raise_signal(received[0])


def _lock(directory: Path):
    """Take the folder's writer lock, or raise IndexLockedError."""
    try:
        import fcntl
    except ImportError:  # no advisory locks on this platform; single writer is on the user
        return None
    try:
        handle = open(directory / LOCK_FILE, "a+")
    except OSError as exc:
        raise BadIndexError(f"cannot write to index {directory}: {exc.strerror or exc}") from None
    try:
        # flock is dropped by the kernel when the holder dies, so a crashed
        # writer never leaves the index locked.
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise IndexLockedError(
            f"index {directory} is being written by another process; try again when it finishes"
        ) from None
    return handle


def _is_leftover(path: Path) -> bool:
    """A file an unfinished creation of ours may leave (or our lock file)."""
    if path.name not in _CREATION_LEFTOVERS:
        return False
    if path.name.startswith(MANIFEST_FILE):  # ours only if it reads as our manifest
        try:
            return "format_version" in json.loads(path.read_text())
        except (OSError, ValueError, TypeError):
            return False
    return True


def _manifest_bytes(manifest: dict) -> bytes:
    return (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode()


def _new_faiss(dim: int):
    import faiss

    return faiss.IndexIDMap2(faiss.IndexFlatIP(dim))


class Store:
    """An open index directory.  Use :meth:`create` or :meth:`open`."""

    def __init__(self, directory: Path, connection: sqlite3.Connection, writable: bool,
                 check_manifest: bool = True, lock_held: bool = False):
        self.directory = directory
        self._db = connection
        self.writable = writable
        self._lock_handle = None
        self.created_here = False
        self._made_folder = False
        if writable and not lock_held:
            # The state must be read under the lock, or a writer could start
            # from a generation another writer is about to replace.
            self._acquire_lock()
        try:
            self._load_state()
            if check_manifest:
                self._check_manifest_copy()
            if writable:
                self._remove_leftovers()
        except BaseException:
            self.close()
            raise

    # -- opening ---------------------------------------------------------
    @staticmethod
    def exists(directory) -> bool:
        return (Path(directory) / METADATA_FILE).is_file()

    @staticmethod
    def check_creatable(directory) -> None:
        """Raise unless a new index may be made at ``directory`` (it does not
        exist, or is an empty folder)."""
        directory = Path(directory)
        if directory.exists():
            if not directory.is_dir():
                raise BadIndexError(f"{directory} exists and is not a folder")
            if not all(_is_leftover(p) for p in directory.iterdir()):
                if (directory / LOCK_FILE).exists():
                    handle = _lock(directory)  # raises while another process creates it
                    if handle is not None:
                        handle.close()
                raise BadIndexError(
                    f"{directory} is not an imgsearch index and not empty; refusing to write there"
                )

    @classmethod
    def create(cls, directory, *, encoder: dict, dim: int) -> "Store":
        """A new, empty index.  The folder must not exist or be empty."""
        directory = Path(directory)
        cls.check_creatable(directory)
        made_folder = not directory.exists()
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise BadIndexError(f"cannot create index folder {directory}: {exc.strerror or exc}") from None
        # Created under the lock, so two processes creating one index cannot
        # interleave; the second then finds a complete index, or waits its turn.
        lock = _lock(directory)
        try:
            if (directory / METADATA_FILE).exists():
                raise IndexLockedError(f"index {directory} was just created by another process; run again")
            cls.check_creatable(directory)
            store = cls._create_locked(directory, encoder, dim)
        except BaseException:
            if lock is not None:
                lock.close()
            raise
        store._lock_handle = lock
        store.created_here, store._made_folder = True, made_folder
        return store

    @classmethod
    def _create_locked(cls, directory: Path, encoder: dict, dim: int) -> "Store":
        for leftover in _CREATION_LEFTOVERS - {LOCK_FILE}:  # of an earlier creation that was killed
            (directory / leftover).unlink(missing_ok=True)
        tmp = directory / (METADATA_FILE + ".new")
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
        _write_atomic(directory / MANIFEST_FILE, _manifest_bytes(manifest))
        # The metadata file appears whole or not at all, so a crash here never
        # leaves a folder that looks like an index but is not one.
        os.replace(tmp, directory / METADATA_FILE)
        _fsync_dir(directory)
        db = sqlite3.connect(directory / METADATA_FILE, timeout=30)
        return cls(directory, db, writable=True, lock_held=True)

    @classmethod
    def open(cls, directory, *, writable: bool = False, check_manifest: bool = True) -> "Store":
        directory = Path(directory)
        if not directory.exists():
            raise BadIndexError(f"no index at {directory} (create one with 'imgsearch index')")
        if not directory.is_dir():
            raise BadIndexError(f"{directory} is not a folder, so not an index")
        path = directory / METADATA_FILE
        if not path.is_file():
            raise BadIndexError(f"{directory} is not an imgsearch index (it has no {METADATA_FILE})")
        try:
            # Readers too use an ordinary connection (and only read): a writer
            # killed inside a SQLite commit leaves a journal that the next
            # connection must roll back, which a read-only one cannot do.
            db = sqlite3.connect(path, timeout=30)
            db.execute("SELECT count(*) FROM images").fetchone()
        except sqlite3.DatabaseError as exc:
            raise BadIndexError(f"the metadata of index {directory} is damaged ({exc})") from None
        return cls(directory, db, writable, check_manifest)

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
        if self._lock_handle is None:
            self._lock_handle = _lock(self.directory)

    def _load_state(self, attempts: int = 10) -> None:
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
                time.sleep(0.01 * attempt)
                if attempt == attempts - 1:
                    raise BadIndexError(
                        f"index {self.directory} is damaged: its vectors file "
                        f"{self.manifest.get('vectors_file')} is missing"
                    ) from None

    def _read_manifest_copy(self) -> dict:
        try:
            copy = json.loads((self.directory / MANIFEST_FILE).read_text())
            int(copy["generation"])
            return copy
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise BadIndexError(
                f"{MANIFEST_FILE} of index {self.directory} is missing or damaged ({first_line(exc)}); "
                f"'imgsearch verify --index {self.directory} --repair' rewrites it from the metadata"
            ) from None

    def _check_manifest_copy(self, attempts: int = 5) -> None:
        for attempt in range(attempts):
            copy = self._read_manifest_copy()
            ours = int(self.manifest["generation"])
            if copy.get("created") != self.manifest.get("created"):
                break
            if int(copy["generation"]) <= ours:
                if int(copy["generation"]) < ours and self.writable:
                    # A crash between a commit and rewriting the copy: ours to finish.
                    self._write_manifest_copy()
                return
            # A writer committed after we read the metadata: read it again.
            time.sleep(0.01 * attempt)
            self._load_state()
        raise BadIndexError(
            f"{MANIFEST_FILE} of index {self.directory} does not belong to its metadata; "
            f"'imgsearch verify --index {self.directory}' shows the details"
        )

    def repair_manifest_copy(self) -> None:
        """Rewrite manifest.json from the metadata (the lock is held)."""
        if not self.writable:
            raise RuntimeError("store opened read-only")
        try:
            self._write_manifest_copy()
        except OSError as exc:
            (self.directory / (MANIFEST_FILE + ".tmp")).unlink(missing_ok=True)
            raise BadIndexError(f"cannot rewrite {MANIFEST_FILE} in {self.directory}: {exc.strerror or exc}") from None

    def verify(self, *, check_files: bool = True) -> tuple[list[str], list[str]]:
        """Problems (the index is damaged) and notes (worth knowing) found by
        checking the metadata, the vectors and the manifest against each other."""
        import faiss

        problems, notes = [], []
        manifest = self.manifest
        db_check = self._db.execute("PRAGMA integrity_check").fetchone()[0]
        if db_check != "ok":
            problems.append(f"SQLite integrity check: {db_check}")
        rows = self._entries()
        ids = {e.id for e in rows}
        if len(rows) != self._faiss.ntotal or manifest.get("count") != len(rows):
            problems.append(f"counts differ: {len(rows)} metadata rows, {self._faiss.ntotal} vectors, "
                            f"manifest count {manifest.get('count')}")
        if self._faiss.d != self.dim:
            problems.append(f"vectors have dimension {self._faiss.d}, manifest says {self.dim}")
        if self._faiss.ntotal:
            vector_ids = set(faiss.vector_to_array(self._faiss.id_map).tolist())
            if vector_ids != ids:
                problems.append(f"ids differ: {len(vector_ids - ids)} vectors without a row, "
                                f"{len(ids - vector_ids)} rows without a vector")
            norms = np.linalg.norm(self.vectors(sorted(ids & vector_ids)), axis=1)
            bad = int(np.sum((np.abs(norms - 1) > 1e-3) & (norms > 0)))
            if bad:
                problems.append(f"{bad} vectors are not unit length")
        if ids and max(ids) >= self._next_id:
            problems.append(f"next id {self._next_id} is not above the largest id {max(ids)}")
        name = manifest.get("vectors_file")
        if name and manifest.get("vectors_sha256"):
            if sha256_file(self.directory / name) != manifest["vectors_sha256"]:
                problems.append(f"{name} does not match the checksum recorded when it was written")
        aliases = self.aliases()
        orphans = [a.path for a in aliases if a.image_id not in ids]
        if orphans:
            problems.append(f"{len(orphans)} duplicate paths point to no image (first: {orphans[0]})")
        try:
            copy = self._read_manifest_copy()
            if copy.get("revision", 0) < manifest.get("revision", 0) and copy.get("created") == manifest.get("created"):
                notes.append(f"{MANIFEST_FILE} is behind the metadata (a write was interrupted); "
                             "the next write refreshes it")
            elif {k: copy.get(k) for k in manifest} != manifest:
                problems.append(f"{MANIFEST_FILE} differs from the manifest in the metadata")
        except BadIndexError as exc:
            problems.append(str(exc))
        strays = [p.name for p in self.directory.glob("vectors-*") if p.name != name]
        strays += [p.name for p in self.directory.glob("*.tmp")]
        if strays:
            notes.append(f"files left by an unfinished commit (removed by the next write): {', '.join(sorted(strays))}")
        if check_files:
            gone = [e.path for e in rows if not os.path.exists(e.path)] + \
                   [a.path for a in aliases if not os.path.exists(a.path)]
            if gone:
                notes.append(f"{len(gone)} indexed files no longer exist (first: {gone[0]}); "
                             "'imgsearch index ... --prune' forgets them")
        return problems, notes

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
            data = path.read_bytes()
            # Checked on every open, so damage is reported before anything
            # uses it, and never sealed in by a later commit's new checksum.
            expected = self.manifest.get("vectors_sha256")
            if expected and hashlib.sha256(data).hexdigest() != expected:
                raise BadIndexError(
                    f"index {self.directory} is damaged: {name} does not match the checksum recorded "
                    "when it was written"
                )
            try:
                index = faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8))
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

    def aliases(self) -> list[Alias]:
        rows = self._db.execute("SELECT path, image_id, size, mtime, label FROM aliases ORDER BY path")
        return [Alias(*row) for row in rows]

    def labels(self) -> dict[str, int]:
        rows = self._db.execute(
            "SELECT label, count(*) FROM images WHERE label IS NOT NULL GROUP BY label ORDER BY label"
        )
        return dict(rows)

    def all_vectors(self) -> tuple[np.ndarray, np.ndarray]:
        """Every stored vector and its id, in storage order."""
        import faiss

        if not self._faiss.ntotal:
            return np.empty(0, np.int64), np.empty((0, self.dim), np.float32)
        ids = faiss.vector_to_array(self._faiss.id_map).astype(np.int64)
        return ids, self._faiss.index.reconstruct_n(0, self._faiss.ntotal)

    def vectors(self, ids) -> np.ndarray:
        """The stored vectors of ``ids`` (as they are in the index)."""
        return np.stack([self._faiss.reconstruct(int(i)) for i in ids]) if len(ids) else np.empty((0, self.dim), np.float32)

    def search(self, queries: np.ndarray, k: int) -> list[list[Hit]]:
        """The ``k`` nearest entries of each row of ``queries`` (normalised),
        best first.  Fewer when the index holds fewer than ``k``.

        Vectors and rows always come from one committed state: if a writer
        committed new vectors since this store was opened, they are reloaded.
        """
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if not self.writable:
            self._db.execute("BEGIN")  # the rows read below belong to one commit
        try:
            if not self.writable:
                current = json.loads(self._db.execute(
                    "SELECT value FROM state WHERE key = 'manifest'").fetchone()[0])
                if current.get("generation") != self.manifest.get("generation"):
                    self._db.execute("COMMIT")
                    self._load_state()
                    self._db.execute("BEGIN")
            return self._search_rows(queries, k)
        finally:
            if not self.writable:
                self._db.execute("COMMIT")

    def nearest(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Raw FAISS answer: scores and ids ``(n, min(k, count))`` of the
        vectors loaded when this store was opened (ids never -1)."""
        k = min(int(k), self.count)
        return self._faiss.search(np.ascontiguousarray(queries, dtype=np.float32), k)

    def _search_rows(self, queries: np.ndarray, k: int) -> list[list[Hit]]:
        if min(int(k), self.count) <= 0 or len(queries) == 0:
            return [[] for _ in range(len(queries))]
        scores, ids = self.nearest(queries, k)
        wanted = sorted({int(i) for i in ids.ravel() if i >= 0})
        rows: dict[int, Entry] = {}
        for start in range(0, len(wanted), 500):  # SQLite caps bound parameters
            chunk = wanted[start : start + 500]
            marks = ",".join("?" * len(chunk))
            for entry in self._entries(f"WHERE id IN ({marks})", chunk):
                rows[entry.id] = entry
        also: dict[int, list[str]] = {}
        for start in range(0, len(wanted), 500):
            chunk = wanted[start : start + 500]
            marks = ",".join("?" * len(chunk))
            for path, image_id in self._db.execute(
                f"SELECT path, image_id FROM aliases WHERE image_id IN ({marks}) ORDER BY path", chunk
            ):
                also.setdefault(image_id, []).append(path)
        results = []
        for row_scores, row_ids in zip(scores, ids):
            # FAISS pads with id -1 when it has fewer than k vectors.
            results.append([
                Hit(rows[int(i)], float(s), tuple(also.get(int(i), ())))
                for s, i in zip(row_scores, row_ids) if i >= 0 and int(i) in rows
            ])
        return results

    # -- writing ---------------------------------------------------------
    @property
    def next_id(self) -> int:
        """The first id never used in this index (ids are never reused)."""
        return self._next_id

    def commit(self, changes: Changes) -> None:
        """Apply ``changes`` atomically.

        Only a commit that adds or removes vectors writes a new vectors file;
        metadata-only changes are one SQLite transaction.
        """
        with deferred_signals():
            self._commit(changes)

    def _commit(self, changes: Changes) -> None:
        if not self.writable:
            raise RuntimeError("store opened read-only")
        entries = changes.embedded
        vectors = np.ascontiguousarray(changes.vectors if entries else np.empty((0, self.dim)), dtype=np.float32)
        if vectors.ndim != 2 or vectors.shape != (len(entries), self.dim):
            raise ValueError(f"expected vectors of shape {(len(entries), self.dim)}, not {vectors.shape}")
        if not len(changes):
            return
        ids = [int(e.id) for e in entries]
        new_ids = [int(e.id) for e in changes.added]
        if len(set(new_ids)) != len(new_ids) or any(i < self._next_id for i in new_ids):
            raise ValueError("new entries need unused ids from Store.next_id upwards")
        next_id = max(new_ids, default=self._next_id - 1) + 1

        updated_index, name = self._faiss, self.manifest.get("vectors_file")
        generation = int(self.manifest["generation"])
        if entries or changes.removed:
            import faiss

            dropped = [int(e.id) for e in changes.replaced] + [int(i) for i in changes.removed]
            updated_index = faiss.clone_index(self._faiss)
            if dropped:
                updated_index.remove_ids(np.asarray(dropped, dtype=np.int64))
            if ids:
                updated_index.add_with_ids(vectors, np.asarray(ids, dtype=np.int64))
            generation += 1
            name = _vectors_name(generation)
            checksum = self._write_vectors(updated_index, name)
        else:
            checksum = self.manifest.get("vectors_sha256")
        # The revision counts every commit, metadata-only ones too (a label
        # change keeps the generation): it names an index state exactly.
        manifest = dict(self.manifest, count=int(updated_index.ntotal), generation=generation,
                        revision=int(self.manifest.get("revision", 0)) + 1,
                        vectors_file=name, vectors_sha256=checksum, updated=_now())
        new_file = name != self.manifest.get("vectors_file")
        try:
            with self._db:
                self._apply_rows(changes)
                self._db.executemany(
                    "UPDATE state SET value = ? WHERE key = ?",
                    [(json.dumps(manifest), "manifest"), (str(next_id), "next_id")],
                )
                count = self._db.execute("SELECT count(*) FROM images").fetchone()[0]
                if count != updated_index.ntotal:
                    raise BadIndexError(
                        f"refusing to commit: {count} metadata rows but {updated_index.ntotal} vectors"
                    )
        except BaseException as exc:
            if new_file:
                (self.directory / name).unlink(missing_ok=True)
            if isinstance(exc, sqlite3.IntegrityError):
                raise BadIndexError(f"refusing to commit inconsistent metadata ({exc}); the index is unchanged") from None
            if isinstance(exc, sqlite3.OperationalError):
                raise BadIndexError(f"cannot write index {self.directory} ({exc}); it is unchanged") from None
            raise
        old = self.manifest.get("vectors_file")
        self.manifest, self._faiss, self._next_id = manifest, updated_index, next_id
        # From here the commit stands; the rest only tidies up.
        with contextlib.suppress(OSError):
            self._write_manifest_copy()
        if old and new_file:
            with contextlib.suppress(OSError):
                (self.directory / old).unlink(missing_ok=True)

    def _apply_rows(self, changes: Changes) -> None:
        db = self._db
        for image_id in changes.removed:
            db.execute("DELETE FROM aliases WHERE image_id = ?", (int(image_id),))
            db.execute("DELETE FROM images WHERE id = ?", (int(image_id),))
        db.executemany("DELETE FROM aliases WHERE path = ?", [(p,) for p in changes.unaliased])
        # Updates first: a promoted copy moves its image off a path that a
        # new image of this same commit takes.
        rewritten = changes.replaced + changes.updated
        db.executemany(
            "UPDATE images SET path = ?, sha256 = ?, size = ?, mtime = ?, label = ?, width = ?, height = ? "
            "WHERE id = ?",
            [(e.path, e.sha256, e.size, e.mtime, e.label, e.width, e.height, int(e.id)) for e in rewritten],
        )
        db.executemany(
            f"INSERT INTO images ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            [(e.id, e.path, e.sha256, e.size, e.mtime, e.label, e.width, e.height) for e in changes.added],
        )
        db.executemany(
            "INSERT OR REPLACE INTO aliases (path, image_id, size, mtime, label) VALUES (?, ?, ?, ?, ?)",
            [(a.path, int(a.image_id), a.size, a.mtime, a.label) for a in changes.aliases],
        )
        clash = db.execute("SELECT a.path FROM aliases a JOIN images i ON a.path = i.path LIMIT 1").fetchone()
        orphan = db.execute(
            "SELECT a.path FROM aliases a LEFT JOIN images i ON a.image_id = i.id WHERE i.id IS NULL LIMIT 1"
        ).fetchone()
        if clash or orphan:
            raise sqlite3.IntegrityError(f"alias {(clash or orphan)[0]} is inconsistent")

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

    def _write_vectors(self, index, name: str) -> str:
        """Write a vectors file whole or not at all, with a clear error;
        returns its SHA-256 (which `verify` checks)."""
        import faiss

        tmp = self.directory / (name + ".tmp")
        try:
            faiss.write_index(index, str(tmp))
            with open(tmp, "rb") as handle:
                os.fsync(handle.fileno())
            checksum = sha256_file(tmp)
            os.replace(tmp, self.directory / name)
            _fsync_dir(self.directory)
        except (RuntimeError, OSError) as exc:
            tmp.unlink(missing_ok=True)
            reason = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
            raise BadIndexError(
                f"cannot write index file {tmp.name} in {self.directory} ({reason}); the index is unchanged"
            ) from None
        return checksum

    def _write_manifest_copy(self) -> None:
        _write_atomic(self.directory / MANIFEST_FILE, _manifest_bytes(self.manifest))
