"""The store: SQLite metadata, immutable vector segments, and the
approximate index over the settled part of an index.

An index is a directory::

    metadata.sqlite    rows of images, other paths of the same content
                       (aliases), the segments and their checksums,
                       tombstones, and the state (manifest, next id)
    seg-000007.vec     the vectors one commit added (see segments.py)
    ann-000012.faiss   the approximate index over one merged segment,
                       made by ``optimize`` (see ann.py)
    manifest.json      a readable copy of the manifest
    write.lock         held by the one process that writes

The SQLite transaction is the single commit point (in write-ahead-log
mode: readers go on reading the last commit while one is written, and a
search holds no transaction while it searches).  A commit writes only
its own new vectors, as one new segment file (temporary name, fsync,
rename), then records the rows, the segment with its checksum, and a
tombstone for every vector it removes or replaces, in one transaction.  Its
cost is that of what it changes, however large the index.  A crash at any
moment leaves the old or the new state; files of a commit that never
finished are removed by the next writer.

An image's live vector is in the segment its row names; every other vector
with its id is tombstoned.  Searches look at the approximate index (when
there is one) and at the newer segments exactly, drop tombstoned rows, and
merge the two rankings; ``optimize`` folds everything into one segment again.

This module is the one place that turns vector positions into stable ids
and metadata rows.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import BadIndexError, DamagedIndexError, IndexLockedError, first_line
from . import ann
from . import backend as backends
from .files import LOCK_FILE, deferred_signals, fsync_dir, lock as _lock, write_atomic
from .segments import Segment, SegmentInfo, pad, top_k, write_segment

FORMAT_VERSION = 2
METADATA_FILE = "metadata.sqlite"
MANIFEST_FILE = "manifest.json"
METRIC = "inner_product"
# Exact searches go through the memory map while the segments they cover
# total at most this (then the map's pages are what the index type needs),
# else through plain reads, so an unmerged index does not pin its files.
MAP_SEARCH_BYTES = 512 << 20
# Below this many bytes of vectors, opening an index checks every segment's
# checksum too (a fraction of a second); above it, sizes and headers only,
# and `verify` reads everything.
FULL_CHECK_ON_OPEN_BYTES = 64 << 20

# One row per distinct content (one vector each); further paths holding the
# same bytes are aliases of that row, so a picture is never found twice.
# The content hash has no index: random keys would make every commit rewrite
# about one index page per new image (40 ms per 1,000 at a million images,
# more than the vectors themselves); the writer keeps its own (_ShaIndex).
_SCHEMA = """
CREATE TABLE images (
    id INTEGER PRIMARY KEY,
    path TEXT NOT NULL UNIQUE,
    sha256 TEXT NOT NULL,
    size INTEGER NOT NULL,
    mtime REAL NOT NULL,
    label TEXT,
    width INTEGER,
    height INTEGER,
    segment INTEGER NOT NULL DEFAULT 0
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
# Added by format 2 (and by the conversion of a format 1 index).  New rows
# name the newest segment, so the index on it grows at its end.
_SEGMENT_SCHEMA = """
CREATE INDEX images_segment ON images (segment);
CREATE TABLE segments (
    number INTEGER PRIMARY KEY,
    file TEXT NOT NULL,
    count INTEGER NOT NULL,
    bytes INTEGER NOT NULL,
    sha256 TEXT NOT NULL,
    created TEXT NOT NULL
);
CREATE TABLE tombstones (
    segment INTEGER NOT NULL,
    id INTEGER NOT NULL,
    PRIMARY KEY (segment, id)
) WITHOUT ROWID;
"""
_COLUMNS = "id, path, sha256, size, mtime, label, width, height"
# What a creation killed before its metadata file appeared can leave behind.
_CREATION_LEFTOVERS = frozenset({
    MANIFEST_FILE, MANIFEST_FILE + ".tmp", METADATA_FILE + ".new", METADATA_FILE + ".new-journal", LOCK_FILE,
})
_BATCH = 500  # SQLite caps bound parameters


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


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _is_leftover(path: Path) -> bool:
    """A file an unfinished creation of ours may leave (or our lock file)."""
    if path.name not in _CREATION_LEFTOVERS:
        return False
    try:
        if path.name == MANIFEST_FILE + ".tmp" and path.stat().st_size == 0:
            return True  # killed between creating the temporary copy and writing it
    except FileNotFoundError:
        return True  # renamed into place by a creation running now: the lock tells
    if path.name.startswith(MANIFEST_FILE):  # ours only if it reads as our manifest
        try:
            return "format_version" in json.loads(path.read_text())
        except (OSError, ValueError, TypeError):
            return False
    return True


def _manifest_bytes(manifest: dict) -> bytes:
    return (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode()


def _connect(path: Path) -> sqlite3.Connection:
    """A connection to the metadata, for reading and writing alike (a
    reader only reads, but replaying the log a killed writer left needs an
    ordinary connection).  Shared between threads by callers that serialise
    their use (the indexer's workers look rows up under one lock)."""
    return sqlite3.connect(path, timeout=30, check_same_thread=False)


def _connect_read_only(directory: Path) -> sqlite3.Connection:
    """A connection for reading an index in a folder this process cannot
    write (read-only media, another user's index).  In write-ahead-log mode
    even a reader must create the shared-memory file beside the database,
    so there the database is opened as immutable, which needs no other
    file; a log that a killed writer left would then go unread, so such an
    index is refused until someone who can write it opens it once."""
    path = directory / METADATA_FILE
    wal = directory / (METADATA_FILE + "-wal")
    if wal.exists() and wal.stat().st_size:
        raise BadIndexError(
            f"index {directory} is read-only here and holds a write log that a writer left; "
            "run 'imgsearch verify' on it once as a user who can write it"
        )
    return sqlite3.connect(f"{path.resolve().as_uri()}?immutable=1", uri=True, timeout=30,
                           check_same_thread=False)


def _chunks(items, size: int = _BATCH):
    items = list(items)
    for start in range(0, len(items), size):
        yield items[start:start + size]


def _allow_files(needed: int) -> None:
    """Raise this process's soft limit of open files when an index holds
    many segments (one descriptor each), as far as the hard limit allows."""
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft != resource.RLIM_INFINITY and soft < needed:
            top = needed if hard == resource.RLIM_INFINITY else min(hard, needed)
            resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, top), hard))
    except (ImportError, ValueError, OSError):
        pass  # then too many segments give a one-line error from the open


