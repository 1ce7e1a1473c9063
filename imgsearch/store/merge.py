"""Merging segments and building the approximate index: ``optimize``.

A merge reads every segment (checking each against its checksum first, so
damage is never copied into a file with a fresh checksum), writes the live
vectors into one new segment, builds the chosen approximate index over it,
and swaps both in with one SQLite transaction.  Until that transaction the
old state is untouched: Ctrl-C or a kill at any moment loses nothing, and
the next writer removes the half-made files.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from ..errors import DamagedIndexError, Interrupted, UsageError
from . import ann
from .files import deferred_signals, write_error
from .segments import Segment, SegmentWriter, segment_name

# A full merge (optimize) is due past either of these: vectors outside the
# merged part, or removed ones still stored.
MERGE_MIN_VECTORS = 20_000
MERGE_FRACTION = 0.25
# Recent segments are merged among themselves by size tiers, as in an LSM
# tree: TIER_FACTOR segments of one tier (about TIER_BASE * TIER_FACTOR**t
# vectors each) become one of the next, so each vector is rewritten about
# log_8(n / 1000) times and a million vectors stay in a few dozen files.
TIER_FACTOR = 8
TIER_BASE = 1000
MAX_SEGMENTS = 64

Stage = Callable[[str, int, int], None]  # (stage, done, total)


@dataclass
class OptimizeReport:
    index_type: str
    vectors: int
    segments_before: int
    tombstones_dropped: int
    recall_at_10: float | None = None
    target_recall: float | None = None
    params: dict = field(default_factory=dict)
    merged: bool = True
    rebuilt: bool = True
    seconds: float = 0.0


def settings(store, index_type=None, target_recall=None, max_memory=None) -> dict:
    """The search settings asked for, over those the index records."""
    recorded = store.manifest.get("search") or {}
    chosen = {
        "type": index_type or recorded.get("type", "auto"),
        "target_recall": float(target_recall if target_recall is not None
                               else recorded.get("target_recall", ann.DEFAULT_TARGET_RECALL)),
        "max_memory": max_memory if max_memory is not None else recorded.get("max_memory"),
    }
    ann.check_settings(chosen["type"], chosen["target_recall"], chosen["max_memory"])
    return chosen


def resolved_type(store, chosen: dict) -> str:
    if chosen["type"] != "auto":
        return chosen["type"]
    return ann.choose(store.count, store.dim, chosen["max_memory"] or ann.default_max_memory())


def unmerged(store) -> int:
    """Live vectors outside the merged segment (searched exactly)."""
    segments = store.segments
    settled = segments[:1] if store.manifest.get("ann") else []
    return sum(s.live for s in segments[len(settled):])


def due(store) -> tuple[str, str] | None:
    """Whether a merge is due now: ``("optimize", why)`` for a full merge
    and rebuild, ``("compact", why)`` when only many small segments pile up
    (they are merged among themselves, the merged part is left alone), or
    None."""
    segments = store.segments
    if not segments:
        return None
    settled = segments[0].live if store.manifest.get("ann") else 0
    pending = unmerged(store)
    if pending > max(MERGE_MIN_VECTORS, MERGE_FRACTION * settled):
        return "optimize", f"{pending} vectors not merged"
    stored = sum(s.count for s in segments)
    if store.tombstones > MERGE_FRACTION * stored and store.tombstones >= 1000:
        return "optimize", f"{store.tombstones} removed or replaced vectors still stored"
    reason = compaction_due(store)
    return ("compact", reason) if reason else None


def compaction_due(store) -> str | None:
    """Why recent segments should be merged among themselves now, or None
    (whether or not a full merge is due too)."""
    group = _compactable(store)
    if group:
        return f"{len(group)} segments of under {_tier_top(_tier(group[0])):,} vectors"
    return None


def _tier(segment) -> int:
    live = max(segment.live, 1)
    return int(math.floor(math.log(live / TIER_BASE, TIER_FACTOR))) if live >= TIER_BASE else 0


def _tier_top(tier: int) -> int:
    return TIER_BASE * TIER_FACTOR ** (tier + 1)


def _compactable(store) -> list:
    """The recent segments to merge now: the lowest tier holding
    TIER_FACTOR of them, or the smallest half when there are too many."""
    recent = store.segments[1 if store.manifest.get("ann") else 0:]
    tiers: dict[int, list] = {}
    for segment in recent:
        tiers.setdefault(_tier(segment), []).append(segment)
    for tier in sorted(tiers):
        if len(tiers[tier]) >= TIER_FACTOR:
            return tiers[tier]
    if len(recent) > MAX_SEGMENTS:
        return sorted(recent, key=lambda s: s.live)[:len(recent) // 2]
    return []


def optimize(store, *, index_type: str | None = None, target_recall: float | None = None,
             max_memory: int | None = None, force: bool = False, seed: int = 0,
             progress: Stage | None = None) -> OptimizeReport:
    """Merge every segment into one, drop tombstones, and build (or rebuild)
    the approximate index; does nothing when that is done already, unless
    ``force``."""
    if not store.writable:
        raise UsageError("index opened for reading; open it writable to optimize it")
    started = time.perf_counter()
    chosen = settings(store, index_type, target_recall, max_memory)
    kind = resolved_type(store, chosen)
    if 0 < store.count < ann.MIN_VECTORS[kind]:
        raise UsageError(f"--index-type {kind} needs at least {ann.MIN_VECTORS[kind]} images; "
                         f"index {store.directory} holds {store.count} (flat searches them exactly)")
    segments = store.segments
    built = store.manifest.get("ann") or {}
    report = OptimizeReport(kind, store.count, len(segments), store.tombstones)
    merge = len(segments) > 1 or store.tombstones > 0
    rebuild = (merge or force or built.get("type") != kind
               or float(built.get("target_recall", -1)) != chosen["target_recall"])
    if not segments or not (merge or rebuild):
        report.merged = report.rebuilt = False
        report.recall_at_10, report.params = built.get("recall_at_10"), dict(built.get("params", {}))
        report.target_recall = chosen["target_recall"]
        if chosen != store.manifest.get("search"):
            _swap(store, [], [], None, search=chosen)
        report.seconds = time.perf_counter() - started
        return report
    directory = store.directory
    with _making(store) as made:
        if merge:
            _check(store, segments, progress)
            info = _merge(store, segments, made, progress) if store.count else None
        else:
            _check(store, segments, progress)  # nothing is built from damaged vectors either
            info = segments[0].info
        manifest_ann = None
        if info is not None:
            target = Segment(directory, info, store.dim)
            # A name of its own, never that of the file it replaces: readers
            # may have the old one open, and a crash must leave it whole.
            name = f"ann-{info.number:06d}-{int(store.manifest['revision']) + 1:06d}.faiss"
            if kind != "flat":
                made.append(directory / name)
            manifest_ann, _ = ann.build(
                directory, name, kind, target, target_recall=chosen["target_recall"], seed=seed,
                progress=(lambda done, total: progress("building", done, total)) if progress else None)
            manifest_ann["segment"] = info.number
        _swap(store, made, segments if merge else [], info if merge else None, built=manifest_ann, search=chosen)
    report.recall_at_10 = (manifest_ann or {}).get("recall_at_10")
    report.target_recall = chosen["target_recall"]
    report.params = dict((manifest_ann or {}).get("params", {}))
    report.merged, report.rebuilt = merge, True
    report.seconds = time.perf_counter() - started
    return report


def compact(store, *, progress: Stage | None = None) -> OptimizeReport:
    """Merge recent segments of one size tier among themselves (they stay
    searched exactly): cheap, since larger segments and the merged part are
    not touched.  ``imgsearch index`` does this between commits."""
    if not store.writable:
        raise UsageError("index opened for reading; open it writable to merge it")
    started = time.perf_counter()
    segments = store.segments
    recent = _compactable(store)
    report = OptimizeReport((store.manifest.get("ann") or {}).get("type", "none"), sum(s.live for s in recent),
                            len(segments), sum(int(s.dead.sum()) for s in recent), rebuilt=False)
    if len(recent) < 2:
        report.merged = False
        return report
    with _making(store) as made:
        _check(store, recent, progress)
        info = _merge(store, recent, made, progress) if report.vectors else None
        _swap(store, made, recent, info)
    report.seconds = time.perf_counter() - started
    return report


@contextlib.contextmanager
def _making(store):
    """The list of files a merge makes, removed again if it fails or is
    interrupted before its commit; Ctrl-C becomes a one-line error."""
    made: list = []
    try:
        yield made
    except KeyboardInterrupt:
        _remove(made)
        raise _interrupted(store, made) from None
    except BaseException:
        _remove(made)
        raise


def _swap(store, made: list, old, info, **changes) -> None:
    """Commit the merge; from the commit on, the files made are the index's
    own (a Ctrl-C landing here is held until they are no longer ours to
    remove), and the store reloads its state."""
    with deferred_signals():
        store._replace_segments(old, info, **changes)
        made.clear()
        made.append(_COMMITTED)
    store._load_state()


_COMMITTED = object()  # left in `made` once the merge stands


def _interrupted(store, made: list) -> Interrupted:
    if _COMMITTED in made:
        return Interrupted(f"interrupted: the merge of index {store.directory} was committed just before")
    return Interrupted(f"interrupted: index {store.directory} is unchanged; run the same command again")


def _check(store, segments, progress) -> None:
    """Every segment against its checksum, before anything is written from it."""
    for number, segment in enumerate(segments, start=1):
        if progress:
            progress("checking", number - 1, len(segments))
        if not segment.checksum_ok():
            raise DamagedIndexError(
                f"index {store.directory} is damaged: {segment.info.file} does not match the checksum "
                "recorded when it was written; nothing was merged ('imgsearch verify' shows more)")
    if progress:
        progress("checking", len(segments), len(segments))


def _remove(paths) -> None:
    for path in paths:
        if path is _COMMITTED:
            continue
        path.unlink(missing_ok=True)
        path.with_name(path.name + ".tmp").unlink(missing_ok=True)


def _merge(store, segments, made: list, progress):
    """Write every live vector into one new segment; returns its info."""
    directory = store.directory
    ids = np.concatenate([np.asarray(s.ids)[~s.dead] for s in segments])
    number = store._next_segment
    name = segment_name(number)
    made += [directory / (name + ".tmp"), directory / name]  # before a Ctrl-C can land in between
    try:
        writer = SegmentWriter(directory, number, store.dim, ids)
    except OSError as exc:
        raise write_error(directory, name + ".tmp", exc) from None
    done = 0
    try:
        for segment in segments:
            for start, _, vectors in segment.chunks():
                alive = ~segment.dead[start:start + len(vectors)]
                writer.add(vectors[alive])
                done += int(alive.sum())
                if progress:
                    progress("merging", done, len(ids))
        return writer.finish()
    except OSError as exc:
        writer.abandon()
        raise write_error(directory, writer.tmp.name, exc) from None
    except BaseException:
        writer.abandon()
        raise
