"""Thumbnails of indexed images, made on demand and kept in memory.

A thumbnail is made only from the file an index row names, and only while
that file still holds what was indexed: a regular file of the recorded
size whose bytes hash to the recorded SHA-256.  A file replaced since (by
another picture, a link to some other file, a folder, a pipe) gives no
thumbnail, so the page never shows a file that is not an indexed image,
whatever happens to the folders after indexing.
"""

from __future__ import annotations

import collections
import io
import os
import stat

from .. import images as imgs
from ..hashing import sha256_bytes
from ..store import Entry

THUMBNAIL_SIDE = 256
JPEG_QUALITY = 85
# Some 5,000 thumbnails of about 12 KiB: the pages a person looks through.
DEFAULT_CACHE_BYTES = 64 * 1024 * 1024


class NotIndexedContent(Exception):
    """The file of an index row is gone or no longer holds the indexed image."""


def read_indexed(entry: Entry) -> bytes:
    """The bytes of an indexed image's file, or :class:`NotIndexedContent`."""
    changed = NotIndexedContent(f"image {entry.id} is not on disk as it was indexed (moved, removed or "
                                "changed since; run 'imgsearch index' again)")
    try:
        # Non-blocking: a pipe put in the file's place must not hang the reader.
        fd = os.open(entry.path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError:
        raise changed from None
    with os.fdopen(fd, "rb") as handle:
        facts = os.fstat(fd)
        if not stat.S_ISREG(facts.st_mode) or facts.st_size != entry.size:
            raise changed
        data = handle.read(entry.size + 1)
    if len(data) != entry.size or sha256_bytes(data) != entry.sha256:
        raise changed
    return data


def render(opened: imgs.Opened, side: int = THUMBNAIL_SIDE) -> bytes:
    """An opened image (see :func:`imgsearch.images.open_image`, with a
    draft size of ``(side, side)``) as a JPEG that fits a ``side`` square,
    upright as the index saw it."""
    from PIL import Image

    image, _ = imgs.finish(opened, max_megapixels=imgs.DEFAULT_MAX_MEGAPIXELS)
    image.thumbnail((side, side), Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=JPEG_QUALITY)
    return buffer.getvalue()


class ThumbnailCache:
    """Thumbnails by (id, content hash), least recently used dropped first
    once they hold more than ``max_bytes``.  Used from one thread (the
    server's event loop)."""

    def __init__(self, max_bytes: int = DEFAULT_CACHE_BYTES):
        self.max_bytes = max_bytes
        self.bytes = 0
        self._items: collections.OrderedDict[tuple[int, str], bytes] = collections.OrderedDict()

    def get(self, key: tuple[int, str]) -> bytes | None:
        data = self._items.get(key)
        if data is not None:
            self._items.move_to_end(key)
        return data

    def put(self, key: tuple[int, str], data: bytes) -> None:
        if key in self._items:
            return
        self._items[key] = data
        self.bytes += len(data)
        while self.bytes > self.max_bytes and self._items:
            _, dropped = self._items.popitem(last=False)
            self.bytes -= len(dropped)

    def __len__(self) -> int:
        return len(self._items)
