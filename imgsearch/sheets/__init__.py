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

__all__ = ["Thumbnails", "check_output", "render", "write_page"]


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


def check_output(path, index_dir=None) -> Path:
    """Refuse a page path that cannot be written, before any long work: a
    folder, a missing or read-only parent folder, or a place inside the
    index folder (whose files are never written over)."""
    target = Path(os.path.abspath(path))
    if target.is_dir():
        raise UsageError(f"--html {path} is a folder; give a file name such as results.html")
    if not target.parent.is_dir():
        raise UsageError(f"--html {path}: folder {target.parent} does not exist")
    if not os.access(target.parent, os.W_OK) or (target.exists() and not os.access(target, os.W_OK)):
        raise UsageError(f"--html {path}: permission denied")
    if index_dir is not None and inside(target, index_dir):
        raise UsageError(f"--html {path} is inside the index folder; choose another place")
    return target


def inside(path, folder) -> bool:
    """Whether ``path`` is ``folder`` or lies under it (links resolved):
    output never goes into an index folder."""
    real, root = os.path.realpath(path), os.path.realpath(folder)
    return real == root or real.startswith(root.rstrip(os.sep) + os.sep)


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
