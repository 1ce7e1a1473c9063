"""Small JPEG previews of image files, as data URIs to embed in a page."""

from __future__ import annotations

import base64
import io
from pathlib import Path

from .. import images as imgs

SIZE = 160          # longest side, in pixels
QUALITY = 80


class Thumbnails:
    """Previews by path, each made once (a picture can appear on a page
    many times: as a query, as a neighbour of several queries).

    A file that cannot be shown (gone since it was indexed, unreadable,
    too large) gets no preview, and the reason is kept for the page: one
    bad file never costs the whole page.
    """

    def __init__(self, size: int = SIZE, formats=None):
        self.size = size
        # Whatever an index was built from: previews never refuse a format
        # the user asked imgsearch to read.
        self.formats = tuple(formats or imgs.DEFAULT_FORMATS)
        self._made: dict[str, tuple[str | None, str | None]] = {}

    def __call__(self, path) -> str | None:
        """The data URI of a preview of ``path``, or None."""
        return self._get(path)[0]

    def reason(self, path) -> str | None:
        """Why ``path`` has no preview (None when it has one)."""
        return self._get(path)[1]

    def _get(self, path) -> tuple[str | None, str | None]:
        key = str(path)
        if key not in self._made:
            self._made[key] = self._make(Path(key))
        return self._made[key]

    def _make(self, path: Path) -> tuple[str | None, str | None]:
        try:
            # Drafted at twice the preview size: a camera JPEG decodes at a
            # fraction of its pixels and still downsamples cleanly.
            image = imgs.decode(imgs.read_bytes(path), draft_size=(2 * self.size, 2 * self.size),
                                formats=self.formats)
        except imgs.DecodeError as exc:
            return None, str(exc)
        image.thumbnail((self.size, self.size))
        out = io.BytesIO()
        image.save(out, format="JPEG", quality=QUALITY)
        return "data:image/jpeg;base64," + base64.b64encode(out.getvalue()).decode("ascii"), None
