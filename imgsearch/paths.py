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


# A folder of this name holding an index is found from the current folder
# or any above it, as git finds its repository.
PROJECT_INDEX = ".imgsearch"


def data_dir() -> Path:
    """The user data folder (``IMGSEARCH_DATA_DIR`` overrides the platform's)."""
    override = os.environ.get("IMGSEARCH_DATA_DIR")
    if override:
        return Path(override).expanduser()
    from platformdirs import user_data_dir

    return Path(user_data_dir("imgsearch"))


def default_index() -> tuple[Path, str]:
    """The index used when none is named, and how it was found: a
    ``.imgsearch`` index in the current folder or the nearest folder above
    it, else the per-user one (``<data dir>/index``)."""
    from .store import Store

    here = Path.cwd()
    for folder in (here, *here.parents):
        if Store.exists(folder / PROJECT_INDEX):
            return folder / PROJECT_INDEX, f"found in {folder}"
    return data_dir() / "index", "the per-user default"
