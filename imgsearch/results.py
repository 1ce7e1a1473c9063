"""The JSON shapes of results, one place for the CLI's ``--format json``
and the web API, so that both speak alike.  Light on purpose: the CLI
imports it before any model or index is loaded."""

from __future__ import annotations


def hit_rows(hits, extra=None) -> list[dict]:
    """``{"rank", "path", "score", "label"}`` per hit, best first, with
    ``also_at`` (identical files, stored once) when there are any;
    ``extra(hit)`` may add fields (the web API adds ids and thumbnails)."""
    rows = []
    for rank, hit in enumerate(hits, start=1):
        row = {"rank": rank, "path": hit.entry.path, "score": round(hit.score, 6), "label": hit.entry.label}
        if hit.also_at:
            row["also_at"] = list(hit.also_at)
        if extra is not None:
            row.update(extra(hit))
        rows.append(row)
    return rows


def query_json(result, extra=None) -> dict:
    """One line of ``query --format json``."""
    return {"query": result.query, "results": hit_rows(result.hits, extra)}


def classification_json(result, extra=None) -> dict:
    """One line of ``classify --format json``."""
    return {"path": result.path, "label": result.label, "confidence": round(result.confidence, 6),
            "neighbors": hit_rows(result.neighbours, extra)}
