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

import csv
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from . import images as imgs
from . import knn
from .encoders import Encoder, Registry, l2_normalize, load_registry
from .errors import ImgsearchError, IndexMismatchError, NoImagesError, UsageError
from .hashing import sha256_bytes
from .store import Entry, Hit, Store

DEFAULT_ENCODER = "resnet50"
DEFAULT_COMMIT_EVERY = 1000

Progress = Callable[[int, int], None]


@dataclass
class AddReport:
    added: int = 0
    updated: int = 0
    unchanged: int = 0
    duplicates: list[tuple[str, str]] = field(default_factory=list)
    skipped: list[imgs.Skipped] = field(default_factory=list)
    seconds: float = 0.0


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


def read_labels_csv(path) -> dict[str, str]:
    """``path,label`` rows (a header row is allowed) to absolute path -> label.
    Relative paths are taken relative to the CSV file's folder."""
    csv_path = Path(path)
    try:
        with open(csv_path, newline="", encoding="utf-8") as handle:
            rows = list(csv.reader(handle))
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"cannot read labels file {csv_path}: {exc}") from None
    if rows and [cell.strip().lower() for cell in rows[0][:2]] == ["path", "label"]:
        rows = rows[1:]
    labels = {}
    for number, row in enumerate(rows, start=1):
        if not row or not "".join(row).strip():
            continue
        if len(row) < 2 or not row[0].strip() or not row[1].strip():
            raise UsageError(f"labels file {csv_path}, row {number}: expected 'path,label'")
        image_path = Path(row[0].strip())
        if not image_path.is_absolute():
            image_path = csv_path.parent / image_path
        labels[str(image_path.absolute())] = row[1].strip()
    return labels


def _matching_encoder(store: Store, registry: Registry, name: str | None, weights: str | None) -> Encoder:
    """The encoder that made this index's vectors, loaded, or a one-line error."""
    recorded = store.manifest["encoder"]
    built_with = recorded["name"]
    if name and name != built_with:
        raise IndexMismatchError(
            f"index {store.directory} was built with encoder {built_with!r}, not {name!r}"
        )
    if not weights:
        spec = recorded.get("weights", "")
        # A recorded random or file spec is reused; otherwise (e.g. "imagenet")
        # the encoder's default applies, which may point at a local copy.
        if spec.lower() == "none" or Path(spec).expanduser().is_file():
            weights = spec
    encoder = registry.create(built_with, weights)
    if encoder.dim != store.dim or encoder.preprocessing.to_dict() != recorded.get("preprocessing"):
        raise IndexMismatchError(
            f"index {store.directory} was built by a different version of encoder {built_with!r} "
            "(dimension or preprocessing changed); rebuild it"
        )
    encoder.ensure_loaded()
    if encoder.weights_fingerprint() != recorded.get("weights_fingerprint"):
        raise IndexMismatchError(
            f"index {store.directory} was built with other {built_with} weights "
            f"({recorded.get('weights')!r}) than {encoder.weights!r}; pass --weights with the same weights"
        )
    return encoder


