"""The page of near-duplicate groups (``imgsearch dupes --html``)."""

from __future__ import annotations

from .. import __version__
from . import render
from .thumbnails import Thumbnails


def dupes_page(groups, index, threshold: float, thumbnails: Thumbnails | None = None) -> str:
    thumbnails = thumbnails or Thumbnails(formats=index.formats)
    return render("dupes.html", title="imgsearch dupes", groups=groups, threshold=threshold,
                  paths=sum(g.size for g in groups), thumb=thumbnails, size=thumbnails.size,
                  index_path=str(index.store.directory), encoder=index.store.manifest["encoder"]["name"],
                  version=__version__)
