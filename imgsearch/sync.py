"""What each file means for an index: the bookkeeping of an update.

:class:`Sync` holds the index's view of paths and contents while an update
runs, decides for each file whether it is unchanged, new, changed, moved or a
duplicate, and gathers the resulting :class:`~imgsearch.store.Changes` until
they are committed.  It never touches pixels or the encoder, so the rules can
be read (and tested) in one place.

The view is not loaded whole: rows are looked up in the store by path,
content hash or id as files come, and kept only until the next commit (the
store then holds them), so memory follows the commit interval, not the
size of the collection.  Every method may be called from any thread.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, replace

import numpy as np

from .store import Alias, Changes, Entry, Store, deferred_signals

_GONE = None  # cached answer: no such row


@dataclass(frozen=True)
class FileFacts:
    path: str
    sha256: str
    size: int
    mtime: float
    label: str | None         # from a labels file: always wins
    folder_label: str | None  # from the folder: only for files new to the index
    width: int = 0
    height: int = 0


def _first(*labels):
    return next((label for label in labels if label is not None), None)


def _locked(method):
    def call(self, *args, **kwargs):
        with self.lock:
            return method(self, *args, **kwargs)

    call.__name__, call.__doc__ = method.__name__, method.__doc__
    return call


class Sync:
    """Pending changes to one store, with the view they imply."""

    def __init__(self, store: Store):
        self.store = store
        self.lock = threading.RLock()
        self.next_id = store.next_id
        self._reset()

    def _reset(self) -> None:
        # What the store says, as far as it was asked, with the pending
        # changes applied: id -> Entry, path -> id, sha256 -> id, path ->
        # Alias, id -> alias paths.  A cached None means "no such row".
        self._entry: dict[int, Entry | None] = {}
        self._id_at: dict[str, int | None] = {}
        self._id_with: dict[str, int | None] = {}
        self._alias: dict[str, Alias | None] = {}
        self._aliases_of: dict[int, set[str]] = {}
        self._added: dict[int, tuple[Entry, np.ndarray]] = {}
        self._replaced: dict[int, tuple[Entry, np.ndarray]] = {}
        self._updated: dict[int, Entry] = {}
        self._removed: set[int] = set()
        self._alias_put: dict[str, Alias] = {}
        self._alias_del: set[str] = set()

    # -- the view: cached lookups ----------------------------------------
    def _remember(self, entry: Entry) -> Entry:
        self._entry.setdefault(entry.id, entry)
        self._id_at.setdefault(entry.path, entry.id)
        self._id_with.setdefault(entry.sha256, entry.id)
        return self._entry[entry.id]

    def _entry_of(self, image_id: int) -> Entry | None:
        if image_id not in self._entry:
            found = self.store.entries_by_id([image_id]).get(image_id)
            self._entry[image_id] = _GONE if found is None else found
            if found is not None:
                self._remember(found)
        return self._entry[image_id]

    def _entry_at(self, path: str) -> Entry | None:
        return self._entry_by(self._id_at, path, self.store.entry_at)

    def _entry_with(self, sha256: str) -> Entry | None:
        return self._entry_by(self._id_with, sha256, self.store.entry_with)

    def _entry_by(self, ids: dict, key: str, look_up) -> Entry | None:
        """The entry under ``key`` (a path or a content hash) in ``ids``,
        asking the store the first time."""
        if key not in ids:
            found = look_up(key)
            if found is None or found.id in self._entry:
                ids[key] = _GONE  # absent, or its cached row has changed since
            else:
                self._remember(found)
        image_id = ids[key]
        return None if image_id is None else self._entry_of(image_id)

    def _alias_at(self, path: str) -> Alias | None:
        if path not in self._alias:
            self._alias[path] = self.store.alias_at(path)
        return self._alias[path]

    def _paths_aliasing(self, image_id: int) -> set[str]:
        if image_id not in self._aliases_of:
            # Stored aliases, less those this update dropped or re-pointed.
            self._aliases_of[image_id] = {
                p for p in self.store.alias_paths_of(image_id)
                if p not in self._alias or (self._alias[p] is not None and self._alias[p].image_id == image_id)}
        return self._aliases_of[image_id]

    # -- questions -------------------------------------------------------
    @_locked
    def known(self, path: str):
        """The entry or alias recorded for ``path``, or None."""
        return self._entry_at(path) or self._alias_at(path)

    @_locked
    def unchanged_on_disk(self, path: str, size: int, mtime: float) -> bool:
        """Same path, size and mtime as recorded: no need to read the file."""
        record = self.known(path)
        return record is not None and record.size == size and record.mtime == mtime

    def sha_of(self, record) -> str:
        return record.sha256 if isinstance(record, Entry) else self._entry_of(record.image_id).sha256

    @_locked
    def needs_pixels(self, path: str, sha256: str) -> bool:
        """Whether a file with this content must be embedded."""
        record = self.known(path)
        if record is not None and self.sha_of(record) == sha256:
            return False
        return self._entry_with(sha256) is None

    @_locked
    def original_of(self, path: str) -> str:
        """The path whose image a duplicate at ``path`` is a copy of."""
        return self._entry_of(self._alias_at(path).image_id).path

    @property
    def pending_vectors(self) -> int:
        return len(self._added) + len(self._replaced)

    def __len__(self) -> int:
        return (len(self._added) + len(self._replaced) + len(self._updated) + len(self._removed)
                + len(self._alias_put) + len(self._alias_del))

    # -- decisions -------------------------------------------------------
    @_locked
    def unchanged(self, path: str, label: str | None) -> bool:
        """A file known by path whose content is the same; relabel it if asked.
        Returns whether the label changed."""
        record = self.known(path)
        if isinstance(record, Alias) and not os.path.exists(self._entry_of(record.image_id).path):
            # The file that carried this picture is gone: a copy takes over.
            self._release(self._entry_of(record.image_id).path)
            record = self.known(path)
        if record is None or label is None or record.label == label:
            return False
        self._put(replace(record, label=label))
        return True

    @_locked
    def add(self, facts: FileFacts, vector: np.ndarray | None) -> str:
        """Record one read file; returns what it was: ``unchanged``,
        ``relabelled``, ``duplicate``, ``moved``, ``changed`` or ``added``.
        ``vector`` is needed only when :meth:`needs_pixels` said so."""
        path, sha = facts.path, facts.sha256
        record = self.known(path)
        if record is not None and self.sha_of(record) == sha:
            # same content (the file was touched or copied back): refresh
            changed_label = facts.label is not None and facts.label != record.label
            fresh = replace(record, size=facts.size, mtime=facts.mtime,
                            label=facts.label if changed_label else record.label)
            if fresh != record:
                self._put(fresh)
            return "relabelled" if changed_label else "unchanged"
        twin = self._entry_with(sha)
        if twin is not None:
            if record is not None:
                self._release(path)
            if not os.path.exists(twin.path):
                # The indexed file is gone and its content turned up here.
                moved = replace(twin, path=path, size=facts.size, mtime=facts.mtime,
                                label=_first(facts.label, facts.folder_label, twin.label))
                self._id_at[twin.path] = _GONE
                self._id_at[path] = twin.id
                self._put(moved)
                return "moved"
            self._put(Alias(path, twin.id, facts.size, facts.mtime, _first(facts.label, facts.folder_label)))
            return "duplicate"
        if vector is None:
            raise ValueError(f"{path} holds new content and needs a vector")
        if isinstance(record, Entry) and self._paths_aliasing(record.id):
            # Copies of the old content remain: one of them keeps the old id
            # and vector, and the new content becomes an image of its own.
            self._release(path)
            record = None
        if isinstance(record, Entry):
            # New content at a known path: same id, new vector.
            entry = Entry(record.id, path, sha, facts.size, facts.mtime,
                          _first(facts.label, record.label), facts.width, facts.height)
            self._id_with[record.sha256] = _GONE
            self._id_with[sha] = record.id
            self._entry[record.id] = entry
            self._updated.pop(record.id, None)
            if record.id in self._added:
                self._added[record.id] = (entry, vector)
            else:
                self._replaced[record.id] = (entry, vector)
            return "changed"
        label = _first(facts.label, record.label if record else None, facts.folder_label)
        if record is not None:  # an alias whose file now holds new content
            self._release(path)
        entry = Entry(self.next_id, path, sha, facts.size, facts.mtime, label, facts.width, facts.height)
        self.next_id += 1
        self._entry[entry.id] = entry
        self._id_at[path] = entry.id
        self._id_with[sha] = entry.id
        self._aliases_of[entry.id] = set()
        self._added[entry.id] = (entry, vector)
        return "added"

    @_locked
    def drop(self, path: str) -> str | None:
        """Forget ``path``; returns ``removed``, ``promoted`` (an alias now
        carries the vector), ``unaliased`` or None when it was not indexed."""
        record = self.known(path)
        if record is None:
            return None
        return self._release(path)

    def _release(self, path: str) -> str:
        record = self.known(path)
        if isinstance(record, Alias):
            self._alias[path] = _GONE
            self._paths_aliasing(record.image_id).discard(path)
            self._alias_put.pop(path, None)
            self._alias_del.add(path)
            return "unaliased"
        image_id = record.id
        self._id_at[path] = _GONE
        others = sorted(self._paths_aliasing(image_id))
        if others:
            # Another path holds the same picture: it takes over the vector.
            heir = self._alias_at(others[0])
            self._alias[heir.path] = _GONE
            self._paths_aliasing(image_id).discard(heir.path)
            self._alias_put.pop(heir.path, None)
            self._alias_del.add(heir.path)
            promoted = replace(record, path=heir.path, size=heir.size, mtime=heir.mtime,
                               label=heir.label if heir.label is not None else record.label)
            self._id_at[heir.path] = image_id
            self._put(promoted)
            return "promoted"
        self._entry[image_id] = _GONE
        self._id_with[record.sha256] = _GONE
        self._aliases_of.pop(image_id, None)
        self._updated.pop(image_id, None)
        self._replaced.pop(image_id, None)
        if self._added.pop(image_id, None) is None:
            self._removed.add(image_id)
        return "removed"

    def _put(self, record) -> None:
        if isinstance(record, Alias):
            self._alias[record.path] = record
            self._paths_aliasing(record.image_id).add(record.path)
            self._alias_del.discard(record.path)
            self._alias_put[record.path] = record
            return
        self._entry[record.id] = record
        if record.id in self._added:
            self._added[record.id] = (record, self._added[record.id][1])
        elif record.id in self._replaced:
            self._replaced[record.id] = (record, self._replaced[record.id][1])
        else:
            self._updated[record.id] = record

    # -- committing ------------------------------------------------------
    @_locked
    def commit(self) -> None:
        """Write everything pending to the store in one atomic commit; the
        store then answers for it, so the cached view is dropped."""
        if not len(self):
            return
        added = list(self._added.values())
        replaced = list(self._replaced.values())
        # Ctrl-C must not fall between the store's commit and forgetting what
        # it committed, or the same changes would be applied twice.
        with deferred_signals():
            self.store.commit(Changes(
                added=[e for e, _ in added],
                replaced=[e for e, _ in replaced],
                vectors=[v for _, v in added + replaced],
                updated=list(self._updated.values()),
                removed=sorted(self._removed),
                aliases=list(self._alias_put.values()),
                unaliased=sorted(self._alias_del),
            ))
            self._reset()