class Index:
    """An open index plus the encoder that reads images for it."""

    def __init__(self, store: Store, registry: Registry, encoder: Encoder | None = None):
        self.store = store
        self.registry = registry
        self._encoder = encoder

    # -- opening ---------------------------------------------------------
    @classmethod
    def open(cls, directory, *, registry: Registry | None = None, plugins_dir=None,
             encoder: str | None = None, weights: str | None = None) -> "Index":
        """An existing index, for reading.  ``encoder``/``weights`` are checked
        against what the index was built with when images are embedded."""
        store = Store.open(directory)
        index = cls(store, registry or load_registry(plugins_dir))
        index._wanted = (encoder, weights)
        return index

    @classmethod
    def build(cls, directory, *, encoder: str | None = None, weights: str | None = None,
              registry: Registry | None = None, plugins_dir=None) -> "Index":
        """An index to add to: the existing one at ``directory`` (which must
        match ``encoder`` and ``weights`` if given) or a new one."""
        registry = registry or load_registry(plugins_dir)
        if Store.exists(directory):
            store = Store.open(directory, writable=True)
            try:
                return cls(store, registry, _matching_encoder(store, registry, encoder, weights))
            except BaseException:
                store.close()
                raise
        model = registry.create(encoder or DEFAULT_ENCODER, weights)
        # Load before creating anything on disk: a missing download must not
        # leave an empty index behind.
        model.ensure_loaded()
        store = Store.create(directory, encoder=model.describe(), dim=model.dim)
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
            name, weights = getattr(self, "_wanted", (None, None))
            self._encoder = _matching_encoder(self.store, self.registry, name, weights)
        return self._encoder

    # -- facts -----------------------------------------------------------
    @property
    def random_weights(self) -> bool:
        return bool(self.store.manifest["encoder"].get("random_weights"))

    def info(self) -> dict:
        manifest = self.store.manifest
        return {
            "path": str(self.store.directory),
            "count": self.store.count,
            "encoder": manifest["encoder"]["name"],
            "dim": manifest["dim"],
            "metric": manifest["metric"],
            "weights": manifest["encoder"].get("weights"),
            "weights_fingerprint": manifest["encoder"].get("weights_fingerprint"),
            "random_weights": self.random_weights,
            "format_version": manifest["format_version"],
            "created": manifest["created"],
            "updated": manifest["updated"],
            "labels": self.store.labels(),
        }

    # -- adding ----------------------------------------------------------
    def add(self, paths, *, labels: dict[str, str] | None = None, batch_size: int | None = None,
            commit_every: int = DEFAULT_COMMIT_EVERY, max_megapixels: float = imgs.DEFAULT_MAX_MEGAPIXELS,
            progress: Progress | None = None) -> AddReport:
        """Embed and store every image in ``paths`` not yet indexed.

        Unchanged files (same path, same content) are left alone, changed ones
        are re-embedded under their old id, and a file whose content is
        already indexed under another path is reported as a duplicate rather
        than stored twice.  Work is committed every ``commit_every`` images.
        """
        started = time.perf_counter()
        if not self.store.writable:
            raise UsageError("index opened for reading; use Index.build to add images")
        if batch_size is not None and batch_size < 1:
            raise UsageError("batch size must be at least 1")
        if commit_every < 1:
            raise UsageError("commit interval must be at least 1")
        files, skipped = imgs.discover(paths)
        if not files:
            raise NoImagesError(
                "no image files found in " + ", ".join(str(p) for p in paths)
                + (f" ({skipped[0].reason}: {skipped[0].path})" if skipped else "")
            )
        labels = labels or {}
        report = AddReport(skipped=list(skipped))
        encoder = self.encoder
        batch_size = batch_size or encoder.batch_size
        by_path = self.store.by_path()
        by_sha = self.store.by_sha256()
        pending: list[tuple[Entry, np.ndarray]] = []

        def prepare(file: imgs.ImageFile) -> _Prepared:
            try:
                data = imgs.read_bytes(file.path)
                stat = os.stat(file.path)
                sha = sha256_bytes(data)
                known = by_path.get(str(file.path))
                if (known and known.sha256 == sha) or (sha in by_sha and not known):
                    return _Prepared(file, sha, stat.st_size, stat.st_mtime)
                image = imgs.decode(data, draft_size=encoder.preprocessing.draft_size,
                                    max_megapixels=max_megapixels)
                width, height = image.size
                return _Prepared(file, sha, stat.st_size, stat.st_mtime,
                                 encoder.preprocessing.resize_image(image), width, height)
            except imgs.DecodeError as exc:
                return _Prepared(file, reason=str(exc))
            except OSError as exc:
                return _Prepared(file, reason=f"cannot read file ({exc.strerror or exc})")

        def flush():
            if pending:
                entries, vectors = zip(*pending)
                self.store.commit(list(entries), np.stack(vectors))
                pending.clear()

        done = 0
        # Pillow releases the GIL while decoding, so threads decode in parallel.
        with ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2)) as pool:
            for start in range(0, len(files), batch_size):
                chunk = list(pool.map(prepare, files[start : start + batch_size]))
                to_embed = []
                for item in chunk:
                    path = str(item.file.path)
                    known = by_path.get(path)
                    if item.reason:
                        report.skipped.append(imgs.Skipped(item.file.path, item.reason))
                    elif item.pixels is None:
                        if known and known.sha256 == item.sha256:
                            report.unchanged += 1
                        else:
                            report.duplicates.append((path, by_sha[item.sha256].path))
                    elif item.sha256 in by_sha and by_sha[item.sha256].path != path:
                        # the same content seen earlier in this very run
                        report.duplicates.append((path, by_sha[item.sha256].path))
                    else:
                        label = labels.get(path, item.file.label)
                        entry = Entry(known.id if known else None, path, item.sha256, item.size,
                                      item.mtime, label, item.width, item.height)
                        by_sha[item.sha256] = entry
                        to_embed.append((entry, item.pixels))
                        if known:
                            report.updated += 1
                        else:
                            report.added += 1
                if to_embed:
                    vectors = l2_normalize(encoder.embed_pixels(np.stack([p for _, p in to_embed])))
                    pending.extend((entry, vector) for (entry, _), vector in zip(to_embed, vectors))
                if len(pending) >= commit_every:
                    flush()
                done += len(chunk)
                if progress:
                    progress(done, len(files))
            flush()
        report.seconds = time.perf_counter() - started
        return report

    # -- searching -------------------------------------------------------
    def embed_files(self, paths) -> tuple[np.ndarray, list[str]]:
        """Normalised vectors of image files and their content hashes;
        a file that cannot be read is an error, not a skip."""
        pixels, hashes = [], []
        for path in paths:
            try:
                data = imgs.read_bytes(Path(path))
                image = imgs.decode(data, draft_size=self.encoder.preprocessing.draft_size)
            except imgs.DecodeError as exc:
                raise ImgsearchError(f"cannot read query image {path}: {exc}") from None
            hashes.append(sha256_bytes(data))
            pixels.append(self.encoder.preprocessing.resize_image(image))
        if not pixels:
            raise UsageError("no query images given")
        return l2_normalize(self.encoder.embed_pixels(np.stack(pixels))), hashes

    def query(self, paths, *, k: int = 10, include_self: bool = False) -> list[QueryResult]:
        """The ``k`` most similar indexed images of each image file."""
        if k < 1:
            raise UsageError(f"k must be at least 1, not {k}")
        vectors, hashes = self.embed_files(paths)
        # One extra neighbour so that dropping the query itself still leaves k.
        found = self.store.search(vectors, k if include_self else k + 1)
        results = []
        for path, sha, hits in zip(paths, hashes, found):
            if not include_self:
                hits = [hit for hit in hits if hit.entry.sha256 != sha]
            results.append(QueryResult(str(path), hits[:k]))
        return results

    def classify(self, paths, *, k: int = 20, vote: str = "weighted",
                 temperature: float = knn.DEFAULT_TEMPERATURE, include_self: bool = False) -> list[Classification]:
        """A label for each image file by a vote of its ``k`` nearest labelled neighbours."""
        if vote not in knn.VOTES:
            raise UsageError(f"vote must be one of {', '.join(knn.VOTES)}, not {vote!r}")
        if temperature <= 0:
            raise UsageError("temperature must be positive")
        if not self.store.labels():
            raise UsageError(
                f"index {self.store.directory} has no labels; index class folders "
                "(root/<label>/image.jpg) or pass --labels CSV"
            )
        results = []
        for result in self.query(paths, k=k, include_self=include_self):
            decision = knn.vote([(h.entry.label, h.score) for h in result.hits], vote, temperature)
            results.append(Classification(result.query, decision.label, decision.confidence, result.hits))
        return results
