"""Files and folders the user asks us to write results to, checked before
any work: a wrong place should cost a second, not the whole evaluation
first, and no output ever lands inside an index folder."""

from __future__ import annotations

import os
from pathlib import Path

from .errors import UsageError


def inside(path, folder) -> bool:
    """Whether ``path`` is ``folder`` or lies under it (links resolved):
    output never goes into an index folder."""
    real, root = os.path.realpath(path), os.path.realpath(folder)
    return real == root or real.startswith(root.rstrip(os.sep) + os.sep)


def _outside_index(path, option: str, index_dir) -> None:
    if index_dir is not None and inside(path, index_dir):
        raise UsageError(f"{option} {path} is inside the index folder; choose another place")


def check_output_file(path, option: str, index_dir=None) -> Path:
    """The absolute path of a file to write, or :class:`UsageError` (naming
    ``option``) for a folder, a missing or read-only parent folder, or a
    place inside the index folder (whose files are never written over)."""
    target = Path(os.path.abspath(os.path.expanduser(path)))
    if target.is_dir():
        raise UsageError(f"{option} {path} is a folder; give a file name")
    if not target.parent.is_dir():
        raise UsageError(f"{option} {path}: folder {target.parent} does not exist")
    if not os.access(target.parent, os.W_OK) or (target.exists() and not os.access(target, os.W_OK)):
        raise UsageError(f"{option} {path}: permission denied")
    _outside_index(target, option, index_dir)
    return target


def check_output_folder(folder, option: str, index_dir=None) -> None:
    """Raise :class:`UsageError` (naming ``option``) unless ``folder`` is a
    folder we can write in, or one we can create, outside the index folder.
    Nothing is created."""
    target = Path(os.path.abspath(os.path.expanduser(folder)))
    _outside_index(target, option, index_dir)
    if target.exists():
        if not target.is_dir():
            raise UsageError(f"{option} {folder} exists and is not a folder")
        if not os.access(target, os.W_OK | os.X_OK):
            raise UsageError(f"{option} {folder}: permission denied")
        return
    parent = target.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise UsageError(f"{option} {folder} cannot be created: {parent} is not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"{option} {folder} cannot be created in {parent}: permission denied")