class _ShaIndex:
    """Content hash to id, for the one process that writes: Python's hash of
    each sha256 (8 bytes) beside its id, sorted, loaded on first use (16
    bytes an image), plus what this process committed since.  A candidate
    is confirmed against its row, so stale entries (removed or changed
    images) are harmless."""

    def __init__(self, db: sqlite3.Connection):
        keys, ids = [], []
        cursor = db.execute("SELECT id, sha256 FROM images")
        while rows := cursor.fetchmany(50_000):
            ids += [row[0] for row in rows]
            keys += [hash(row[1]) for row in rows]
        order = np.argsort(np.asarray(keys, dtype=np.int64), kind="stable")
        self.keys = np.asarray(keys, dtype=np.int64)[order]
        self.ids = np.asarray(ids, dtype=np.int64)[order]
        self.recent: dict[str, int] = {}

    def candidates(self, sha256: str) -> list[int]:
        key = hash(sha256)
        lo, hi = np.searchsorted(self.keys, key, side="left"), np.searchsorted(self.keys, key, side="right")
        found = [int(i) for i in self.ids[lo:hi]]
        if sha256 in self.recent:
            found.append(self.recent[sha256])
        return found


@dataclass
class _View:
    """The vectors of one committed state: its segments, oldest first, and
    the approximate index over the first of them, if any."""

    generation: int
    segments: list[Segment]
    ann: "ann.AnnIndex | None" = None

    @property
    def live(self) -> int:
        return sum(s.live for s in self.segments)

    def close(self) -> None:
        for segment in self.segments:
            segment.close()


