"""What each file means for an index: the bookkeeping of an update.

:class:`Sync` holds the index's view of paths and contents while an update
runs, decides for each file whether it is unchanged, new, changed, moved or a
duplicate, and gathers the resulting :class:`~imgsearch.store.Changes` until
they are committed.  It never touches pixels or the encoder, so the rules can
be read (and tested) in one place.
"""

from __future__ import annotations

import os
from collections import defaultdict
from dataclasses import dataclass, replace

import numpy as np

from .store import Alias, Changes, Entry, Store, deferred_signals


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


class Sync:
    """Pending changes to one store, with the view they imply."""

    def __init__(self, store: Store):
        self.store = store
        self.entries: dict[int, Entry] = {e.id: e for e in store.entries()}
        self.id_of_path = {e.path: e.id for e in self.entries.values()}
        self.id_of_sha = {e.sha256: e.id for e in self.entries.values()}
        self.alias: dict[str, Alias] = {a.path: a for a in store.aliases()}
        self.aliases_of: dict[int, set[str]] = defaultdict(set)
        for a in self.alias.values():
            self.aliases_of[a.image_id].add(a.path)
        self.next_id = store.next_id
        self._reset()

    def _reset(self) -> None:
        self._added: dict[int, tuple[Entry, np.ndarray]] = {}
        self._replaced: dict[int, tuple[Entry, np.ndarray]] = {}
        self._updated: dict[int, Entry] = {}
        self._removed: set[int] = set()
        self._alias_put: dict[str, Alias] = {}
        self._alias_del: set[str] = set()

    # -- questions -------------------------------------------------------
    def known(self, path: str):
        """The entry or alias recorded for ``path``, or None."""
        if path in self.id_of_path:
            return self.entries[self.id_of_path[path]]
        return self.alias.get(path)

    def unchanged_on_disk(self, path: str, size: int, mtime: float) -> bool:
        """Same path, size and mtime as recorded: no need to read the file."""
        record = self.known(path)
        return record is not None and record.size == size and record.mtime == mtime

    def sha_of(self, record) -> str:
        return record.sha256 if isinstance(record, Entry) else self.entries[record.image_id].sha256

    def needs_pixels(self, path: str, sha256: str) -> bool:
        """Whether a file with this content must be embedded."""
        record = self.known(path)
        if record is not None and self.sha_of(record) == sha256:
            return False
        return sha256 not in self.id_of_sha

    @property
    def pending_vectors(self) -> int:
        return len(self._added) + len(self._replaced)

    def __len__(self) -> int:
        return (len(self._added) + len(self._replaced) + len(self._updated) + len(self._removed)
                + len(self._alias_put) + len(self._alias_del))

    # -- decisions -------------------------------------------------------
    def unchanged(self, path: str, label: str | None) -> bool:
        """A file known by path whose content is the same; relabel it if asked.
        Returns whether the label changed."""
        record = self.known(path)
        if isinstance(record, Alias) and not os.path.exists(self.entries[record.image_id].path):
            # The file that carried this picture is gone: a copy takes over.
            self._release(self.entries[record.image_id].path)
            record = self.known(path)
        if record is None or label is None or record.label == label:
            return False
        self._put(replace(record, label=label))
        return True

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
        twin_id = self.id_of_sha.get(sha)
        if twin_id is not None:
            twin = self.entries[twin_id]
            if record is not None:
                self._release(path)
            if not os.path.exists(twin.path):
                # The indexed file is gone and its content turned up here.
                moved = replace(twin, path=path, size=facts.size, mtime=facts.mtime,
                                label=_first(facts.label, facts.folder_label, twin.label))
                del self.id_of_path[twin.path]
                self.id_of_path[path] = twin_id
                self._put(moved)
                return "moved"
            self._put(Alias(path, twin_id, facts.size, facts.mtime, _first(facts.label, facts.folder_label)))
            return "duplicate"
        if vector is None:
            raise ValueError(f"{path} holds new content and needs a vector")
        if isinstance(record, Entry) and self.aliases_of.get(record.id):
            # Copies of the old content remain: one of them keeps the old id
            # and vector, and the new content becomes an image of its own.
            self._release(path)
            record = None
        if isinstance(record, Entry):
            # New content at a known path: same id, new vector.
            entry = Entry(record.id, path, sha, facts.size, facts.mtime,
                          _first(facts.label, record.label), facts.width, facts.height)
            del self.id_of_sha[record.sha256]
            self.id_of_sha[sha] = record.id
            self.entries[record.id] = entry
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
        self.entries[entry.id] = entry
        self.id_of_path[path] = entry.id
        self.id_of_sha[sha] = entry.id
        self._added[entry.id] = (entry, vector)
        return "added"

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
            del self.alias[path]
            self.aliases_of[record.image_id].discard(path)
            self._alias_put.pop(path, None)
            self._alias_del.add(path)
            return "unaliased"
        image_id = record.id
        del self.id_of_path[path]
        others = sorted(self.aliases_of.get(image_id, ()))
        if others:
            # Another path holds the same picture: it takes over the vector.
            heir = self.alias.pop(others[0])
            self.aliases_of[image_id].discard(heir.path)
            self._alias_put.pop(heir.path, None)
            self._alias_del.add(heir.path)
            promoted = replace(record, path=heir.path, size=heir.size, mtime=heir.mtime,
                               label=heir.label if heir.label is not None else record.label)
            self.id_of_path[heir.path] = image_id
            self._put(promoted)
            return "promoted"
        del self.entries[image_id]
        del self.id_of_sha[record.sha256]
        self.aliases_of.pop(image_id, None)
        self._updated.pop(image_id, None)
        self._replaced.pop(image_id, None)
        if self._added.pop(image_id, None) is None:
            self._removed.add(image_id)
        return "removed"

    def _put(self, record) -> None:
        if isinstance(record, Alias):
            self.alias[record.path] = record
            self.aliases_of[record.image_id].add(record.path)
            self._alias_del.discard(record.path)
            self._alias_put[record.path] = record
            return
        self.entries[record.id] = record
        if record.id in self._added:
            self._added[record.id] = (record, self._added[record.id][1])
        elif record.id in self._replaced:
            self._replaced[record.id] = (record, self._replaced[record.id][1])
        else:
            self._updated[record.id] = record

    # -- committing ------------------------------------------------------
    def commit(self) -> None:
        """Write everything pending to the store in one atomic commit."""
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
