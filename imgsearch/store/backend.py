"""Where an index's vectors live: one small interface, and the registry of
the places that implement it.

The metadata (SQLite) always stays in the index folder: it is the record of
what was embedded, and its transaction is the commit point.  A backend holds
one vector per live image, keyed by the image's stable int64 id, and takes
part in each commit in four steps:

``stage``
    before the metadata transaction: write the new vectors where they live.
    A remote backend must make this idempotent (an upsert by id), since a
    crash right after it leaves vectors the metadata does not know yet.
``record``
    inside the transaction: note in SQLite what ``finish`` still has to do,
    so that a crash after the transaction is finished by the next writer.
``finish``
    after the transaction stands (e.g. delete the removed ids remotely).
``abandon``
    when the transaction failed: undo what ``stage`` did, as far as it can.

Searching (all vectors, or only those of given ids), reading vectors back, building the approximate index (same
automatic choice and recall target for every backend, see :mod:`.ann`),
checking (``verify``) and describing it (``info``) complete the interface.

The local store (segment files plus a FAISS index, :mod:`.store`) is the
backend named ``faiss``; others are plugins registered under the
entry-point group ``imgsearch.backends``, exactly as encoders are: the
group's modules define ``register_backends(register)`` and call
``register(BackendClass)``.  The Milvus backend in ``plugins/`` is one.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from ..errors import PluginError, UsageError

logger = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "imgsearch.backends"
HOOK_NAME = "register_backends"
DEFAULT = "faiss"
RANGE_FIRST_K = 16  # the first k a range search asks :meth:`VectorBackend.search` for


@dataclass
class Staged:
    """What one commit's ``stage`` did, handed to its other steps."""

    ids: np.ndarray                      # ids that got a (new) vector
    removed: np.ndarray                  # ids whose vector goes away
    home: dict[int, int] = field(default_factory=dict)  # replaced or removed id -> its segment
    segment: int = 0                     # what the metadata rows of new vectors name
    data: Any = None                     # the backend's own


