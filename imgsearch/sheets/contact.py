"""Contact sheets: each query image beside its nearest indexed images."""

from __future__ import annotations

from .. import __version__
from . import render
from .thumbnails import SIZE, Thumbnails


def _hits(hits) -> list[dict]:
    # The same numbers as the CLI's JSON (scores to 6 places), so a page and
    # the JSON of one run can be checked against each other.
    return [{"rank": rank, "path": hit.entry.path, "score": round(hit.score, 6), "label": hit.entry.label,
             "also_at": list(hit.also_at)} for rank, hit in enumerate(hits, start=1)]


def _page(title: str, rows: list[dict], index, thumbnails: Thumbnails | None) -> str:
    thumbnails = thumbnails or Thumbnails(formats=index.formats)
    manifest = index.store.manifest
    return render("sheet.html", title=title, rows=rows, thumb=thumbnails, size=thumbnails.size,
                  index_path=str(index.store.directory), encoder=manifest["encoder"]["name"],
                  version=__version__)


def query_sheet(results, index, thumbnails: Thumbnails | None = None) -> str:
    """A page of :meth:`Index.query` results."""
    rows = [{"query": r.query, "label": None, "confidence": None, "verdict": None,
             "hits": _hits(r.hits)} for r in results]
    return _page("imgsearch query", rows, index, thumbnails)


def classify_sheet(results, index, thumbnails: Thumbnails | None = None) -> str:
    """A page of :meth:`Index.classify` results: each image's label and
    confidence, beside the neighbours that voted."""
    rows = [{"query": r.path, "label": r.label, "confidence": round(r.confidence, 6),
             "verdict": "no labelled neighbours" if r.label is None else f"confidence {r.confidence:.3f}",
             "hits": _hits(r.neighbours)} for r in results]
    return _page("imgsearch classify", rows, index, thumbnails)


__all__ = ["SIZE", "classify_sheet", "query_sheet"]
