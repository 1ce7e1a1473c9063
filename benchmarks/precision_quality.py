"""How much the faster precisions (bf16, int8) change neighbours, against fp32.

Usage:
    python benchmarks/precision_quality.py FOLDER [--encoders efficientnet-lite0,resnet50]
                                           [--train-limit N] [--val-limit N] [-k 10]

FOLDER holds labelled photos as ``train/<class>/*`` and ``val/<class>/*``
(imagenette's layout).  Every image is decoded once, through the same road as
``imgsearch index`` (:func:`imgsearch.images.to_pixels`), and the pixels are
embedded by a fresh encoder per precision:

  keras-fp32     the Keras reference; must match openvino-fp32 (cosine >= 0.9999)
  openvino-fp32  the reference every other row is compared with
  openvino-bf16  bfloat16 arithmetic (fp32 where the CPU lacks it: see "ran as")
  openvino-int8  NNCF-quantized, calibrated on the train images (the images an
                 int8 index would hold), never on the val queries

For each precision the table gives the cosine of every image's vector with
its openvino-fp32 vector; the overlap of each val image's 10 nearest train
images with the openvino-fp32 ones, both sides embedded at that precision, as
in a real index of that precision; kNN top-1 accuracy of val classified by
train (the project's weighted vote); and embedding speed (informational: the
machine may be shared).  One more row puts fp32 queries against the int8
train vectors: what the runtime falls back to when an int8 index is queried
where its calibrated model is not cached.  The verdict offers a precision
when its mean top-10 overlap is at least 0.95.

An encoder whose ImageNet weights are not on this machine (resnet50 before
its first download) is skipped with a note: nothing is downloaded.  OpenVINO
models are exported to IMGSEARCH_CACHE_DIR, a temporary folder (removed at
the end) unless that variable is set.
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import shutil
import sys
import tempfile
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

PRECISIONS = ("keras-fp32", "openvino-fp32", "openvino-bf16", "openvino-int8")
REFERENCE = "openvino-fp32"
OVERLAP_AT = 10
OVERLAP_GOOD = 0.9  # a query "keeps its neighbours" at 9 of 10 or better
OFFER_OVERLAP = 0.95
SAMPLE_SEED = 0
CPU_FLAGS = ("avx512_bf16", "avx512_vnni", "amx_bf16", "amx_int8")


def note(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# -- images ---------------------------------------------------------------------
@dataclass
class Split:
    paths: list[Path]
    labels: list[str]


def labelled_files(folder: Path, limit: int | None) -> Split:
    """The labelled images under ``folder``, or ``limit`` of them drawn evenly
    across classes: a seeded shuffle within each class, then one image per
    class in turn, so the sample is the same on every run."""
    from imgsearch.images import discover

    files = [f for f in discover([folder])[0] if f.label is not None]
    if limit is not None and limit < len(files):
        by_class = defaultdict(list)
        for index, f in enumerate(files):
            by_class[f.label].append(index)
        rng = np.random.default_rng(SAMPLE_SEED)
        queues = [list(rng.permutation(by_class[label])) for label in sorted(by_class)]
        chosen: set[int] = set()
        while len(chosen) < limit:
            for queue in queues:
                if queue and len(chosen) < limit:
                    chosen.add(int(queue.pop()))
        # Kept in discovery order: with no limit the calibration sample is
        # then exactly the one `imgsearch index FOLDER/train` would draw.
        files = [f for index, f in enumerate(files) if index in chosen]
    return Split([f.path for f in files], [f.label for f in files])


def decode_all(paths: list[Path], preprocessing, workers: int) -> tuple[np.ndarray, np.ndarray]:
    """uint8 pixels ``(n, size, size, 3)`` of every file, and which decoded."""
    from imgsearch import images as imgs

    size = preprocessing.input_size
    pixels = np.zeros((len(paths), size, size, 3), np.uint8)
    ok = np.ones(len(paths), bool)

    def one(i: int) -> None:
        try:
            pixels[i] = imgs.to_pixels(imgs.read_bytes(paths[i]), preprocessing)[0]
        except imgs.DecodeError as exc:
            ok[i] = False
            note(f"  skipped {paths[i]}: {exc}")

    # Pillow releases the GIL while decoding and resizing.
    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(one, range(len(paths))))
    return pixels, ok


def geometry(preprocessing) -> tuple:
    """What decides the uint8 pixels; normalisation happens at embedding time,
    so encoders that agree on this share one decode."""
    return (preprocessing.input_size, preprocessing.resize, preprocessing.resize_to,
            preprocessing.interpolation)


# -- embedding ------------------------------------------------------------------
@dataclass
class Run:
    precision: str
    ran_as: str
    load_s: float
    images_per_s: float
    vectors: np.ndarray  # L2-normalised, train rows then val rows


def runtime_options(precision: str, encoder, calibration_paths: list[Path]):
    from imgsearch.runtime import Calibration, RuntimeOptions

    runtime, bits = precision.split("-")
    if bits == "int8":
        return Calibration.from_paths(calibration_paths, encoder.preprocessing).options(runtime)
    return RuntimeOptions(runtime, bits)


def embed(registry, name: str, precision: str, pixels: np.ndarray, calibration_paths) -> Run:
    from imgsearch.encoders import l2_normalize

    # A new encoder per precision: the runtime is fixed once one is loaded.
    encoder = registry.create(name)
    # Measured here is whether a precision should be offered at all, so the
    # encoder's own list of offered precisions must not stand in the way.
    encoder.precisions = ("fp32", "bf16", "int8")
    encoder.use_runtime(runtime_options(precision, encoder, calibration_paths))
    started = time.perf_counter()
    encoder.ensure_loaded()  # first use exports (and for int8 quantizes) the model
    load_s = time.perf_counter() - started
    encoder.embed_pixels(pixels[: encoder.batch_size])  # warm-up: first-inference allocations
    started = time.perf_counter()
    vectors = l2_normalize(encoder.embed_pixels(pixels))
    speed = len(pixels) / (time.perf_counter() - started)
    return Run(precision, encoder.runtime_name, load_s, speed, vectors)


# -- measures -------------------------------------------------------------------
def nearest(queries: np.ndarray, index: np.ndarray, k: int, chunk: int = 1024):
    """Exact inner-product search: ids and scores of the ``k`` best, best first."""
    ids, scores = [], []
    for start in range(0, len(queries), chunk):
        sims = queries[start : start + chunk] @ index.T
        top = np.argpartition(-sims, k - 1, axis=1)[:, :k]
        top_sims = np.take_along_axis(sims, top, axis=1)
        order = np.argsort(-top_sims, axis=1, kind="stable")
        ids.append(np.take_along_axis(top, order, axis=1))
        scores.append(np.take_along_axis(top_sims, order, axis=1))
    return np.concatenate(ids), np.concatenate(scores)


def knn_predictions(ids, scores, train_labels, k: int) -> list[str | None]:
    from imgsearch.knn import DEFAULT_TEMPERATURE, vote

    return [vote([(train_labels[j], s) for j, s in zip(row_ids[:k], row_scores[:k])],
                 "weighted", DEFAULT_TEMPERATURE).label
            for row_ids, row_scores in zip(ids, scores)]


def overlaps(ids, reference_ids) -> np.ndarray:
    return np.array([len(set(a[:OVERLAP_AT]) & set(b[:OVERLAP_AT])) / OVERLAP_AT
                     for a, b in zip(ids, reference_ids)])


# -- report ---------------------------------------------------------------------
def machine_line(n_train: int, n_val: int, n_classes: int, k: int) -> str:
    import openvino

    from imgsearch.knn import DEFAULT_TEMPERATURE

    model, flags = None, set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and model is None:
                model = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = set(value.split())
    except OSError:
        pass  # not Linux: OpenVINO's own view below still says what it can use
    try:
        core = openvino.Core()
        model = model or core.get_property("CPU", "FULL_DEVICE_NAME")
        capabilities = " ".join(core.get_property("CPU", "OPTIMIZATION_CAPABILITIES"))
    except Exception:
        capabilities = "unknown"
    shown_flags = ", ".join(f"{flag} {'yes' if flag in flags else 'no'}" for flag in CPU_FLAGS)
    try:
        import nncf

        nncf_version = nncf.__version__
    except ImportError:
        nncf_version = "not installed"
    return (f"CPU: {model or 'unknown'}, {os.cpu_count()} cores ({shown_flags}; OpenVINO sees "
            f"{capabilities}) | OpenVINO {openvino.get_version().split('-')[0]} | NNCF {nncf_version} | "
            f"train {n_train}, val {n_val} images, {n_classes} classes | "
            f"kNN k={k} weighted (T={DEFAULT_TEMPERATURE})")


def report(name: str, runs: dict[str, Run], n_train: int, val_labels: list[str], train_labels, k: int):
    """Print the encoder's table; return its verdict lines."""
    from imgsearch.runtime import FP32_MIN_COSINE

    depth = max(k, OVERLAP_AT)
    reference = runs[REFERENCE].vectors
    ref_ids, ref_scores = nearest(reference[n_train:], reference[:n_train], depth)
    ref_pred = knn_predictions(ref_ids, ref_scores, train_labels, k)
    ref_acc = float(np.mean([p == t for p, t in zip(ref_pred, val_labels)]))

    def compare(queries, index):
        """Top-10 overlap with the reference, kNN accuracy, changed predictions."""
        ids, scores = nearest(queries, index, depth)
        pred = knn_predictions(ids, scores, train_labels, k)
        acc = float(np.mean([p == t for p, t in zip(pred, val_labels)]))
        return overlaps(ids, ref_ids), acc, sum(p != q for p, q in zip(pred, ref_pred))

    def row(label, ran_as, load, speed, cos_min, cos_mean, overlap, acc, changed):
        print(f"| {label} | {ran_as} | {load} | {speed} | {cos_min} | {cos_mean} | {overlap.mean():.4f} "
              f"| {np.mean(overlap >= OVERLAP_GOOD):.3f} | {acc:.4f} | {100 * (acc - ref_acc):+.2f} "
              f"| {changed}/{len(val_labels)} |")

    print(f"\n### {name}\n")
    print("| precision | ran as | load s | images/s | cos min | cos mean | top-10 overlap "
          f"| overlap >= {OVERLAP_GOOD} | kNN top-1 | vs fp32 (pp) | predictions changed |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    verdicts = []
    for precision in PRECISIONS:
        run = runs.get(precision)
        if run is None:
            continue
        cos = (run.vectors * reference).sum(axis=1)
        overlap, acc, changed = compare(run.vectors[n_train:], run.vectors[:n_train])
        row(precision, run.ran_as, f"{run.load_s:.1f}", f"{run.images_per_s:.0f}",
            f"{cos.min():.6f}", f"{cos.mean():.6f}", overlap, acc, changed)
        if precision == "keras-fp32":
            check = "ok" if cos.min() >= FP32_MIN_COSINE else "FAIL"
            verdicts.append(f"{name} keras-fp32 vs openvino-fp32: min cosine {cos.min():.6f} "
                            f"({check}: must be >= {FP32_MIN_COSINE})")
        elif precision != REFERENCE:
            verdict = "offer" if overlap.mean() >= OFFER_OVERLAP else f"below {OFFER_OVERLAP}"
            caveat = "" if run.ran_as == precision else (
                f" [ran as {run.ran_as}: this CPU cannot measure {precision}]")
            verdicts.append(f"{name} {precision}: {verdict} (mean top-10 overlap {overlap.mean():.4f}, "
                            f"kNN top-1 {100 * (acc - ref_acc):+.2f} pp){caveat}")
    int8 = runs.get("openvino-int8")
    if int8 is not None and int8.ran_as == "openvino-int8":
        # What the runtime falls back to when an int8 index is queried where
        # its calibrated model is not cached: fp32 queries against int8 vectors.
        overlap, acc, changed = compare(reference[n_train:], int8.vectors[:n_train])
        row("int8 index, fp32 queries", "-", "-", "-", "-", "-", overlap, acc, changed)
    return verdicts


# -- main -----------------------------------------------------------------------
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", type=Path, help="a folder with train/<class>/ and val/<class>/")
    parser.add_argument("--encoders", default="efficientnet-lite0,resnet50")
    parser.add_argument("--train-limit", type=int, default=None, help="train images (default all)")
    parser.add_argument("--val-limit", type=int, default=None, help="val images (default all)")
    parser.add_argument("-k", type=int, default=10, help="neighbours that vote in kNN")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="decoding threads")
    args = parser.parse_args(argv)
    if args.k < 1:
        parser.error("-k must be at least 1")

    # As the CLI does: TensorFlow's start-up notices would bury the results.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    own_cache = None
    if not os.environ.get("IMGSEARCH_CACHE_DIR"):
        own_cache = tempfile.mkdtemp(prefix="imgsearch-precision-")
        os.environ["IMGSEARCH_CACHE_DIR"] = own_cache
        note(f"OpenVINO models go to {own_cache} (removed at the end; set IMGSEARCH_CACHE_DIR to keep them)")
    try:
        return run(args)
    finally:
        if own_cache:
            shutil.rmtree(own_cache, ignore_errors=True)