class VectorBackend(ABC):
    """Vectors keyed by stable int64 ids, for one open :class:`~.store.Store`.

    ``options`` are the backend's command-line settings for a new index
    (e.g. ``{"uri": ..., "collection": ...}``); what :meth:`create` returns
    is recorded in the manifest under ``"backend"`` and handed back to the
    constructor when the index is opened again.
    """

    name: ClassVar[str]
    description: ClassVar[str] = ""

    def __init__(self, store, record: dict):
        self.store = store
        self.record_ = record

    # -- lifecycle --------------------------------------------------------
    @classmethod
    def create(cls, directory: Path, dim: int, options: dict) -> dict:
        """Prepare a place for the vectors of a new index at ``directory``
        (nothing is written there yet); returns the manifest record."""
        return {"name": cls.name}

    def discard(self) -> None:
        """Remove what :meth:`create` made (a new index that stayed empty)."""

    def close(self) -> None:
        """Release connections; the store closes its own files."""

    @property
    def local(self) -> bool:
        """Whether the vectors live in the index folder itself."""
        return False

    # -- committing (see the module's description) ---------------------------
    @abstractmethod
    def stage(self, staged: Staged, vectors: np.ndarray) -> None: ...

    def record(self, db, staged: Staged) -> None:
        """Inside the metadata transaction (``db`` is its connection)."""

    def finish(self, staged: Staged) -> None:
        """After the metadata transaction stands."""

    def abandon(self, staged: Staged) -> None:
        """The metadata transaction failed."""

    def segments_after(self, staged: Staged) -> int:
        """Vector files in the index folder once the commit stands (the
        manifest's ``segments``)."""
        return 0

    def clean_up(self) -> None:
        """A writer's first act: finish what an interrupted commit left
        undone (``record`` noted it) and undo what it did too early (strays
        a ``stage`` wrote for a commit that never stood)."""

    # -- reading ------------------------------------------------------------
    @abstractmethod
    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Scores and ids ``(n, k)`` by inner product, best first; where
        fewer than ``k`` are found, scores ``-inf`` and ids ``-1``."""

    def search_among(self, queries: np.ndarray, k: int, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """As :meth:`search`, but only the vectors of ``ids`` (sorted,
        unique, all live) may answer: ``classify`` and ``evaluate`` vote
        among labelled images only.  This default reads those vectors and
        searches them exactly, a chunk at a time; a backend should override
        it with a filtered search of its own."""
        from .segments import pad, top_k

        best = np.full((len(queries), 0), -np.inf, np.float32)
        best_ids = np.full((len(queries), 0), -1, np.int64)
        for start in range(0, len(ids), 16384):
            chunk = np.asarray(ids[start:start + 16384], dtype=np.int64)
            scores = queries @ self.vectors(chunk).T
            best, best_ids = top_k(np.hstack([best, scores]),
                                   np.hstack([best_ids, np.broadcast_to(chunk, scores.shape)]), k)
        return pad(best, best_ids, k)

    @abstractmethod
    def vectors(self, ids: np.ndarray) -> np.ndarray:
        """The stored vectors of ``ids``; KeyError names one that has none."""

    def range_search(self, queries: np.ndarray, threshold: float) -> list[tuple[np.ndarray, np.ndarray]]:
        """Every stored vector whose inner product with a query reaches
        ``threshold``: for each query, scores and ids, best first.

        This default serves any backend through :meth:`search`: k nearest
        with k doubled, for the queries whose k-th neighbour still reaches
        the threshold, until none does.  Near-duplicate groups are small,
        so nearly every query settles at the first k.  Its recall is that
        of :meth:`search` (exact, or the approximate index's)."""
        count = self.store.count
        found: list[tuple[np.ndarray, np.ndarray]] = [None] * len(queries)  # type: ignore[list-item]
        pending = np.arange(len(queries))
        k = min(RANGE_FIRST_K, count)
        while len(pending) and k > 0:
            scores, ids = self.search(np.ascontiguousarray(queries[pending]), k)
            settled = (k >= count) | (scores[:, -1] < threshold) | (ids[:, -1] < 0)
            for row in np.flatnonzero(settled):
                keep = (scores[row] >= threshold) & (ids[row] >= 0)
                found[pending[row]] = (scores[row][keep], ids[row][keep])
            pending = pending[~settled]
            k = min(2 * k, count)
        for row in pending:  # only with an empty backend
            found[row] = (np.empty(0, np.float32), np.empty(0, np.int64))
        return found

    # -- upkeep ---------------------------------------------------------------
    @abstractmethod
    def due(self) -> tuple[str, str] | None:
        """``("optimize", why)`` when the approximate index should be
        (re)built now, ``("compact", why)`` for cheaper upkeep, or None."""

    @abstractmethod
    def optimize(self, *, index_type=None, target_recall=None, max_memory=None, force=False, seed=0,
                 progress=None):
        """Build (or rebuild) the approximate index chosen as :mod:`.ann`
        says, tuned to the target recall; returns an OptimizeReport."""

    @abstractmethod
    def verify(self, progress=None) -> tuple[list[str], list[str]]:
        """Problems and notes: do the stored vectors match the metadata rows
        exactly (no id missing, none extra), and are they sound?"""

    def repair(self) -> list[str]:
        """Mend what :meth:`verify` finds where that is possible; returns
        what was done, one line each."""
        return []

    def describe(self) -> dict:
        """Facts for ``info`` beyond the manifest's approximate-index record."""
        return {"backend": self.name}


# -- the registry ------------------------------------------------------------
_registry: dict[str, tuple[type, str]] | None = None


def _register(found: dict, backend_cls, source: str) -> None:
    if not isinstance(backend_cls, type) or not issubclass(backend_cls, VectorBackend):
        raise PluginError(f"{source} registered {backend_cls!r}, which is not a VectorBackend subclass")
    name = getattr(backend_cls, "name", None)
    if not name:
        raise PluginError(f"{source}: backend {backend_cls.__name__} has no name")
    if name in found:
        raise PluginError(f"backend name {name!r} is claimed by two plugins: {found[name][1]} and {source}")
    found[name] = (backend_cls, source)


def registry() -> dict[str, tuple[type, str]]:
    """Backend classes by name with where they came from: the local store,
    then every installed plugin (loaded once, on first use)."""
    global _registry
    if _registry is None:
        from .store import LocalBackend

        found: dict[str, tuple[type, str]] = {}
        _register(found, LocalBackend, "imgsearch")
        for ep in sorted(entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
            source = f"{ep.dist.name if ep.dist is not None else 'unknown package'} ({ep.value})"
            try:
                module = ep.load()
            except Exception as exc:  # a broken plugin must not hide the others
                raise PluginError(f"backend plugin {source} failed to load: {exc}") from exc
            hook = getattr(module, HOOK_NAME, None)
            if not callable(hook):
                raise PluginError(f"{source} has no {HOOK_NAME}(register) function")
            hook(lambda cls, source=source: _register(found, cls, source))
        _registry = found
    return _registry


def get(name: str) -> type:
    """The backend class called ``name``, or a one-line error naming the others."""
    found = registry()
    if name not in found:
        raise UsageError(f"unknown backend {name!r}; registered backends: {', '.join(sorted(found))}")
    return found[name][0]


def reset() -> None:
    """Forget the loaded plugins (tests register their own)."""
    global _registry
    _registry = None