class Store:
    """An open index directory.  Use :meth:`create` or :meth:`open`."""

    def __init__(self, directory: Path, connection: sqlite3.Connection, writable: bool,
                 check_manifest: bool = True, lock_handle=None):
        """``lock_handle``: a writer's lock, taken before the state is read
        (or a writer could start from a state another is about to replace);
        closed with the store."""
        self.directory = directory
        self._db = connection
        self.writable = writable
        self._lock_handle = lock_handle
        self.created_here = False
        self._made_folder = False
        self._checked: set[tuple[str, str]] = set()  # (file, sha256) whose checksum held
        self._sha_index: _ShaIndex | None = None
        self.backend: backends.VectorBackend | None = None  # named by the manifest, opened with it
        self.cleaned: list[str] = []  # files of unfinished commits a writer removed on opening
        try:
            self._load_state()
            if check_manifest:
                self._check_manifest_copy()
            if writable:
                self._write_ahead()
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
                if (directory / METADATA_FILE).exists():
                    # Another process created it and finished after this one
                    # found the folder empty (its model took longer to load).
                    raise IndexLockedError(f"index {directory} was just created by another process; "
                                           "run the command again to add to it")
                raise BadIndexError(
                    f"{directory} is not an imgsearch index and not empty; refusing to write there"
                )

    @classmethod
    def create(cls, directory, *, encoder: dict, dim: int, index_type: str = "auto",
               target_recall: float = ann.DEFAULT_TARGET_RECALL, max_memory: int | None = None,
               backend: str = backends.DEFAULT, backend_options: dict | None = None) -> "Store":
        """A new, empty index.  The folder must not exist or be empty.
        ``index_type``, ``target_recall`` and ``max_memory`` say what kind of
        approximate index ``optimize`` builds (see :mod:`.ann`); ``backend``
        (with its ``backend_options``) where the vectors live (see
        :mod:`.backend`)."""
        ann.check_settings(index_type, target_recall, max_memory)
        directory = Path(directory)
        cls.check_creatable(directory)
        backend_cls = backends.get(backend)
        # Checked (and a remote collection made) before anything is written
        # here: an unreachable server leaves no folder behind.
        record = None if backend == backends.DEFAULT else backend_cls.create(directory, int(dim), backend_options or {})
        try:
            store = cls._create(directory, encoder, dim, index_type, target_recall, max_memory, record)
        except BaseException:
            if record is not None:
                with contextlib.suppress(Exception):
                    backend_cls(None, record).discard()
            raise
        return store

    @classmethod
    def _create(cls, directory: Path, encoder: dict, dim: int, index_type: str, target_recall: float,
                max_memory: int | None, record: dict | None) -> "Store":
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
            store = cls._create_locked(directory, encoder, dim, {
                "type": index_type, "target_recall": float(target_recall), "max_memory": max_memory}, lock,
                record)
        except BaseException:
            if lock is not None:
                lock.close()
            if made_folder and not (directory / METADATA_FILE).exists():
                (directory / LOCK_FILE).unlink(missing_ok=True)
                with contextlib.suppress(OSError):
                    directory.rmdir()
            raise
        store.created_here, store._made_folder = True, made_folder
        return store

    @classmethod
    def _create_locked(cls, directory: Path, encoder: dict, dim: int, search: dict, lock,
                       record: dict | None = None) -> "Store":
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
            "revision": 0,
            "content_revision": 0,
            "segments": 0,
            "search": search,
            "ann": None,
            "created": now(),
            "updated": now(),
        }
        if record is not None:  # absent: the local store (as in every index made before backends)
            manifest["backend"] = record
        with db:
            db.executescript(_SCHEMA + _SEGMENT_SCHEMA)
            db.executemany(
                "INSERT INTO state (key, value) VALUES (?, ?)",
                [("manifest", json.dumps(manifest)), ("next_id", "1"), ("next_segment", "1")],
            )
        db.close()
        write_atomic(directory / MANIFEST_FILE, _manifest_bytes(manifest))
        # The metadata file appears whole or not at all, so a crash here never
        # leaves a folder that looks like an index but is not one.
        os.replace(tmp, directory / METADATA_FILE)
        fsync_dir(directory)
        db = _connect(directory / METADATA_FILE)
        try:
            return cls(directory, db, writable=True, lock_handle=lock)
        except BaseException:
            # A backend failing on its first use (its server went away since
            # it was checked) must not leave an empty index behind.
            for name in (METADATA_FILE, MANIFEST_FILE):
                (directory / name).unlink(missing_ok=True)
            raise

    @classmethod
    def open(cls, directory, *, writable: bool = False, check_manifest: bool = True,
             exclusive: bool = False) -> "Store":
        """An existing index.  A writer converts an index of format 1 (one
        FAISS file rewritten by every commit) in place, removes what
        unfinished commits left and refreshes a stale manifest copy; a
        reader changes nothing.  ``exclusive``: a reader that holds the
        writer lock, so that no commit lands while it reads (``verify``)."""
        directory = Path(directory)
        if not directory.exists():
            raise BadIndexError(f"no index at {directory} (create one with 'imgsearch index')")
        if not directory.is_dir():
            raise BadIndexError(f"{directory} is not a folder, so not an index")
        path = directory / METADATA_FILE
        if not path.is_file():
            raise BadIndexError(f"{directory} is not an imgsearch index (it has no {METADATA_FILE})")
        try:
            db = _connect(path)
            try:
                db.execute("SELECT count(*) FROM state").fetchone()
            except sqlite3.OperationalError:
                if writable or os.access(directory, os.W_OK):
                    raise
                db.close()
                db = _connect_read_only(directory)
                db.execute("SELECT count(*) FROM state").fetchone()
        except sqlite3.DatabaseError as exc:
            raise DamagedIndexError(f"the metadata of index {directory} is damaged ({exc})") from None
        if not writable:
            try:
                handle = _lock(directory, create=False) if exclusive else None
            except BaseException:
                db.close()
                raise
            return cls(directory, db, False, check_manifest, lock_handle=handle)
        from .legacy import convert_if_old

        handle = None
        try:
            handle = _lock(directory)
            convert_if_old(directory, db)
        except BaseException:
            db.close()
            if handle is not None:
                handle.close()
            raise
        return cls(directory, db, True, check_manifest, lock_handle=handle)

    def close(self) -> None:
        if getattr(self, "_view", None) is not None:
            self._view.close()
        if getattr(self, "backend", None) is not None:
            self.backend.close()
        self._db.close()
        if self._lock_handle is not None:
            self._lock_handle.close()
            self._lock_handle = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _damaged(self, what: str) -> DamagedIndexError:
        return DamagedIndexError(f"index {self.directory} is damaged: {what}")

    def _load_state(self, attempts: int = 10) -> None:
        for attempt in range(attempts):
            try:
                # One read transaction: the state, segments and tombstones
                # belong to the same commit.
                self._db.execute("BEGIN")
                try:
                    state = dict(self._db.execute("SELECT key, value FROM state"))
                    manifest = json.loads(state["manifest"])
                    version = manifest.get("format_version")
                    if version != FORMAT_VERSION:
                        raise BadIndexError(self._version_message(version))
                    rows = int(self._db.execute("SELECT count(*) FROM images").fetchone()[0])
                    infos = [SegmentInfo(*row) for row in self._db.execute(
                        "SELECT number, file, count, bytes, sha256 FROM segments ORDER BY number")]
                    tombstones: dict[int, list[int]] = {}
                    for segment, image_id in self._db.execute("SELECT segment, id FROM tombstones"):
                        tombstones.setdefault(segment, []).append(image_id)
                finally:
                    self._end_read()
                self.manifest = manifest
                self._next_id = int(state["next_id"])
                self._next_segment = int(state["next_segment"])
            except (sqlite3.DatabaseError, KeyError, ValueError, TypeError) as exc:
                raise DamagedIndexError(f"the metadata of index {self.directory} is damaged ({exc})") from None
            if self.backend is None:
                self.backend = backends.get((manifest.get("backend") or {}).get("name", backends.DEFAULT))(
                    self, manifest.get("backend") or {"name": backends.DEFAULT})
            if not self.backend.local:
                # The vectors live elsewhere; tombstones here are deletions
                # an interrupted commit still owes it (see clean_up).
                if int(self.manifest.get("count", -1)) != rows:
                    raise self._damaged(f"{rows} metadata rows but manifest count {self.manifest.get('count')}")
                if getattr(self, "_view", None) is not None:
                    self._view.close()
                self._view = _View(int(self.manifest.get("generation", 0)), [])
                return
            try:
                view = self._open_view(infos, tombstones)
            except FileNotFoundError as exc:
                # A writer committed (a merge) and removed files of the state
                # we were about to read; the next read sees the new one.
                time.sleep(0.01 * attempt)
                if attempt == attempts - 1:
                    raise self._damaged(f"its file {Path(exc.filename or str(exc)).name} is missing") from None
                continue
            if view.live != rows or int(self.manifest.get("count", -1)) != rows:
                view.close()
                raise self._damaged(f"{view.live} vectors but {rows} metadata rows "
                                    f"(manifest count {self.manifest.get('count')})")
            if getattr(self, "_view", None) is not None:
                self._view.close()
            self._view = view
            return

    def _write_ahead(self) -> None:
        """A writer switches the metadata to write-ahead logging (it stays
        so), once the index opened without a fault: readers then keep
        reading the last commit while a commit is written, and a commit
        never waits for a reader.  A commit is durable once SQLite returns
        (synchronous FULL syncs the log at each commit), which the manifest
        copy written after it relies on.  A killed writer leaves its log
        beside the database (``metadata.sqlite-wal``); the next connection
        keeps its committed transactions and drops the rest."""
        try:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
        except sqlite3.OperationalError as exc:
            raise BadIndexError(f"cannot write index {self.directory} ({exc})") from None

    def _end_read(self) -> None:
        """End a read transaction, if SQLite has not ended it already (it
        rolls back by itself after some errors): ending it must never
        replace the error that is on its way out."""
        if self._db.in_transaction:
            with contextlib.suppress(sqlite3.Error):
                self._db.execute("ROLLBACK")  # nothing was written: the same as COMMIT

    def _version_message(self, version) -> str:
        if version == 1:
            return (f"index {self.directory} has format version 1, which this imgsearch converts: "
                    f"run 'imgsearch optimize --index {self.directory}' once (nothing is lost)")
        return (f"index {self.directory} has format version {version}; "
                f"this imgsearch reads version {FORMAT_VERSION}")

    def _open_view(self, infos: list[SegmentInfo], tombstones: dict[int, list[int]]) -> _View:
        _allow_files(2 * len(infos) + 256)
        segments: list[Segment] = []
        try:
            for info in infos:
                try:
                    segments.append(Segment(self.directory, info, self.dim))
                except FileNotFoundError:
                    raise
                except OSError as exc:  # too many open files, permissions
                    raise BadIndexError(f"cannot open {info.file} of index {self.directory} "
                                        f"({exc.strerror or exc})") from None
            return self._checked_view(segments, tombstones)
        except BaseException:
            for segment in segments:
                segment.close()
            raise

    def _checked_view(self, segments: list[Segment], tombstones: dict[int, list[int]]) -> _View:
        if sum(s.info.bytes for s in segments) <= FULL_CHECK_ON_OPEN_BYTES:
            for segment in segments:
                key = (segment.info.file, segment.info.sha256)
                if key not in self._checked:
                    if not segment.checksum_ok():
                        raise self._damaged(
                            f"{segment.info.file} does not match the checksum recorded when it was written")
                    self._checked.add(key)
        known = {s.info.number for s in segments}
        for number, ids in tombstones.items():
            if number not in known:
                raise self._damaged(f"tombstones name segment {number}, which it does not have")
            segment = segments[[s.info.number for s in segments].index(number)]
            segment.dead |= np.isin(segment.ids, np.asarray(ids, dtype=np.int64))
        index = None
        built = self.manifest.get("ann")
        if built and built.get("type") != "flat":
            if not segments or segments[0].info.number != built.get("segment"):
                raise self._damaged(f"its approximate index covers segment {built.get('segment')}, "
                                    "which is not its first")
            index = ann.AnnIndex.open(self.directory, built, segments[0])
        return _View(int(self.manifest.get("generation", 0)), segments, index)

    def _read_manifest_copy(self) -> dict:
        try:
            copy = json.loads((self.directory / MANIFEST_FILE).read_text())
            int(copy["revision"])
            return copy
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise BadIndexError(
                f"{MANIFEST_FILE} of index {self.directory} is missing or damaged ({first_line(exc)}); "
                f"'imgsearch verify --index {self.directory} --repair' rewrites it from the metadata"
            ) from None

    def _check_manifest_copy(self, attempts: int = 5) -> None:
        for attempt in range(attempts):
            copy = self._read_manifest_copy()
            ours = int(self.manifest["revision"])
            if copy.get("created") != self.manifest.get("created"):
                break
            if int(copy["revision"]) <= ours:
                if int(copy["revision"]) < ours and self.writable:
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

    def repair_manifest_copy(self) -> bool:
        """Rewrite manifest.json from the metadata (the lock is held) unless
        it is that already; whether it was rewritten."""
        if not self.writable:
            raise RuntimeError("store opened read-only")
        path = self.directory / MANIFEST_FILE
        with contextlib.suppress(OSError):
            if path.read_bytes() == _manifest_bytes(self.manifest):
                return False
        try:
            self._write_manifest_copy()
            return True
        except OSError as exc:
            (self.directory / (MANIFEST_FILE + ".tmp")).unlink(missing_ok=True)
            raise BadIndexError(f"cannot rewrite {MANIFEST_FILE} in {self.directory}: {exc.strerror or exc}") from None

    def verify(self, *, check_files: bool = True, progress=None) -> tuple[list[str], list[str]]:
        """Problems (the index is damaged) and notes (worth knowing) found by
        reading everything: the metadata, every vector file against its
        checksum, and the two against each other.  Memory stays flat: rows
        and vectors are read a batch at a time."""
        problems, notes = [], []
        manifest = self.manifest
        db_check = self._db.execute("PRAGMA integrity_check").fetchone()[0]
        if db_check != "ok":
            problems.append(f"SQLite integrity check: {db_check}")
        rows = self._db.execute("SELECT count(*) FROM images").fetchone()[0]
        if manifest.get("count") != rows:
            problems.append(f"counts differ: {rows} metadata rows, manifest count {manifest.get('count')}")
        found, noted = self.backend.verify(progress)
        problems += found
        notes += noted
        twice = self._db.execute(
            "SELECT count(*), min(sha256) FROM (SELECT sha256 FROM images GROUP BY sha256 HAVING count(*) > 1)"
        ).fetchone()
        if twice[0]:
            problems.append(f"{twice[0]} contents are stored as more than one image (first: sha256 {twice[1]})")
        top = self._db.execute("SELECT max(id) FROM images").fetchone()[0]
        if top is not None and top >= self._next_id:
            problems.append(f"next id {self._next_id} is not above the largest id {top}")
        orphan = self._db.execute(
            "SELECT count(*), min(a.path) FROM aliases a LEFT JOIN images i ON a.image_id = i.id WHERE i.id IS NULL"
        ).fetchone()
        if orphan[0]:
            problems.append(f"{orphan[0]} duplicate paths point to no image (first: {orphan[1]})")
        try:
            copy = self._read_manifest_copy()
            if copy.get("revision", 0) < manifest.get("revision", 0) and copy.get("created") == manifest.get("created"):
                notes.append(f"{MANIFEST_FILE} is behind the metadata (a write was interrupted); "
                             "the next write or 'verify --repair' refreshes it")
            elif {k: copy.get(k) for k in manifest} != manifest:
                problems.append(f"{MANIFEST_FILE} differs from the manifest in the metadata")
        except BadIndexError as exc:
            problems.append(str(exc))
        strays = sorted(p.name for p in self._stray_files())
        if strays:
            notes.append(f"files left by an unfinished commit (removed by the next write or 'verify --repair'): "
                         f"{', '.join(strays)}")
        if check_files:
            gone, first = 0, None
            for (path,) in self._db.execute("SELECT path FROM images UNION ALL SELECT path FROM aliases"):
                if not os.path.exists(path):
                    gone, first = gone + 1, first or path
            if gone:
                notes.append(f"{gone} indexed files no longer exist (first: {first}); "
                             "'imgsearch index ... --prune' forgets them")
        return problems, notes

    def _stray_files(self) -> list[Path]:
        """Vector files no committed state refers to, and temporary files."""
        current = {s.info.file for s in self._view.segments}
        if self._view.ann is not None:
            current.add(self._view.ann.file)
        strays = [p for pattern in ("seg-*", "ann-*", "vectors-*.faiss") for p in self.directory.glob(pattern)
                  if p.name not in current]
        return strays + [p for p in self.directory.glob("*.tmp") if p not in strays]

    def _remove_leftovers(self) -> None:
        """Files of commits that never finished, and what such a commit
        still owes the backend (the lock is held)."""
        for path in self._stray_files():
            path.unlink(missing_ok=True)
            self.cleaned.append(path.name)
        self.backend.clean_up()

    # -- reading ---------------------------------------------------------
    @property
    def dim(self) -> int:
        return int(self.manifest["dim"])

    @property
    def count(self) -> int:
        return int(self.manifest["count"])

    @property
    def segments(self) -> list[Segment]:
        """The open segments of the loaded state, oldest first."""
        return list(self._view.segments)

    @property
    def ann(self):
        """The approximate index over the first segment, or None."""
        return self._view.ann

    @property
    def tombstones(self) -> int:
        return sum(int(s.dead.sum()) for s in self._view.segments)

    def _entries(self, where: str = "", params=()) -> list[Entry]:
        rows = self._db.execute(f"SELECT {_COLUMNS} FROM images {where}", params)
        return [Entry(*row) for row in rows]

    def entries(self) -> list[Entry]:
        return self._entries("ORDER BY id")

    def entries_by_id(self, ids) -> dict[int, Entry]:
        found: dict[int, Entry] = {}
        for chunk in _chunks(sorted({int(i) for i in ids})):
            for entry in self._entries(f"WHERE id IN ({','.join('?' * len(chunk))})", chunk):
                found[entry.id] = entry
        return found

    def entry_at(self, path: str) -> Entry | None:
        rows = self._entries("WHERE path = ?", (path,))
        return rows[0] if rows else None

    def entry_with(self, sha256: str) -> Entry | None:
        """The image with this content, or None."""
        if self._sha_index is None:
            self._sha_index = _ShaIndex(self._db)
        for image_id in self._sha_index.candidates(sha256):
            rows = self._entries("WHERE id = ? AND sha256 = ?", (image_id, sha256))
            if rows:
                return rows[0]
        return None

    def alias_at(self, path: str) -> Alias | None:
        row = self._db.execute("SELECT path, image_id, size, mtime, label FROM aliases WHERE path = ?",
                               (path,)).fetchone()
        return Alias(*row) if row else None

    def alias_paths_of(self, image_id: int) -> list[str]:
        return [p for (p,) in self._db.execute(
            "SELECT path FROM aliases WHERE image_id = ? ORDER BY path", (int(image_id),))]

    def paths(self, batch: int = 10_000):
        """Every indexed path (images and aliases), a batch at a time."""
        cursor = self._db.execute("SELECT path FROM images UNION ALL SELECT path FROM aliases")
        while rows := cursor.fetchmany(batch):
            yield from (p for (p,) in rows)

    def paths_under(self, path: str) -> list[str]:
        """Indexed paths (images and aliases) equal to ``path`` or inside the
        folder ``path``, by a range over the path index."""
        folder = path.rstrip(os.sep) + os.sep
        # Every path starting with `folder` sorts in [folder, folder + U+10FFFF).
        end = folder + "\U0010ffff"
        found = []
        for table in ("images", "aliases"):
            found += [p for (p,) in self._db.execute(
                f"SELECT path FROM {table} WHERE path = ? OR (path >= ? AND path < ?)", (path, folder, end))]
        return sorted(found)

    def labelled_entries(self) -> list[Entry]:
        return self._entries("WHERE label IS NOT NULL ORDER BY id")

    def entries_page(self, *, label: str | None = None, after: int = -1, limit: int = 100) -> list[Entry]:
        """Up to ``limit`` images with ids above ``after`` (only those with
        ``label``, if given), in id order: a page of a listing that costs
        the same on the last page as on the first."""
        if label is None:
            return self._entries("WHERE id > ? ORDER BY id LIMIT ?", (int(after), int(limit)))
        return self._entries("WHERE label = ? AND id > ? ORDER BY id LIMIT ?", (label, int(after), int(limit)))

    def by_path(self) -> dict[str, Entry]:
        return {entry.path: entry for entry in self._entries()}

    def aliases(self) -> list[Alias]:
        rows = self._db.execute("SELECT path, image_id, size, mtime, label FROM aliases ORDER BY path")
        return [Alias(*row) for row in rows]

    def alias_count(self) -> int:
        return int(self._db.execute("SELECT count(*) FROM aliases").fetchone()[0])

    def labels(self) -> dict[str, int]:
        rows = self._db.execute(
            "SELECT label, count(*) FROM images WHERE label IS NOT NULL GROUP BY label ORDER BY label"
        )
        return dict(rows)

    def vectors(self, ids) -> np.ndarray:
        """The stored vectors of ``ids`` (as they are in the index)."""
        return self.backend.vectors(np.asarray(list(ids), dtype=np.int64))

    @contextlib.contextmanager
    def reading(self):
        """A read transaction in which the loaded vectors and the metadata
        rows belong to the same commit: when a writer committed new vectors
        since they were loaded, they are loaded again first.  The rows read
        inside agree with :meth:`nearest` and :meth:`vectors`."""
        if self.writable:  # nobody else writes
            yield
            return
        for _ in range(20):
            self._db.execute("BEGIN")
            try:
                # The first read takes SQLite's shared lock, held to the end
                # of the transaction: no commit can land in between.
                current = json.loads(self._db.execute(
                    "SELECT value FROM state WHERE key = 'manifest'").fetchone()[0])
            except BaseException:
                self._end_read()
                raise
            if current.get("generation") == self.manifest.get("generation"):
                self.manifest = current  # metadata-only commits (labels, moves)
                break
            self._end_read()
            self._load_state()
        else:
            raise BadIndexError(f"index {self.directory} changed too fast to read; try again")
        try:
            yield
        finally:
            self._end_read()

    def search(self, queries: np.ndarray, k: int, *, labelled: bool = False) -> list[list[Hit]]:
        """The ``k`` nearest entries of each row of ``queries`` (normalised),
        best first; only labelled entries when ``labelled``.  Fewer when the
        index (or its labelled part) holds fewer than ``k``.

        Vectors and rows always come from one committed state: if a writer
        committed new vectors since this store was opened, they are
        reloaded.  No read transaction is held while the vectors are
        searched, so a long search never holds up a commit: when one lands
        meanwhile, the search runs again on the new state.
        """
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        for _ in range(20):
            with self.reading():
                generation = self.manifest.get("generation")
                among = self.labelled_ids() if labelled else None
            scores, ids = self.nearest(queries, k, among=among)
            with self.reading():
                if self.manifest.get("generation") == generation:
                    return self._hits(scores, ids, labelled)
        raise BadIndexError(f"index {self.directory} changed too fast to read; try again")

    def nearest(self, queries: np.ndarray, k: int, *, among=None) -> tuple[np.ndarray, np.ndarray]:
        """Raw answer: scores and ids ``(n, min(k, count))`` of the vectors
        loaded when this store was opened, best first, only among the ids
        ``among`` when given; ids are -1 only where an approximate search
        found fewer than ``k``."""
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if among is not None:
            among = np.unique(np.asarray(among, dtype=np.int64))
        k = min(int(k), self.count if among is None else len(among))
        if k <= 0 or len(queries) == 0:
            return np.empty((len(queries), 0), np.float32), np.empty((len(queries), 0), np.int64)
        if among is None:
            return self.backend.search(queries, k)
        return self.backend.search_among(queries, k, among)

    def range_search(self, queries: np.ndarray, threshold: float) -> list[tuple[np.ndarray, np.ndarray]]:
        """Every vector loaded when this store was opened whose cosine with
        a query (normalised) is at least ``threshold``: per query, scores
        and ids, best first.  Exact unless an approximate index answers
        (see :meth:`VectorBackend.range_search`)."""
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if self.count == 0:
            return [(np.empty(0, np.float32), np.empty(0, np.int64)) for _ in range(len(queries))]
        return self.backend.range_search(queries, float(threshold))

    def ids(self) -> np.ndarray:
        """Every image's id, ascending."""
        return np.fromiter((i for (i,) in self._db.execute("SELECT id FROM images ORDER BY id")), np.int64)

    def labelled_ids(self) -> np.ndarray:
        """The ids of the labelled images, sorted."""
        rows = self._db.execute("SELECT id FROM images WHERE label IS NOT NULL ORDER BY id")
        return np.fromiter((i for (i,) in rows), dtype=np.int64)

    def _hits(self, scores: np.ndarray, ids: np.ndarray, labelled: bool) -> list[list[Hit]]:
        wanted = sorted({int(i) for i in ids.ravel() if i >= 0})
        rows = self.entries_by_id(wanted)
        if labelled:  # a label removed since the search began
            rows = {i: entry for i, entry in rows.items() if entry.label is not None}
        also: dict[int, list[str]] = {}
        for chunk in _chunks(wanted):
            for path, image_id in self._db.execute(
                f"SELECT path, image_id FROM aliases WHERE image_id IN ({','.join('?' * len(chunk))}) "
                "ORDER BY path", chunk
            ):
                also.setdefault(image_id, []).append(path)
        return [
            [Hit(rows[int(i)], float(s), tuple(also.get(int(i), ())))
             for s, i in zip(row_scores, row_ids) if i >= 0 and int(i) in rows]
            for row_scores, row_ids in zip(scores, ids)
        ]

    # -- writing ---------------------------------------------------------
    @property
    def next_id(self) -> int:
        """The first id never used in this index (ids are never reused)."""
        return self._next_id

    def commit(self, changes: Changes) -> None:
        """Apply ``changes`` atomically.

        Only a commit that adds vectors writes a file (one new segment);
        removals are tombstones, and metadata-only changes one SQLite
        transaction.
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
        if len(set(ids)) != len(ids):
            raise ValueError("an id may get one vector per commit")
        next_id = max(new_ids, default=self._next_id - 1) + 1

        # Where the vectors about to be dropped live (the local store
        # tombstones them there); only ids with a row have one.
        dropped = [int(e.id) for e in changes.replaced] + [int(i) for i in changes.removed]
        home: dict[int, int] = {}
        for chunk in _chunks(dropped):
            home.update(self._db.execute(
                f"SELECT id, segment FROM images WHERE id IN ({','.join('?' * len(chunk))})", chunk))
        removed = np.asarray(sorted(set(int(i) for i in changes.removed) & set(home)), dtype=np.int64)
        staged = backends.Staged(np.asarray(ids, dtype=np.int64), removed, home)
        self.backend.stage(staged, vectors)
        vectors_changed = bool(entries or home)
        count = self.count + len(entries) - len(home)
        # The revision counts every commit, metadata-only ones too (a label
        # change keeps the generation), and merges; the content revision
        # counts only what changes images, labels or vectors (what a trained
        # classifier depends on), so optimize does not invalidate one.
        manifest = dict(self.manifest, count=count,
                        generation=int(self.manifest["generation"]) + vectors_changed,
                        revision=int(self.manifest["revision"]) + 1,
                        content_revision=int(self.manifest.get("content_revision", 0)) + 1, updated=now())
        try:
            with self._db:
                rows_delta = self._apply_rows(changes, staged.segment)
                self.backend.record(self._db, staged)
                manifest["segments"] = self.backend.segments_after(staged)
                self._db.executemany(
                    "UPDATE state SET value = ? WHERE key = ?",
                    [(json.dumps(manifest), "manifest"), (str(next_id), "next_id")],
                )
                if rows_delta != len(entries) - len(home):
                    raise BadIndexError(
                        f"refusing to commit: it would change the metadata rows by {rows_delta} "
                        f"but the vectors by {len(entries) - len(home)}; the index is unchanged"
                    )
        except BaseException as exc:
            self.backend.abandon(staged)
            if isinstance(exc, sqlite3.IntegrityError):
                raise BadIndexError(f"refusing to commit inconsistent metadata ({exc}); the index is unchanged") from None
            if isinstance(exc, sqlite3.OperationalError):
                raise BadIndexError(f"cannot write index {self.directory} ({exc}); it is unchanged") from None
            raise
        # From here the commit stands; the rest updates what this process holds.
        self.manifest, self._next_id = manifest, next_id
        if self._sha_index is not None:
            self._sha_index.recent.update((e.sha256, int(e.id)) for e in entries + changes.updated)
        self.backend.finish(staged)
        self._view.generation = int(manifest["generation"])
        with contextlib.suppress(OSError):
            self._write_manifest_copy()

    def _apply_rows(self, changes: Changes, segment: int) -> int:
        """Write the rows of a commit; returns the change in the row count."""
        db = self._db
        delta = 0
        for image_id in changes.removed:
            db.execute("DELETE FROM aliases WHERE image_id = ?", (int(image_id),))
            delta -= db.execute("DELETE FROM images WHERE id = ?", (int(image_id),)).rowcount
        db.executemany("DELETE FROM aliases WHERE path = ?", [(p,) for p in changes.unaliased])
        # Updates first: a promoted copy moves its image off a path that a
        # new image of this same commit takes.
        db.executemany(
            "UPDATE images SET path = ?, sha256 = ?, size = ?, mtime = ?, label = ?, width = ?, height = ?, "
            "segment = ? WHERE id = ?",
            [(e.path, e.sha256, e.size, e.mtime, e.label, e.width, e.height, segment, int(e.id))
             for e in changes.replaced],
        )
        db.executemany(
            "UPDATE images SET path = ?, sha256 = ?, size = ?, mtime = ?, label = ?, width = ?, height = ? "
            "WHERE id = ?",
            [(e.path, e.sha256, e.size, e.mtime, e.label, e.width, e.height, int(e.id)) for e in changes.updated],
        )
        db.executemany(
            f"INSERT INTO images ({_COLUMNS}, segment) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [(e.id, e.path, e.sha256, e.size, e.mtime, e.label, e.width, e.height, segment)
             for e in changes.added],
        )
        delta += len(changes.added)
        db.executemany(
            "INSERT OR REPLACE INTO aliases (path, image_id, size, mtime, label) VALUES (?, ?, ?, ?, ?)",
            [(a.path, int(a.image_id), a.size, a.mtime, a.label) for a in changes.aliases],
        )
        # Only what this commit touched can have become inconsistent.
        for alias in changes.aliases:
            if db.execute("SELECT 1 FROM images WHERE path = ?", (alias.path,)).fetchone():
                raise sqlite3.IntegrityError(f"alias {alias.path} is inconsistent")
            if not db.execute("SELECT 1 FROM images WHERE id = ?", (int(alias.image_id),)).fetchone():
                raise sqlite3.IntegrityError(f"alias {alias.path} is inconsistent")
        for entry in changes.added + changes.replaced + changes.updated:
            if db.execute("SELECT 1 FROM aliases WHERE path = ?", (entry.path,)).fetchone():
                raise sqlite3.IntegrityError(f"alias {entry.path} is inconsistent")
        return delta

    def discard(self) -> None:
        """Remove an index this process created and never committed to."""
        if not (self.created_here and self.count == 0):
            raise RuntimeError("only a new, empty index can be discarded")
        files = [s.path for s in self._view.segments]
        self.backend.discard()
        self.close()
        for path in files:
            path.unlink(missing_ok=True)
        for name in (METADATA_FILE, METADATA_FILE + "-wal", METADATA_FILE + "-shm", MANIFEST_FILE, LOCK_FILE):
            (self.directory / name).unlink(missing_ok=True)
        if self._made_folder:
            with contextlib.suppress(OSError):
                self.directory.rmdir()

    def _write_manifest_copy(self) -> None:
        write_atomic(self.directory / MANIFEST_FILE, _manifest_bytes(self.manifest))

    # -- merging (see merge.py) ----------------------------------------
    def _replace_segments(self, old: list[Segment], info: SegmentInfo | None, *, built=..., search=...) -> None:
        """Put ``info`` (the live vectors of the ``old`` segments, merged) in
        their place, in one transaction, with ``built`` the approximate
        index (``...``: unchanged) and ``search`` the settings asked for;
        then remove the files it replaced.  The caller reloads the state
        (:meth:`_load_state`) once it has forgotten the files it made."""
        numbers = [s.info.number for s in old]
        old_files = [s.path for s in old]
        manifest = dict(self.manifest, generation=int(self.manifest["generation"]) + 1,
                        revision=int(self.manifest["revision"]) + 1, updated=now(),
                        segments=len(self._view.segments) - len(old) + (info is not None))
        if built is not ...:
            manifest["ann"] = built
            if self._view.ann is not None and (not built or built.get("file") != self._view.ann.file):
                old_files.append(self.directory / self._view.ann.file)
        if search is not ...:
            manifest["search"] = search
        if info is not None and info.file in {p.name for p in old_files}:
            old_files = [p for p in old_files if p.name != info.file]  # settings only: same file
        marks = ",".join("?" * len(numbers))
        next_segment = max(self._next_segment, (info.number + 1) if info else 0)
        with deferred_signals():
            try:
                with self._db:
                    if numbers:
                        self._db.execute(f"DELETE FROM segments WHERE number IN ({marks})", numbers)
                        self._db.execute(f"DELETE FROM tombstones WHERE segment IN ({marks})", numbers)
                    if info is not None:
                        self._db.execute(
                            "INSERT OR REPLACE INTO segments (number, file, count, bytes, sha256, created) "
                            "VALUES (?, ?, ?, ?, ?, ?)",
                            (info.number, info.file, info.count, info.bytes, info.sha256, now()))
                        if numbers and numbers != [info.number]:
                            self._db.execute(f"UPDATE images SET segment = ? WHERE segment IN ({marks})",
                                             [info.number, *numbers])
                    self._db.executemany("UPDATE state SET value = ? WHERE key = ?", [
                        (json.dumps(manifest), "manifest"), (str(next_segment), "next_segment")])
            except sqlite3.OperationalError as exc:
                raise BadIndexError(f"cannot write index {self.directory} ({exc}); it is unchanged") from None
            self.manifest, self._next_segment = manifest, next_segment
            with contextlib.suppress(OSError):
                self._write_manifest_copy()
        for path in old_files:
            with contextlib.suppress(OSError):
                path.unlink(missing_ok=True)
        fsync_dir(self.directory)


class LocalBackend(backends.VectorBackend):
    """The default backend: the vectors in the index folder itself, as
    immutable segment files with tombstones, and a FAISS index over the
    merged part (this module, :mod:`.segments`, :mod:`.ann`, :mod:`.merge`)."""

    name = backends.DEFAULT
    description = "segment files and a FAISS index in the index folder"

    @property
    def local(self) -> bool:
        return True

    def stage(self, staged: backends.Staged, vectors: np.ndarray) -> None:
        store = self.store
        # Every vector dropped gets a tombstone in the segment it lives in.
        staged.data = {"tombstones": sorted((segment, image_id) for image_id, segment in staged.home.items()),
                       "info": None}
        staged.segment = store._next_segment
        if len(staged.ids):
            staged.data["info"] = write_segment(store.directory, staged.segment, staged.ids, vectors)

    def record(self, db, staged: backends.Staged) -> None:
        info = staged.data["info"]
        if info is not None:
            db.execute("INSERT INTO segments (number, file, count, bytes, sha256, created) VALUES (?, ?, ?, ?, ?, ?)",
                       (info.number, info.file, info.count, info.bytes, info.sha256, now()))
        db.executemany("INSERT INTO tombstones (segment, id) VALUES (?, ?)", staged.data["tombstones"])
        db.execute("UPDATE state SET value = ? WHERE key = 'next_segment'",
                   (str(staged.segment + (info is not None)),))

    def segments_after(self, staged: backends.Staged) -> int:
        return len(self.store._view.segments) + (staged.data["info"] is not None)

    def abandon(self, staged: backends.Staged) -> None:
        if staged.data and staged.data["info"] is not None:
            (self.store.directory / staged.data["info"].file).unlink(missing_ok=True)

    def finish(self, staged: backends.Staged) -> None:
        store, info = self.store, staged.data["info"]
        store._next_segment = staged.segment + (info is not None)
        by_number = {s.info.number: s for s in store._view.segments}
        dead: dict[int, list[int]] = {}
        for segment_number, image_id in staged.data["tombstones"]:
            dead.setdefault(segment_number, []).append(image_id)
        for segment_number, dead_ids in dead.items():
            segment = by_number[segment_number]
            rows = segment.positions(dead_ids)
            segment.dead[rows[rows >= 0]] = True
        if info is not None:
            store._view.segments.append(Segment(store.directory, info, store.dim))
            store._checked.add((info.file, info.sha256))

    def clean_up(self) -> None:
        """Nothing: the store removes the files of unfinished commits."""

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        return self._search(queries, k, None)

    def search_among(self, queries: np.ndarray, k: int, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Each segment's rows outside ``ids`` are skipped the way removed
        rows are: inside FAISS for the approximate index (which then reaches
        further, as it does past removed vectors), by masking for exact
        search; a segment where few rows may answer has just those read."""
        return self._search(queries, k, ids)

    def _search(self, queries: np.ndarray, k: int, among: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        view = self.store._view
        scores = [np.full((len(queries), 0), -np.inf, np.float32)]
        found_ids = [np.full((len(queries), 0), -1, np.int64)]
        approximate = view.ann is not None
        exact_bytes = sum(s.info.bytes for s in view.segments[int(approximate):])
        for number, segment in enumerate(view.segments):
            skip = None if among is None else segment.dead | ~np.isin(segment.ids, among)
            allowed = segment.live if skip is None else segment.count - int(skip.sum())
            if not allowed:
                continue
            if skip is not None and allowed <= segment.count // 8:
                found, rows = segment.search_rows(queries, k, np.flatnonzero(~skip))
            elif number == 0 and approximate:
                found, rows = view.ann.search(queries, k, skip=skip)
            else:
                found, rows = segment.search(queries, k, mapped=exact_bytes <= MAP_SEARCH_BYTES, skip=skip)
            scores.append(found)
            found_ids.append(np.where(rows >= 0, np.asarray(segment.ids)[np.maximum(rows, 0)], -1))
        best, best_ids = top_k(np.hstack(scores), np.hstack(found_ids), k)
        return pad(best, best_ids, k)

    def range_search(self, queries: np.ndarray, threshold: float) -> list[tuple[np.ndarray, np.ndarray]]:
        """Exact over segments searched exactly: every live row at or above
        the threshold, whatever their number.  An approximate index over
        the merged part answers with its own range search (ivf-sq8, see
        :meth:`.ann.AnnIndex.range_search`) or else through its tuned
        k-nearest search (the default's growing k); scores are exact."""
        view = self.store._view
        approximate = view.ann is not None
        exact_bytes = sum(s.info.bytes for s in view.segments[int(approximate):])
        pieces: list[list[tuple[np.ndarray, np.ndarray]]] = [[] for _ in range(len(queries))]
        for number, segment in enumerate(view.segments):
            if not segment.live:
                continue
            if number == 0 and approximate:
                found = view.ann.range_search(queries, threshold)
                if found is None:
                    return super().range_search(queries, threshold)
                for row, (scores, rows) in enumerate(found):
                    pieces[row].append((scores, segment.ids[rows]))
                continue
            for start, ids, block in segment.pieces(mapped=exact_bytes <= MAP_SEARCH_BYTES):
                scores = queries @ block.T
                scores[:, segment.dead[start:start + len(block)]] = -np.inf
                rows, cols = np.nonzero(scores >= threshold)  # in row order
                starts = np.flatnonzero(np.r_[True, rows[1:] != rows[:-1]]) if len(rows) else rows
                for row, mine in zip(rows[starts], np.split(cols, starts[1:])):
                    pieces[row].append((scores[row, mine], ids[mine]))
        found = []
        for parts in pieces:
            scores = np.concatenate([p[0] for p in parts]) if parts else np.empty(0, np.float32)
            ids = np.concatenate([p[1] for p in parts]) if parts else np.empty(0, np.int64)
            order = np.lexsort((ids, -scores))
            found.append((scores[order], ids[order]))
        return found

    def vectors(self, ids: np.ndarray) -> np.ndarray:
        out = np.zeros((len(ids), self.store.dim), np.float32)
        found = np.zeros(len(ids), bool)
        for segment in self.store._view.segments:
            rows = segment.positions(ids)
            hit = rows >= 0
            if hit.any():
                out[hit] = segment.rows(rows[hit])
                found |= hit
        if not found.all():
            raise KeyError(f"no vector for id {int(ids[~found][0])}")
        return out

    def due(self):
        from .merge import due

        return due(self.store)

    def optimize(self, **settings):
        from .merge import optimize

        return optimize(self.store, **settings)

    def verify(self, progress=None) -> tuple[list[str], list[str]]:
        """The segments against the rows naming them, each file against its
        checksum, every live vector's length; memory stays flat."""
        store, view = self.store, self.store._view
        problems: list[str] = []
        rows = store._db.execute("SELECT count(*) FROM images").fetchone()[0]
        if rows != view.live:
            problems.append(f"counts differ: {rows} metadata rows, {view.live} vectors")
        # The live ids of each segment must be exactly the rows naming it:
        # one pass over the rows, sorted by segment, a segment at a time.
        by_number = {s.info.number: s for s in view.segments}
        seen, orphans = set(), 0
        rows_cursor = store._db.execute("SELECT segment, id FROM images ORDER BY segment, id")
        for number, group in itertools.groupby(rows_cursor, key=lambda row: row[0]):
            named = np.fromiter((image_id for _, image_id in group), dtype=np.int64)
            segment = by_number.get(number)
            if segment is None:
                orphans += len(named)
                continue
            seen.add(number)
            live_ids = np.sort(np.asarray(segment.ids)[~segment.dead])
            if not np.array_equal(live_ids, named):
                problems.append(f"ids differ in {segment.info.file}: "
                                f"{len(np.setdiff1d(live_ids, named))} vectors without a row, "
                                f"{len(np.setdiff1d(named, live_ids))} rows without a vector")
        if orphans:
            problems.append(f"{orphans} metadata rows name a segment the index does not have")
        for number, segment in by_number.items():
            if number not in seen and segment.live:
                problems.append(f"ids differ in {segment.info.file}: {segment.live} vectors without a row, "
                                "0 rows without a vector")
        total = sum(s.count for s in view.segments)
        done = 0
        for segment in view.segments:
            name = segment.info.file
            if not segment.checksum_ok():
                problems.append(f"{name} does not match the checksum recorded when it was written")
                done += segment.count
                continue
            bad = 0
            for start, _, vectors in segment.chunks():
                norms = np.linalg.norm(vectors, axis=1)
                alive = ~segment.dead[start:start + len(vectors)]
                bad += int(np.sum((np.abs(norms - 1) > 1e-3) & (norms > 0) & alive))
                done += len(vectors)
                if progress:
                    progress(done, total)
            if bad:
                problems.append(f"{bad} vectors in {name} are not unit length")
        if view.ann is not None and not view.ann.checksum_ok():
            problems.append(f"{view.ann.file} does not match the checksum recorded when it was written")
        return problems, []

    def describe(self) -> dict:
        return {"backend": self.name}
