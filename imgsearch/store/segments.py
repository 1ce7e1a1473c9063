"""Segments: immutable files of vectors, each written once by one commit.

A segment file holds a 64-byte header, the 64-bit ids of its vectors, then
the float32 vectors themselves, so any row can be read (or mapped) where it
lies and no vector is read before it is needed::

    b"IMGSVEC1" | dim (uint32) | 0 (uint32) | count (uint64) | zeros to 64 bytes
    ids     int64[count]
    vectors float32[count, dim]

A segment's SHA-256 is computed once, while it is written, and recorded in
the metadata beside its size; opening checks the size and header (cheap),
``verify`` and every merge check the checksum (a full read).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import DamagedIndexError
from .files import publish, write_error

MAGIC = b"IMGSVEC1"
HEADER_BYTES = 64
_HEADER = struct.Struct("<8sIIQ")
_CHUNK_ROWS = 16384  # rows per step of an exact search or a full read


def segment_name(number: int) -> str:
    return f"seg-{number:06d}.vec"


def file_bytes(count: int, dim: int) -> int:
    return HEADER_BYTES + count * 8 + count * dim * 4


@dataclass(frozen=True)
class SegmentInfo:
    """A segment as the metadata records it."""

    number: int
    file: str
    count: int
    bytes: int
    sha256: str


class SegmentWriter:
    """Streams a new segment file (temporary name until :meth:`finish`),
    hashing what it writes.  The ids come first, so they are given up front;
    the vectors may follow in pieces (a merge reads them a chunk at a time)."""

    def __init__(self, directory: Path, number: int, dim: int, ids: np.ndarray):
        self.directory, self.number, self.dim = directory, number, dim
        self.count = len(ids)
        self.name = segment_name(number)
        self.tmp = directory / (self.name + ".tmp")
        self._digest = hashlib.sha256()
        self._written = 0
        self._out = open(self.tmp, "wb")
        try:
            self._write(_HEADER.pack(MAGIC, dim, 0, self.count).ljust(HEADER_BYTES, b"\0"))
            self._write(np.ascontiguousarray(ids, dtype="<i8").tobytes())
        except BaseException:
            self.abandon()
            raise

    def _write(self, data: bytes) -> None:
        self._out.write(data)
        self._digest.update(data)

    def add(self, vectors: np.ndarray) -> None:
        vectors = np.ascontiguousarray(vectors, dtype="<f4")
        if vectors.ndim != 2 or vectors.shape[1] != self.dim or self._written + len(vectors) > self.count:
            raise ValueError(f"segment {self.name}: vectors of shape {vectors.shape} do not fit")
        self._write(vectors.tobytes())
        self._written += len(vectors)

    def finish(self) -> SegmentInfo:
        if self._written != self.count:
            raise ValueError(f"segment {self.name}: {self._written} vectors written, {self.count} announced")
        self._out.close()
        publish(self.tmp, self.directory / self.name)
        return SegmentInfo(self.number, self.name, self.count, file_bytes(self.count, self.dim),
                           self._digest.hexdigest())

    def abandon(self) -> None:
        self._out.close()
        self.tmp.unlink(missing_ok=True)


def write_segment(directory: Path, number: int, ids: np.ndarray, vectors: np.ndarray) -> SegmentInfo:
    """Write one segment whole or not at all; a failure is a one-line error."""
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    try:
        writer = SegmentWriter(directory, number, vectors.shape[1], ids)
    except OSError as exc:
        (directory / (segment_name(number) + ".tmp")).unlink(missing_ok=True)
        raise write_error(directory, segment_name(number) + ".tmp", exc) from None
    try:
        writer.add(vectors)
        return writer.finish()
    except OSError as exc:
        writer.abandon()
        raise write_error(directory, writer.tmp.name, exc) from None


class Segment:
    """An open segment: its ids in memory (8 bytes a vector), its vectors
    read on demand through one descriptor held while it is open, so a
    merge that removes the file cannot pull it from under a reader."""

    def __init__(self, directory: Path, info: SegmentInfo, dim: int):
        self.info, self.dim = info, dim
        self.path = directory / info.file
        self._fd = os.open(self.path, os.O_RDONLY)  # FileNotFoundError: the caller may retry
        try:
            size = os.fstat(self._fd).st_size
            expected = file_bytes(info.count, dim)
            if size != expected or info.bytes != expected:
                raise DamagedIndexError(
                    f"index {directory} is damaged: {info.file} has {size} bytes, "
                    f"{expected} expected for {info.count} vectors of dimension {dim}"
                )
            magic, file_dim, _, count = _HEADER.unpack(os.pread(self._fd, _HEADER.size, 0))
            if magic != MAGIC or file_dim != dim or count != info.count:
                raise DamagedIndexError(f"index {directory} is damaged: {info.file} has a wrong header")
            self.ids = np.empty(count, dtype="<i8")
            self._read_into(self.ids, HEADER_BYTES)
        except BaseException:
            os.close(self._fd)
            raise
        self._base = HEADER_BYTES + 8 * count  # where the vectors start
        self._map: np.ndarray | None = None
        self.dead = np.zeros(count, dtype=bool)  # tombstoned rows, set by the store
        self._order: np.ndarray | None = None

    def close(self) -> None:
        self._map = None
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __del__(self):
        with contextlib.suppress(Exception):
            self.close()

    def _read_into(self, array: np.ndarray, offset: int) -> None:
        view = memoryview(array).cast("B")
        done = 0
        while done < len(view):
            got = os.preadv(self._fd, [view[done:]], offset + done)
            if not got:
                raise OSError(f"{self.path.name} ended early")
            done += got

    @property
    def count(self) -> int:
        return self.info.count

    @property
    def live(self) -> int:
        return self.info.count - int(self.dead.sum())

    def checksum_ok(self) -> bool:
        """Whether the open file matches the checksum recorded for it."""
        digest = hashlib.sha256()
        buffer = bytearray(1 << 22)
        offset = 0
        while got := os.preadv(self._fd, [buffer], offset):
            digest.update(memoryview(buffer)[:got])
            offset += got
        return digest.hexdigest() == self.info.sha256

    def positions(self, ids) -> np.ndarray:
        """Row of each id in this segment (-1 where absent), live rows only."""
        if self._order is None:
            self._order = np.argsort(self.ids, kind="stable")
        ids = np.asarray(ids, dtype=np.int64)
        sorted_ids = self.ids[self._order]
        at = np.clip(np.searchsorted(sorted_ids, ids), 0, max(self.count - 1, 0))
        rows = self._order[at] if self.count else np.full(len(ids), -1)
        found = (sorted_ids[at] == ids) if self.count else np.zeros(len(ids), bool)
        rows = np.where(found, rows, -1)
        rows[rows >= 0] = np.where(self.dead[rows[rows >= 0]], -1, rows[rows >= 0])
        return rows

    def rows(self, positions) -> np.ndarray:
        """The vectors at ``positions``, read one by one (a map would keep
        the pages around them too: the kernel maps neighbouring pages on
        each fault, so scattered reads would end up holding the file)."""
        positions = np.asarray(positions, dtype=np.int64)
        out = np.empty((len(positions), self.dim), np.float32)
        row_bytes = 4 * self.dim
        for i in np.argsort(positions, kind="stable"):  # front to back
            self._read_into(out[i], self._base + int(positions[i]) * row_bytes)
        return out

    def chunks(self, rows: int = _CHUNK_ROWS):
        """(start, ids, vectors) pieces in file order, for reading it all.

        Read with plain reads into one reused buffer rather than through a
        memory map: pages touched through a map count as the process's own
        memory until it is unmapped, so a pass over a large index would look
        (and, under pressure, act) as if it held the whole file."""
        buffer = np.empty((min(rows, self.count), self.dim), np.float32)
        for start in range(0, self.count, rows):
            block = buffer[:min(rows, self.count - start)]
            self._read_into(block, self._base + start * 4 * self.dim)
            yield start, self.ids[start:start + len(block)], block

    def mapped(self) -> np.ndarray:
        """The vectors through a read-only memory map of the open file."""
        if self._map is None:
            import mmap

            whole = mmap.mmap(self._fd, 0, access=mmap.ACCESS_READ)
            self._map = np.ndarray((self.count, self.dim), dtype="<f4", buffer=whole, offset=self._base)
        return self._map

    def pieces(self, mapped: bool = True):
        """(start, ids, vectors) pieces of every row (dead ones too), through
        the memory map or with plain reads (see :meth:`search`)."""
        if not mapped:
            yield from self.chunks()
            return
        vectors = self.mapped()
        for start in range(0, self.count, _CHUNK_ROWS):
            yield start, self.ids[start:start + _CHUNK_ROWS], vectors[start:start + _CHUNK_ROWS]

    def search(self, queries: np.ndarray, k: int, mapped: bool = True,
               skip: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Exact inner product over the live rows (those not in ``skip``,
        default the removed ones): scores and rows ``(n, k)``, best first,
        padded with -inf and -1.  ``mapped``: through the memory map
        (fastest when searched again and again; its pages then count as
        this process's memory), else with plain reads."""
        skip = self.dead if skip is None else skip
        n = len(queries)
        best_scores = np.full((n, 0), -np.inf, dtype=np.float32)
        best_rows = np.full((n, 0), -1, dtype=np.int64)
        for start, _, block in self.pieces(mapped):
            scores = queries @ block.T
            dead = skip[start:start + len(block)]
            if dead.any():
                scores[:, dead] = -np.inf
            rows = np.broadcast_to(np.arange(start, start + len(block)), scores.shape)
            best_scores, best_rows = top_k(np.hstack([best_scores, scores]),
                                           np.hstack([best_rows, rows]), k)
        return pad(best_scores, best_rows, k)


    def search_rows(self, queries: np.ndarray, k: int, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Exact search among the given rows only (read one by one: for a
        few rows of a large segment)."""
        rows = np.asarray(rows, dtype=np.int64)
        best_scores = np.full((len(queries), 0), -np.inf, dtype=np.float32)
        best_rows = np.full((len(queries), 0), -1, dtype=np.int64)
        for start in range(0, len(rows), _CHUNK_ROWS):
            chunk = rows[start:start + _CHUNK_ROWS]
            scores = queries @ self.rows(chunk).T
            best_scores, best_rows = top_k(np.hstack([best_scores, scores]),
                                           np.hstack([best_rows, np.broadcast_to(chunk, scores.shape)]), k)
        return pad(best_scores, best_rows, k)


def top_k(scores: np.ndarray, keys: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` best columns of each row, best first (ties: smaller key)."""
    if scores.shape[1] > k:
        part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
        scores = np.take_along_axis(scores, part, axis=1)
        keys = np.take_along_axis(keys, part, axis=1)
    order = np.lexsort((keys, -scores), axis=1) if scores.size else np.empty(scores.shape, np.int64)
    return np.take_along_axis(scores, order, axis=1), np.take_along_axis(keys, order, axis=1)


def pad(scores: np.ndarray, keys: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    keys = np.where(np.isfinite(scores), keys, -1)
    missing = k - scores.shape[1]
    if missing > 0:
        scores = np.hstack([scores, np.full((len(scores), missing), -np.inf, np.float32)])
        keys = np.hstack([keys, np.full((len(keys), missing), -1, np.int64)])
    return scores, keys
