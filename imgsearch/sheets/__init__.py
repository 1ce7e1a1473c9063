"""Self-contained HTML pages of results: contact sheets of queries and
classifications, evaluation reports, groups of near-duplicates.

Each page is one file a person can open, mail or archive: its thumbnails
are embedded as data URIs and its style sheet inline, so it references
nothing outside itself (no network, no other files).  The pages are Jinja2
templates kept beside this module as package data, rendered with
autoescaping: a path or label can never inject markup.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import UsageError
from .thumbnails import Thumbnails

__all__ = ["Thumbnails", "render", "write_page"]


def _environment():
    from jinja2 import Environment, PackageLoader, StrictUndefined, select_autoescape

    env = Environment(loader=PackageLoader("imgsearch.sheets", "templates"),
                      autoescape=select_autoescape(["html"], default=True), undefined=StrictUndefined,
                      trim_blocks=True, lstrip_blocks=True)
    env.filters["score"] = lambda value, places=4: f"{value:.{places}f}"
    return env


def render(template: str, **context) -> str:
    """One page from its template (a file name under ``templates/``)."""
    return _environment().get_template(template).render(**context)


def write_page(path, page: str) -> Path:
    """Write a page whole or not at all (a temporary file renamed over it),
    so an interruption never leaves half a page under the name."""
    target = Path(path)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(page, encoding="utf-8")
        os.replace(tmp, target)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise UsageError(f"cannot write {path}: {exc.strerror or exc}") from None
    return target
