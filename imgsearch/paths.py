"""Where imgsearch keeps files of its own outside an index."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """The user cache folder (``IMGSEARCH_CACHE_DIR`` overrides the platform's)."""
    override = os.environ.get("IMGSEARCH_CACHE_DIR")
    if override:
        return Path(override).expanduser()
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("imgsearch"))