def run(args) -> int:
    from imgsearch.encoders import load_registry

    train = labelled_files(args.folder / "train", args.train_limit)
    val = labelled_files(args.folder / "val", args.val_limit)
    if not train.paths or not val.paths:
        note(f"no labelled images in {args.folder}/train/<class>/ and {args.folder}/val/<class>/")
        return 2
    if len(train.paths) < max(args.k, OVERLAP_AT):
        note(f"need at least {max(args.k, OVERLAP_AT)} train images, found {len(train.paths)}")
        return 2
    registry = load_registry()
    encoders = []
    for name in (n.strip() for n in args.encoders.split(",") if n.strip()):
        if name not in registry:
            note(f"skipping {name}: no such encoder (known: {', '.join(registry.names())})")
            continue
        status = registry.create(name).weights_status()
        if not status.available:
            note(f"skipping {name}: its weights are not on this machine ({status.detail})")
            continue
        encoders.append(name)

    paths = train.paths + val.paths
    decoded: dict[tuple, tuple[np.ndarray, np.ndarray]] = {}
    verdicts, header_done = [], False
    for name in encoders:
        preprocessing = registry.get(name).preprocessing
        key = geometry(preprocessing)
        if key not in decoded:
            note(f"decoding {len(paths)} images ({args.workers} threads)")
            started = time.perf_counter()
            decoded.clear()  # one set of pixels at a time: the full set is ~2 GB
            decoded[key] = decode_all(paths, preprocessing, args.workers)
            note(f"  {time.perf_counter() - started:.1f} s")
        pixels, ok = decoded[key]
        keep = np.flatnonzero(ok)
        n_train = int(ok[: len(train.paths)].sum())
        train_labels = [train.labels[i] for i in keep[:n_train]]
        val_labels = [val.labels[i - len(train.paths)] for i in keep[n_train:]]
        calibration = [train.paths[i] for i in keep[:n_train]]
        images = pixels if len(keep) == len(pixels) else pixels[keep]

        if not header_done:
            print(machine_line(n_train, len(val_labels), len(set(train_labels)), args.k))
            header_done = True
        runs: dict[str, Run] = {}
        # The reference first, so that a failure to run it skips the rest.
        for precision in (REFERENCE,) + tuple(p for p in PRECISIONS if p != REFERENCE):
            note(f"embedding {len(images)} images with {name} {precision}")
            try:
                runs[precision] = embed(registry, name, precision, images, calibration)
            except Exception as exc:  # one precision failing must not hide the others
                note(f"  {name} {precision} failed: {type(exc).__name__}: {exc}")
                if precision == REFERENCE:
                    break
                continue
            finally:
                gc.collect()
            note(f"  ran as {runs[precision].ran_as}: load {runs[precision].load_s:.1f} s, "
                 f"{runs[precision].images_per_s:.0f} images/s")
        if REFERENCE not in runs:
            note(f"skipping {name}: the {REFERENCE} reference could not run")
            continue
        verdicts += report(name, runs, n_train, val_labels, train_labels, args.k)

    if verdicts:
        print("\nVerdict (offer when mean top-10 overlap with openvino-fp32 >= "
              f"{OFFER_OVERLAP}):")
        for line in verdicts:
            print(f"- {line}")
    return 0 if verdicts else 1


if __name__ == "__main__":
    sys.exit(main())
