"""The library API: an index of images you can add to, search and classify with.

Example::

    from imgsearch import Index

    with Index.build("my-index", encoder="efficientnet-lite0") as index:
        report = index.add(["photos/"])
    with Index.open("my-index") as index:
        for result in index.query(["query.jpg"], k=5):
            for hit in result.hits:
                print(hit.score, hit.entry.path, hit.entry.label)

The library never prints and never exits: long work reports through a
``progress(done, total)`` callback, failures raise :class:`ImgsearchError`.
"""

from __future__ import annotations

import contextlib
import csv
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from . import images as imgs
from . import knn
from .encoders import Encoder, Registry, l2_normalize, load_registry
from .errors import ImgsearchError, IndexMismatchError, Interrupted, NoImagesError, UsageError, first_line
from .hashing import sha256_bytes
from .pipeline import prefetch
from .runtime import Calibration, RuntimeOptions, check_choice
from .store import Entry, Hit, Store
from .sync import FileFacts, Sync

DEFAULT_ENCODER = "resnet50"
DEFAULT_COMMIT_EVERY = 1000

Progress = Callable[[int, int], None]


@dataclass
class AddReport:
    added: int = 0
    updated: int = 0
    unchanged: int = 0
    relabelled: int = 0
    moved: int = 0
    duplicates: list[tuple[str, str]] = field(default_factory=list)
    skipped: list[imgs.Skipped] = field(default_factory=list)
    unmatched_labels: list[str] = field(default_factory=list)
    seconds: float = 0.0


@dataclass
class RemoveReport:
    removed: int = 0      # images (and vectors) dropped
    paths_only: int = 0   # duplicate paths forgotten; their picture stays
    not_indexed: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class QueryResult:
    query: str
    hits: list[Hit]


@dataclass(frozen=True)
class Classification:
    path: str
    label: str | None
    confidence: float
    neighbours: list[Hit]
    # Each label's share of the vote (kNN; they sum to 1), or of the
    # probability (linear).
    votes: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class _Prepared:
    """A file read, hashed and, when it needs embedding, resized."""

    file: imgs.ImageFile
    sha256: str = ""
    size: int = 0
    mtime: float = 0.0
    pixels: np.ndarray | None = None
    width: int = 0
    height: int = 0
    reason: str | None = None
    unchanged: bool = False
    vector: np.ndarray | None = None  # made elsewhere (a Ray worker)


def read_labels_csv(path) -> dict[str, str]:
    """``path,label`` rows (a header row is allowed) to absolute path -> label.
    Relative paths are taken relative to the CSV file's folder."""
    csv_path = Path(path)
    try:
        # utf-8-sig: spreadsheets often start CSV files with a byte-order mark
        with open(csv_path, newline="", encoding="utf-8-sig") as handle:
            rows = list(csv.reader(handle))
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"cannot read labels file {csv_path}: {exc}") from None
    first = 1
    if rows and [cell.strip().lower() for cell in rows[0]] == ["path", "label"]:
        rows, first = rows[1:], 2
    labels = {}
    for number, row in enumerate(rows, start=first):  # numbered as lines of the file
        if not row or not "".join(row).strip():
            continue
        if len(row) != 2 or not row[0].strip() or not row[1].strip():
            raise UsageError(f"labels file {csv_path}, line {number}: expected 'path,label'")
        image_path = Path(row[0].strip()).expanduser()
        if not image_path.is_absolute():
            image_path = csv_path.parent / image_path
        key = os.path.abspath(image_path)
        if labels.get(key, row[1].strip()) != row[1].strip():
            raise UsageError(f"labels file {csv_path}, line {number}: {row[0].strip()} already has "
                             f"label {labels[key]!r}")
        labels[key] = row[1].strip()
    return labels


def recorded_weights(recorded: dict) -> str | None:
    """The weights to use for an index's encoder when none are named: a
    recorded random or file spec (or a model folder, recorded as an absolute
    path); otherwise (e.g. "imagenet") None, for the encoder's default, which
    may point at a local copy."""
    spec = recorded.get("weights", "")
    if spec.lower() == "none" or Path(spec).expanduser().is_file() or (
            Path(spec).is_absolute() and Path(spec).is_dir()):
        return spec
    return None


