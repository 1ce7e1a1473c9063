"""Near-duplicate images in an index: groups of pictures of one photo
(resized, recompressed, cropped a little, mirrored), found by a range
search of every stored vector against the index itself.

Identical files are already stored once (the other paths are aliases of
the image), so they need no search: each image's aliases are listed with
it as exact copies, and an image with aliases alone forms a group too.

A group is what single linkage makes of the pairs found: every member is
within the threshold of at least one other member.  Each member's score is
its cosine to the group's first member, the one with the most pixels (the
likely original); the others follow, closest first.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import UsageError
from .store import Entry, Store

# Chosen on the planted imagenette corpus of benchmarks/bench_dupes.py with
# efficientnet-lite0 (see the README's "Near-duplicates" table).
DEFAULT_THRESHOLD = 0.9
BATCH = 1024  # stored vectors searched at a time


@dataclass(frozen=True)
class Member:
    entry: Entry
    score: float                 # cosine to the group's first member
    copies: tuple[str, ...] = ()  # exact copies: other paths with the same content


@dataclass(frozen=True)
class Group:
    members: tuple[Member, ...]

    @property
    def size(self) -> int:
        """Paths in the group, exact copies included."""
        return sum(1 + len(m.copies) for m in self.members)


class _Components:
    """Union-find over image ids."""

    def __init__(self):
        self.parent: dict[int, int] = {}

    def find(self, item: int) -> int:
        root = self.parent.setdefault(item, item)
        while root != self.parent[root]:
            root = self.parent[root]
        while item != root:  # path compression
            self.parent[item], item = root, self.parent[item]
        return root

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)

    def groups(self) -> list[list[int]]:
        found: dict[int, list[int]] = {}
        for item in self.parent:
            found.setdefault(self.find(item), []).append(item)
        return [sorted(members) for members in found.values()]


def check_threshold(threshold: float) -> float:
    threshold = float(threshold)
    if not (0 < threshold <= 1):
        raise UsageError(f"the threshold is a cosine similarity above 0 and at most 1, not {threshold:g}")
    return threshold


def pairs(store: Store, threshold: float, *, batch: int = BATCH, progress=None):
    """Every pair of distinct images ``(id, id, cosine)`` with cosine at
    least ``threshold``, each once (smaller id first)."""
    with store.reading():  # ids and vectors of one commit
        return _pairs(store, check_threshold(threshold), batch, progress)


def _pairs(store: Store, threshold: float, batch: int, progress):
    ids = store.ids()
    found = []
    for start in range(0, len(ids), batch):
        chunk = ids[start:start + batch]
        for query, (scores, near) in zip(chunk, store.range_search(store.vectors(chunk), threshold)):
            keep = near > query  # each pair once, and never the image itself
            found.extend(zip([int(query)] * int(keep.sum()), near[keep].tolist(), scores[keep].tolist()))
        if progress:
            progress(min(start + batch, len(ids)), len(ids))
    return found


def find(store: Store, threshold: float = DEFAULT_THRESHOLD, *, progress=None) -> list[Group]:
    """The groups of near-duplicate and identical images, largest first."""
    threshold = check_threshold(threshold)
    with store.reading():  # ids, vectors and aliases of one commit
        components = _Components()
        for a, b, _ in _pairs(store, threshold, BATCH, progress):
            components.union(a, b)
        copies: dict[int, list[str]] = {}
        for alias in store.aliases():
            copies.setdefault(alias.image_id, []).append(alias.path)
            components.find(alias.image_id)
        members = [m for m in components.groups() if len(m) > 1 or m[0] in copies]
        entries = store.entries_by_id([i for m in members for i in m])
        groups = []
        for ids in members:
            # The most pixels first (the likely original), then the lowest id.
            ids = sorted(ids, key=lambda i: (-entries[i].width * entries[i].height, i))
            vectors = store.vectors(ids)
            scores = [1.0] + [float(min(1.0, s)) for s in vectors[1:] @ vectors[0]]
            # Then the closest to it first.
            order = [0] + sorted(range(1, len(ids)), key=lambda n: (-scores[n], ids[n]))
            groups.append(Group(tuple(Member(entries[ids[n]], scores[n], tuple(sorted(copies.get(ids[n], ()))))
                                      for n in order)))
    groups.sort(key=lambda g: (-g.size, g.members[0].entry.path))
    return groups
