"""The on-disk index: SQLite metadata, immutable vector segments, and an
approximate index over the merged part (see :mod:`.store`)."""

from .files import LOCK_FILE, deferred_signals
from .merge import OptimizeReport, compact, compaction_due, due, optimize
from .store import (FORMAT_VERSION, MANIFEST_FILE, METADATA_FILE, Alias, Changes, Entry, Hit, Store)

__all__ = [
    "FORMAT_VERSION", "LOCK_FILE", "MANIFEST_FILE", "METADATA_FILE", "Alias", "Changes", "Entry", "Hit",
    "OptimizeReport", "Store", "compact", "compaction_due", "deferred_signals", "due", "optimize",
]