def _matching_encoder(store: Store, registry: Registry, name: str | None, weights: str | None,
                      runtime: str = "auto", precision: str | None = None) -> Encoder:
    """The encoder that made this index's vectors, loaded, or a one-line error.

    It runs at the precision the index was built with unless ``precision``
    says otherwise; only a read-only use may differ, since an index's vectors
    should all be made the same way."""
    recorded = store.manifest["encoder"]
    built_with = recorded["name"]
    if name and name != built_with:
        raise IndexMismatchError(
            f"index {store.directory} was built with encoder {built_with!r}, not {name!r}"
        )
    encoder = registry.create(built_with, weights or recorded_weights(recorded))
    if encoder.dim != store.dim or encoder.preprocessing.to_dict() != recorded.get("preprocessing"):
        raise IndexMismatchError(
            f"index {store.directory} was built by a different version of encoder {built_with!r} "
            "(dimension or preprocessing changed); rebuild it"
        )
    built_precision = recorded.get("precision", "fp32")  # indexes from before precisions were fp32
    if runtime == "keras" and precision is None and built_precision != "fp32":
        if store.writable:
            raise IndexMismatchError(
                f"index {store.directory} was built with --precision {built_precision}, which runs "
                "only on OpenVINO; add to it without --runtime keras"
            )
        precision = "fp32"  # the reference path; its vectors are what bf16 and int8 approximate
    # A reader that did not ask for a precision may fall back to fp32 when
    # the index's own cannot run here; a writer may not.
    fp32_fallback = not store.writable and precision is None
    precision = precision or built_precision
    if precision != built_precision:
        # What runs decides (below); int8 never stands in for another precision.
        if store.writable and "int8" in (precision, built_precision):
            raise IndexMismatchError(
                f"index {store.directory} was built with --precision {built_precision}; "
                f"add to it with the same precision, or build a new index"
            )
        if precision == "int8":
            raise UsageError(
                f"--precision int8 needs an index built with --precision int8 (the calibration "
                f"comes from its images); index {store.directory} is {built_precision}"
            )
    encoder.use_runtime(RuntimeOptions(runtime, precision, calibration_id=(
        recorded.get("calibration") if precision == "int8" else None), fp32_fallback=fp32_fallback))

    def check_weights():
        if encoder.weights_fingerprint() != recorded.get("weights_fingerprint"):
            raise IndexMismatchError(
                f"index {store.directory} was built with other {built_with} weights "
                f"({recorded.get('weights')!r}) than {encoder.weights!r}; pass --weights with the same weights"
            )

    # Weights already here are compared before the model is built or
    # exported: a refusal must not cost seconds, nor leave a cached export.
    weights_here = encoder.weights_status().available
    if weights_here:
        check_weights()
    encoder.ensure_loaded()
    if store.writable and encoder.precision != built_precision:
        # The manifest records the precision that ran (bf16 asked on a CPU
        # without it ran fp32): vectors made another way must not join them.
        raise IndexMismatchError(
            f"index {store.directory} holds {built_precision} vectors, but {built_with} runs here as "
            f"{encoder.runtime_name} ({encoder.precision}); add to it where it runs at {built_precision} "
            "(the same --precision), or build a new index"
        )
    if not weights_here:
        check_weights()  # fetched by the load
    return encoder


def _same_setting(given: str, recorded: str) -> bool:
    """Whether a backend setting names what the index recorded (a local
    path may be given relative to the working folder)."""
    if given == recorded:
        return True
    return "://" not in given and os.path.abspath(os.path.expanduser(given)) == recorded


def _disk_bytes(directory: Path) -> int:
    total = 0
    for path in directory.iterdir():
        with contextlib.suppress(OSError):  # a merge may remove files meanwhile
            total += path.stat().st_size if path.is_file() else 0
    return total


