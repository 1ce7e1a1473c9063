"""Folders the user asks us to write results to, checked before any work:
a wrong place should cost a second, not the whole evaluation first."""

from __future__ import annotations

import os
from pathlib import Path

from .errors import UsageError


def check_output_folder(folder, option: str) -> None:
    """Raise :class:`UsageError` (naming ``option``) unless ``folder`` is a
    folder we can write in, or one we can create.  Nothing is created."""
    target = Path(os.path.abspath(os.path.expanduser(folder)))
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