class Index:
    """An open index plus the encoder that reads images for it."""

    def __init__(self, store: Store, registry: Registry, encoder: Encoder | None = None,
                 wanted: tuple = (None, None, "auto", None)):
        self.store = store
        self.registry = registry
        self._encoder = encoder
        # (encoder name, weights, runtime, precision) asked for, checked on first use
        self._wanted = wanted
        # Pillow formats read from image files (see images.check_formats),
        # and the largest image read, for the images that queries, classify
        # and evaluation embed (add() takes its own).
        self.formats = imgs.DEFAULT_FORMATS
        self.max_megapixels = imgs.DEFAULT_MAX_MEGAPIXELS

    # -- opening ---------------------------------------------------------
    @classmethod
    def open(cls, directory, *, registry: Registry | None = None, plugins_dir=None,
             encoder: str | None = None, weights: str | None = None, writable: bool = False,
             runtime: str = "auto", precision: str | None = None) -> "Index":
        """An existing index (``writable``: locked for this process, e.g. to
        remove images).  ``encoder``/``weights`` are checked against what the
        index was built with when images are first embedded.  ``runtime`` and
        ``precision`` (default: the index's own) say how query images are
        embedded; see :mod:`imgsearch.runtime`."""
        check_choice(runtime, precision)  # bad values fail before any work
        store = Store.open(directory, writable=writable)
        try:
            return cls(store, registry or load_registry(plugins_dir),
                       wanted=(encoder, weights, runtime, precision))
        except BaseException:
            store.close()
            raise

    @classmethod
    def build(cls, directory, *, encoder: str | None = None, weights: str | None = None,
              default_encoder: str | None = None, registry: Registry | None = None,
              plugins_dir=None, runtime: str = "auto", precision: str | None = None,
              calibration=None, index_type: str = "auto", target_recall: float | None = None,
              max_memory: int | None = None, backend: str | None = None,
              backend_options: dict | None = None) -> "Index":
        """An index to add to: the existing one at ``directory`` (which must
        match ``encoder``, ``weights`` and ``precision`` if given) or a new
        one, made with ``encoder``, else ``default_encoder``, else resnet50,
        at ``precision`` (default fp32).  An int8 index is calibrated on the
        images under the ``calibration`` paths (typically those about to be
        added).  ``backend`` and ``backend_options`` say where a new index's
        vectors live (default: in its folder; see :mod:`imgsearch.store.backend`);
        an existing index keeps its own."""
        registry = registry or load_registry(plugins_dir)
        check_choice(runtime, precision)
        from .store import ann

        target_recall = ann.DEFAULT_TARGET_RECALL if target_recall is None else target_recall
        ann.check_settings(index_type, target_recall, max_memory)
        if Store.exists(directory):
            store = Store.open(directory, writable=True)
            try:
                recorded = store.backend.name
                if backend and backend != recorded:
                    raise UsageError(f"index {directory} keeps its vectors in {recorded}, not {backend}; "
                                     "an existing index keeps its backend")
                kept = store.manifest.get("backend") or {}
                for key, given in (backend_options or {}).items():
                    if given is not None and not _same_setting(str(given), str(kept.get(key))):
                        raise UsageError(f"index {directory} keeps its vectors at {key} {kept.get(key)!r}, "
                                         f"not {given!r}; an existing index keeps its backend's settings")
                return cls(store, registry, _matching_encoder(store, registry, encoder, weights,
                                                              runtime, precision))
            except BaseException:
                store.close()
                raise
        Store.check_creatable(directory)
        from .store import backend as backends

        backends.get(backend or backends.DEFAULT)  # an unknown name fails before the model loads
        model = registry.create(encoder or default_encoder or DEFAULT_ENCODER, weights)
        if precision == "int8":
            if not calibration:
                raise UsageError("an int8 index needs calibration images (pass the paths to index)")
            model.use_runtime(Calibration.from_paths(calibration, model.preprocessing).options(runtime))
        else:
            model.use_runtime(RuntimeOptions(runtime, precision or "fp32"))
        # Load before creating anything on disk: a missing download must not
        # leave an empty index behind.
        model.ensure_loaded()
        store = Store.create(directory, encoder=model.describe(), dim=model.dim, index_type=index_type,
                             target_recall=target_recall, max_memory=max_memory,
                             backend=backend or backends.DEFAULT, backend_options=backend_options)
        return cls(store, registry, model)

    def close(self) -> None:
        self.store.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    @property
    def encoder(self) -> Encoder:
        if self._encoder is None:
            self._encoder = _matching_encoder(self.store, self.registry, *self._wanted)
        return self._encoder

    # -- facts -----------------------------------------------------------
    @property
    def random_weights(self) -> bool:
        return bool(self.store.manifest["encoder"].get("random_weights"))

    def info(self) -> dict:
        from .store import merge as merging

        manifest = self.store.manifest
        built = manifest.get("ann") or {}
        search = manifest.get("search") or {}
        labels = self.store.labels()
        return {
            "path": str(self.store.directory),
            **self.store.backend.describe(),
            "count": self.store.count,
            "encoder": manifest["encoder"]["name"],
            "dim": manifest["dim"],
            "metric": manifest["metric"],
            "weights": manifest["encoder"].get("weights"),
            "weights_fingerprint": manifest["encoder"].get("weights_fingerprint"),
            "random_weights": self.random_weights,
            "precision": manifest["encoder"].get("precision", "fp32"),
            "calibration": manifest["encoder"].get("calibration"),
            "format_version": manifest["format_version"],
            "index_type": built.get("type") or f"none yet (exact search; {search.get('type', 'auto')} "
                                                "when optimized)",
            "segments": len(self.store.segments),
            "unmerged": merging.unmerged(self.store),
            "tombstones": self.store.tombstones,
            "memory_bytes": built.get("memory"),
            "recall_at_10": built.get("recall_at_10"),
            "search_params": built.get("params"),
            "target_recall": search.get("target_recall"),
            "disk_bytes": _disk_bytes(self.store.directory),
            "created": manifest["created"],
            "updated": manifest["updated"],
            "labels": labels,
            "unlabelled": self.store.count - sum(labels.values()),
            "classifier": self._classifier_facts(),
        }

    def _classifier_facts(self) -> dict | None:
        """The saved linear classifier in brief, and whether it still fits
        this index state (None: none trained)."""
        from . import linear

        try:
            model = linear.LinearModel.load(self.store.directory)
        except ImgsearchError:
            return {"method": None, "labels": 0, "current": False, "damaged": True}
        if model is None:
            return None
        return {"method": model.method, "labels": len(model.classes), "current":
                model.fingerprint == self.state_fingerprint(), "damaged": False}

    # -- adding ----------------------------------------------------------
    def add(self, paths, *, labels: dict[str, str] | None = None, batch_size: int | None = None,
            commit_every: int = DEFAULT_COMMIT_EVERY, max_megapixels: float = imgs.DEFAULT_MAX_MEGAPIXELS,
            formats=None, progress: Progress | None = None, ray: str | None = None,
            ray_gpus: float = 0.0) -> AddReport:
        """Embed and store every image in ``paths`` not yet indexed.

        Unchanged files (same path, same content) are not decoded again,
        changed ones are re-embedded under their old id, and a file whose
        content is already indexed under another path is reported as a
        duplicate rather than stored twice.  ``labels`` (absolute path to
        label, e.g. from :func:`read_labels_csv`) win over folder names and
        also relabel files already indexed.  Work is committed every
        ``commit_every`` images.  ``formats`` (Pillow's names, default
        :attr:`formats`) are the image formats read; files of other formats
        are skipped, and folders are searched for their suffixes.  A new
        index that fails before its first commit is removed again.

        ``ray``: decode and embed on a Ray cluster (``"auto"``, ``"local"`` or
        the head's ``HOST:PORT``; see :mod:`imgsearch.cluster`), each encoding
        actor taking ``ray_gpus`` GPUs (0: CPU actors).  The results are
        those of a local run.
        """
        if not self.store.writable:
            raise UsageError("index opened for reading; use Index.build to add images")
        if batch_size is not None and batch_size < 1:
            raise UsageError("batch size must be at least 1")
        if commit_every < 1:
            raise UsageError("commit interval must be at least 1")
        if not (max_megapixels > 0 and math.isfinite(max_megapixels)):
            raise UsageError("the megapixel limit must be a positive number")
        if not (ray_gpus >= 0 and math.isfinite(ray_gpus)):
            raise UsageError("GPUs per Ray actor must be zero or more")
        formats = imgs.check_formats(formats or self.formats)
        try:
            report = self._add(paths, labels or {}, batch_size or self.encoder.batch_size,
                               commit_every, max_megapixels, formats, progress, ray, ray_gpus)
            if self.store.created_here and self.store.count == 0 and report.skipped:
                first = report.skipped[0]
                raise ImgsearchError(
                    f"none of the {len(report.skipped)} files could be indexed "
                    f"(first: {first.path}: {first.reason}); no index was created"
                )
            return report
        except BaseException as exc:
            if self.store.created_here and self.store.count == 0:
                self.store.discard()
                if isinstance(exc, Interrupted):  # there is nothing to resume
                    raise Interrupted("interrupted before any image was committed; the new index was "
                                      "removed") from None
            raise

    def _add(self, paths, labels, batch_size, commit_every, max_megapixels, formats, progress, ray,
             ray_gpus) -> AddReport:
        started = time.perf_counter()
        files, skipped = imgs.discover(paths, imgs.suffixes_for(formats), formats)
        if not files:
            raise NoImagesError(
                "no image files found in " + ", ".join(str(p) for p in paths)
                + (f" ({skipped[0].reason}: {skipped[0].path})" if skipped else "")
            )
        report = AddReport(skipped=list(skipped))
        found = {str(f.path) for f in files}
        report.unmatched_labels = sorted(path for path in labels if path not in found)
        encoder = self.encoder
        sync = Sync(self.store)
        count_before = self.store.count
        # Workers consult the sync state (and through it the store) while
        # the main thread changes it.
        sync_lock = sync.lock

        def known(file: imgs.ImageFile, stat: os.stat_result) -> _Prepared | None:
            """The file as indexed, when its path, size and mtime are unchanged."""
            with sync_lock:
                unchanged = sync.unchanged_on_disk(str(file.path), stat.st_size, stat.st_mtime)
            return _Prepared(file, size=stat.st_size, mtime=stat.st_mtime, unchanged=True) if unchanged else None

        def prepare(file: imgs.ImageFile, *, force: bool = False) -> _Prepared:
            path = str(file.path)
            try:
                stat = os.stat(file.path)
                if not force and (done := known(file, stat)):
                    return done
                data = imgs.read_bytes(file.path)
                sha = sha256_bytes(data)
                if not force:
                    with sync_lock:
                        needed = sync.needs_pixels(path, sha)
                    if not needed:
                        return _Prepared(file, sha, stat.st_size, stat.st_mtime)
                pixels, size = imgs.to_pixels(data, encoder.preprocessing, max_megapixels=max_megapixels,
                                              formats=formats)
                return _Prepared(file, sha, stat.st_size, stat.st_mtime, pixels, *size)
            except Exception as exc:  # one bad file must not stop a long run
                return _Prepared(file, reason=imgs.skip_reason(exc))

        try:
            with contextlib.ExitStack() as stack:
                if ray:
                    from . import cluster

                    plugins_dir = (self.registry.plugins_dir if self.registry.from_plugins_dir(encoder.name)
                                   else None)
                    spec = cluster.spec_for(encoder, plugins_dir=plugins_dir, max_megapixels=max_megapixels,
                                            formats=formats, batch_size=batch_size, gpus_per_actor=ray_gpus)
                    # Joined only when some file needs embedding.
                    connect = lambda: stack.enter_context(cluster.connect(ray))  # noqa: E731
                    source = self._embedded_remotely(connect, files, spec, known, ray_gpus)
                else:
                    # Files are read and decoded ahead in worker threads while
                    # this thread runs the encoder.
                    source = prefetch(prepare, files, ahead=2 * batch_size)
                self._run_batches(stack.enter_context(contextlib.closing(source)), len(files), labels,
                                  batch_size, commit_every, progress, report, sync, prepare, sync_lock)
        except KeyboardInterrupt:
            # What is embedded already is worth keeping; the commit is atomic.
            with contextlib.suppress(ImgsearchError):
                sync.commit()
            raise Interrupted(
                f"interrupted: {self.store.count - count_before} new images committed in this run, "
                f"the index holds {self.store.count}; run the same command again to resume"
            ) from None
        except Exception as exc:
            if not ray:
                raise
            # A lost node or worker: keep what arrived, and say how to go on.
            with contextlib.suppress(ImgsearchError):
                sync.commit()
            added = self.store.count - count_before
            if isinstance(exc, ImgsearchError) and not added:
                raise
            problem = str(exc) if isinstance(exc, ImgsearchError) else f"the Ray run failed ({first_line(exc)})"
            raise ImgsearchError(f"{problem}; {added} new images committed in this run, "
                                 "run the same command again to resume") from None
        report.seconds = time.perf_counter() - started
        return report

    def _embedded_remotely(self, connect, files, spec, known, gpus_per_actor):
        """Prepared files in file order, the vectors made on a Ray cluster.
        Files unchanged since they were indexed are recognised here, so a
        resumed run sends only the rest."""
        from . import cluster

        local: list[_Prepared | None] = []
        for file in files:
            try:
                stat = os.stat(file.path)
            except OSError:
                local.append(None)  # the worker reports why
                continue
            local.append(known(file, stat))
        todo = [str(f.path) for f, done in zip(files, local) if done is None]
        remote = cluster.embed(connect() if todo else None, todo, spec,
                               gpus_per_actor=gpus_per_actor)
        with contextlib.closing(remote):
            for file, done in zip(files, local):
                if done is not None:
                    yield done
                    continue
                item = next(remote)
                yield _Prepared(file, item.sha256, item.size, item.mtime, None, item.width, item.height,
                                item.reason, vector=item.vector)

    def _run_batches(self, prepared, total, labels, batch_size, commit_every, progress, report, sync,
                     prepare, sync_lock):
        counters = {"added": "added", "changed": "updated", "unchanged": "unchanged",
                    "relabelled": "unchanged", "moved": "moved"}
        queue: list[_Prepared] = []  # read files waiting for their batch, in file order

        def embed(items):
            if not items:
                return {}
            vectors = l2_normalize(self.encoder.embed_pixels(np.stack([i.pixels for i in items])))
            return {id(item): vector for item, vector in zip(items, vectors)}

        def settle():
            """Embed the queued pixels as one batch and record every queued file."""
            vector_of = embed([item for item in queue if item.pixels is not None])
            vector_of.update({id(item): item.vector for item in queue if item.vector is not None})
            with sync_lock:
                for item in queue:
                    path = str(item.file.path)
                    if id(item) not in vector_of and sync.needs_pixels(path, item.sha256):
                        # Read as a copy of indexed content that an earlier
                        # file has since replaced: embed it now.
                        item = prepare(item.file, force=True)
                        if item.reason:
                            report.skipped.append(imgs.Skipped(item.file.path, item.reason))
                            continue
                        vector_of.update(embed([item]))
                    facts = FileFacts(path, item.sha256, item.size, item.mtime, labels.get(path),
                                      item.file.label, item.width, item.height)
                    outcome = sync.add(facts, vector_of.get(id(item)))
                    if outcome == "duplicate":
                        report.duplicates.append((path, sync.original_of(path)))
                    else:
                        setattr(report, counters[outcome], getattr(report, counters[outcome]) + 1)
                        report.relabelled += outcome == "relabelled"
            queue.clear()

        def commit_if_due():
            # Work without new vectors (moves, copies, refreshed mtimes) is
            # worth keeping too.
            if sync.pending_vectors >= commit_every or len(sync) >= 4 * commit_every:
                sync.commit()
                self._compact_if_due(sync.lock)

        # Every encoder call gets a full batch of pixels (unchanged and
        # unreadable files do not leave holes in it).
        waiting = 0
        for done, item in enumerate(prepared, start=1):
            if item.reason:
                report.skipped.append(imgs.Skipped(item.file.path, item.reason))
            elif item.unchanged:
                path = str(item.file.path)
                report.unchanged += 1
                with sync_lock:
                    report.relabelled += sync.unchanged(path, labels.get(path))
            else:
                queue.append(item)
                waiting += item.pixels is not None or item.vector is not None
            if waiting >= batch_size or len(queue) >= 4 * batch_size:
                settle()
                waiting = 0
                commit_if_due()
            if done % batch_size == 0 or done == total:
                commit_if_due()
                if progress:
                    progress(done, total)
        settle()
        sync.commit()
        self._compact_if_due(sync.lock)

    def _compact_if_due(self, lock) -> None:
        """Merge small recent segments among themselves between commits, so
        a long run leaves a few dozen files, not one per commit.  Under the
        sync lock: the reading threads look rows up on the same connection."""
        from .store import compact, compaction_due

        with lock:
            while compaction_due(self.store):  # a merge may fill the next tier
                compact(self.store)

    def remove(self, paths) -> RemoveReport:
        """Forget the given files, and every file under the given folders
        (they need not exist any more)."""
        if not self.store.writable:
            raise UsageError("index opened for reading; use Index.build to remove images")
        wanted = [os.path.abspath(p) for p in paths]
        doomed: set[str] = set()
        report = RemoveReport()
        for path in wanted:
            found = self.store.paths_under(path)
            doomed.update(found)
            if not found:
                report.not_indexed.append(path)
        return self._drop(Sync(self.store), sorted(doomed), report)

    def prune(self) -> RemoveReport:
        """Forget every indexed file that no longer exists."""
        if not self.store.writable:
            raise UsageError("index opened for reading; use Index.build to prune it")
        # Paths are streamed from the store; only the missing ones are kept.
        gone = sorted(p for p in self.store.paths() if not os.path.exists(p))
        return self._drop(Sync(self.store), gone, RemoveReport())

    def _drop(self, sync: Sync, paths: list[str], report: RemoveReport) -> RemoveReport:
        for path in paths:
            outcome = sync.drop(path)
            if outcome == "removed":
                report.removed += 1
            elif outcome in ("promoted", "unaliased"):
                report.paths_only += 1
        sync.commit()
        return report

    # -- searching -------------------------------------------------------
    def embed_files(self, paths, *, progress: Progress | None = None) -> tuple[np.ndarray, list[str]]:
        """Normalised vectors of image files and their content hashes, a
        batch at a time (``progress(done, total)`` after each); a file that
        cannot be read is an error, not a skip."""
        paths = list(paths)
        if not paths:
            raise UsageError("no query images given")
        batch = self.encoder.batch_size
        vectors, hashes = [], []
        for start in range(0, len(paths), batch):
            pixels = []
            for path in paths[start:start + batch]:
                try:
                    data = imgs.read_bytes(Path(path))
                    image_pixels, _ = imgs.to_pixels(data, self.encoder.preprocessing, formats=self.formats,
                                                     max_megapixels=self.max_megapixels)
                except imgs.DecodeError as exc:
                    raise ImgsearchError(f"cannot read query image {path}: {exc}") from None
                hashes.append(sha256_bytes(data))
                pixels.append(image_pixels)
            vectors.append(self.embed_pixels(np.stack(pixels)))
            if progress:
                progress(start + len(pixels), len(paths))
        return np.concatenate(vectors), hashes

    def embed_pixels(self, pixels: np.ndarray) -> np.ndarray:
        """Normalised vectors of images already resized for the encoder
        (see :func:`imgsearch.images.to_pixels`)."""
        return l2_normalize(self.encoder.embed_pixels(pixels))

    def query(self, paths, *, k: int = 10, include_self: bool = False, min_score: float | None = None,
              label: str | None = None, progress: Progress | None = None) -> list[QueryResult]:
        """The ``k`` most similar indexed images of each image file
        (``progress(done, total)`` follows their embedding).  ``min_score``
        drops neighbours less similar than that; ``label`` keeps only
        neighbours with that label (so fewer than ``k`` may come back)."""
        _check_k(k)
        paths = list(paths)
        vectors, hashes = self.embed_files(paths, progress=progress)
        return self.query_vectors(vectors, [str(p) for p in paths], hashes, k=k, include_self=include_self,
                                  min_score=min_score, label=label)

    def query_vectors(self, vectors: np.ndarray, names: list[str], hashes: list[str | None], *, k: int = 10,
                      include_self: bool = False, labelled: bool = False, min_score: float | None = None,
                      label: str | None = None) -> list[QueryResult]:
        """The ``k`` most similar indexed images of each normalised vector,
        named ``names[i]``, only labelled ones when ``labelled``; unless
        ``include_self``, the indexed image whose content hash is
        ``hashes[i]`` is not its own neighbour (see :meth:`query` for the
        filters)."""
        _check_k(k)

        def wanted(hit, sha):
            return ((include_self or hit.entry.sha256 != sha)
                    and (min_score is None or hit.score >= min_score)
                    and (label is None or hit.entry.label == label))

        # One extra neighbour so that dropping the query itself still leaves
        # k; with a label filter, ever more until k pass or none are left.
        depth = k if include_self else k + 1
        if label is not None:
            depth = max(depth, 4 * k)
        results: list[QueryResult | None] = [None] * len(names)
        todo = list(range(len(names)))
        while todo:
            found = self.store.search(vectors[todo], depth, labelled=labelled)
            still = []
            for row, hits in zip(todo, found):
                kept = [hit for hit in hits if wanted(hit, hashes[row])]
                # Hits come best first: past min_score, deeper ones are worse.
                exhausted = (len(hits) < depth or (min_score is not None and hits and hits[-1].score < min_score))
                if len(kept) >= k or exhausted:
                    results[row] = QueryResult(names[row], kept[:k])
                else:
                    still.append(row)
            todo, depth = still, depth * 4
        return results

    def indexed(self, ids) -> tuple[np.ndarray, list[Entry]]:
        """The stored vectors and rows of indexed images by id, from one
        commit; an id not in the index is an error."""
        ids = [int(i) for i in ids]
        with self.store.reading():
            rows = self.store.entries_by_id(ids)
            missing = [i for i in ids if i not in rows]
            if missing:
                raise UsageError(f"no image with id {missing[0]} in index {self.store.directory}")
            return self.store.vectors(ids), [rows[i] for i in ids]

    def embed_images(self, files: list[imgs.ImageFile], *, batch_size: int | None = None,
                     progress: Progress | None = None) -> tuple[np.ndarray, list[imgs.ImageFile], list[imgs.Skipped]]:
        """Normalised vectors of many image files, a batch at a time (memory
        stays flat); files that cannot be read are skipped with a reason."""
        batch_size = batch_size or self.encoder.batch_size
        prep = self.encoder.preprocessing
        vectors, kept, skipped = [], [], []

        def load(file):
            try:
                return file, imgs.to_pixels(imgs.read_bytes(file.path), prep, formats=self.formats,
                                            max_megapixels=self.max_megapixels)[0], None
            except imgs.DecodeError as exc:
                return file, None, str(exc)

        good = []

        def flush():
            if good:
                kept.extend(f for f, _ in good)
                vectors.append(l2_normalize(self.encoder.embed_pixels(np.stack([p for _, p in good]))))
                good.clear()

        loaded = prefetch(load, files, ahead=2 * batch_size)
        with contextlib.closing(loaded):
            for done, (file, pixels, reason) in enumerate(loaded, start=1):
                if reason:
                    skipped.append(imgs.Skipped(file.path, reason))
                else:
                    good.append((file, pixels))
                if len(good) >= batch_size:
                    flush()
                if progress and (done % batch_size == 0 or done == len(files)):
                    progress(done, len(files))
            flush()
        matrix = np.concatenate(vectors) if vectors else np.empty((0, self.store.dim), np.float32)
        return matrix, kept, skipped

    def labelled_vectors(self) -> tuple[list[Entry], np.ndarray]:
        """The labelled entries and their stored vectors, in id order (the
        unlabelled ones are never read)."""
        with self.store.reading():  # rows and vectors of one commit
            entries = self.store.labelled_entries()
            return entries, self.store.vectors([e.id for e in entries])

    def optimize(self, *, index_type: str | None = None, target_recall: float | None = None,
                 max_memory: int | None = None, force: bool = False, progress=None):
        """Merge the index's segments and build its approximate index (see
        :func:`imgsearch.store.optimize`); ``progress(stage, done, total)``."""
        return self.store.backend.optimize(index_type=index_type, target_recall=target_recall,
                                           max_memory=max_memory, force=force, progress=progress)

    def optimize_due(self) -> tuple[str, str] | None:
        """``("optimize", why)`` or ``("compact", why)`` when the index
        should be merged now (many vectors not merged, many removed, many
        segments), or None."""
        return self.store.backend.due()

    def state_fingerprint(self) -> str:
        """Names this exact index state: what a trained classifier was fit on."""
        manifest = self.store.manifest
        # Merges (optimize) change neither images nor vectors: not counted.
        revision = manifest.get("content_revision", manifest.get("revision", 0))
        return (f"{manifest['created']}/r{revision}/"
                f"{manifest['encoder']['name']}/{manifest['encoder'].get('weights_fingerprint')}")

    def train_classifier(self, *, method: str = "logreg", C: float | str = "auto", seed: int = 0,
                         progress: Progress | None = None):
        """Fit a linear classifier on the labelled vectors and save it in the
        index folder (the index must be open for writing); ``progress(done,
        total)`` follows the cross-validation that chooses C."""
        from . import linear

        if not self.store.writable:
            raise UsageError("index opened for reading; open it writable to save a classifier")
        entries, vectors = self.labelled_vectors()
        if not entries:
            raise UsageError(f"index {self.store.directory} has no labels to train on")
        model = linear.fit(vectors, [e.label for e in entries], method=method, C=C,
                           fingerprint=self.state_fingerprint(), seed=seed, progress=progress)
        model.save(self.store.directory)
        return model

    def classifier(self):
        """The saved linear classifier, checked against this index state."""
        from . import linear

        model = linear.LinearModel.load(self.store.directory)
        if model is None:
            raise UsageError(
                f"index {self.store.directory} has no trained classifier; run 'imgsearch train-classifier'"
            )
        if model.fingerprint != self.state_fingerprint():
            raise IndexMismatchError(
                f"the classifier in {self.store.directory} was trained on another state of this index "
                "(images, labels or encoder changed since); run 'imgsearch train-classifier' again"
            )
        return model

    def classify(self, paths, *, k: int = 20, vote: str = "weighted",
                 temperature: float = knn.DEFAULT_TEMPERATURE, include_self: bool = False,
                 method: str = "knn", progress: Progress | None = None) -> list[Classification]:
        """A label for each image file by a vote of its ``k`` nearest labelled
        neighbours, or (``method="linear"``) by the trained linear classifier;
        ``progress(done, total)`` follows the images' embedding."""
        self._check_classify(k, vote, temperature, method)
        vectors, hashes = self.embed_files(paths, progress=progress)
        return self.classify_vectors(vectors, [str(p) for p in paths], hashes, k=k, vote=vote,
                                     temperature=temperature, include_self=include_self, method=method)

    def _check_classify(self, k, vote, temperature, method):
        _check_k(k)
        if method == "linear":
            model = self.classifier()
            if model.coef.shape[1] != self.store.dim:
                raise IndexMismatchError("the classifier does not fit this index's vectors; train it again")
            return model
        if method != "knn":
            raise UsageError(f"method must be knn or linear, not {method!r}")
        if vote not in knn.VOTES:
            raise UsageError(f"vote must be one of {', '.join(knn.VOTES)}, not {vote!r}")
        if temperature <= 0:
            raise UsageError("temperature must be positive")
        if not self.store.labels():
            raise UsageError(
                f"index {self.store.directory} has no labels; index class folders "
                "(root/<label>/image.jpg) or pass --labels CSV"
            )
        return None

    def classify_vectors(self, vectors: np.ndarray, names: list[str], hashes: list[str | None], *,
                         k: int = 20, vote: str = "weighted", temperature: float = knn.DEFAULT_TEMPERATURE,
                         include_self: bool = False, method: str = "knn") -> list[Classification]:
        """:meth:`classify` for normalised vectors named ``names``, whose
        content hashes are ``hashes`` (see :meth:`query_vectors`)."""
        model = self._check_classify(k, vote, temperature, method)
        # The k nearest labelled images vote: unlabelled ones are not searched.
        # (The linear classifier's neighbours are shown for context: any image.)
        found = self.query_vectors(vectors, names, hashes, k=k, include_self=include_self,
                                   labelled=model is None)
        if model is not None:
            # The neighbours are shown for context, without the image itself.
            ranked, confidence = model.predict(vectors)
            return [Classification(r.query, labels[0], float(c), r.hits, {labels[0]: float(c)})
                    for r, labels, c in zip(found, ranked, confidence)]
        results = []
        for result in found:
            decision = knn.vote([(h.entry.label, h.score) for h in result.hits], vote, temperature)
            total = sum(decision.tally.values()) or 1.0
            shares = {label: weight / total for label, weight in
                      sorted(decision.tally.items(), key=lambda item: -item[1])}
            results.append(Classification(result.query, decision.label, decision.confidence, result.hits, shares))
        return results


def _check_k(k: int) -> None:
    if k < 1:
        raise UsageError(f"k must be at least 1, not {k}")
