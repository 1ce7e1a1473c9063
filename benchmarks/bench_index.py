"""Indexing speed and memory, beside a naive baseline, in one run.

Usage:
    python benchmarks/bench_index.py FOLDER [--encoder NAME] [--weights W]
                                     [--limit N] [--batch-size 32] [--repeats 3]

Each phase runs in a process of its own so that its peak memory (max RSS) is
its own; each is repeated and the median reported:

  decode    read + decode (draft mode) + resize, as `imgsearch index` does it
  encode    the encoder alone on already-resized pixels (model load excluded)
  naive     the baseline: Pillow open/convert/resize one image at a time, then
            Keras `model.predict` per batch (model load excluded)
  pipeline  `Index.add` in a process whose encoder is already loaded: the
            indexing pipeline itself, comparable with `naive`
  index     the whole `imgsearch index` command as a user runs it, start-up,
            model load and writing the index included

Figures vary between runs on a shared machine: compare the ratios printed
in one run rather than figures from different runs.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _images(folder: Path, limit: int | None) -> list[Path]:
    from imgsearch.images import discover

    files, _ = discover([folder])
    return [f.path for f in files][:limit] if limit else [f.path for f in files]


def _encoder(name: str, weights: str | None):
    from imgsearch.encoders import load_registry

    return load_registry().create(name, weights).ensure_loaded()


def phase_decode(paths, args) -> float:
    from imgsearch import images as imgs
    from imgsearch.encoders import load_registry

    prep = load_registry().get(args.encoder).preprocessing
    started = time.perf_counter()
    for path in paths:
        prep.resize_image(imgs.decode(imgs.read_bytes(path), draft_size=prep.draft_size))
    return time.perf_counter() - started


def phase_encode(paths, args) -> float:
    import numpy as np

    from imgsearch import images as imgs

    encoder = _encoder(args.encoder, args.weights)
    prep = encoder.preprocessing
    pixels = np.stack([prep.resize_image(imgs.decode(imgs.read_bytes(p), draft_size=prep.draft_size))
                       for p in paths])
    encoder.embed_pixels(pixels[: args.batch_size])  # warm-up: tracing, allocations
    started = time.perf_counter()
    for start in range(0, len(pixels), args.batch_size):
        encoder.embed_pixels(pixels[start : start + args.batch_size])
    return time.perf_counter() - started


def phase_naive(paths, args) -> float:
    import numpy as np
    from PIL import Image

    from imgsearch.encoders import load_registry

    # Only build_model() and the preprocessing are needed: an encoder left
    # unloaded keeps the default runtime (OpenVINO) out of the baseline.
    encoder = load_registry().create(args.encoder, args.weights)
    model = encoder.build_model()
    prep = encoder.preprocessing
    size = prep.input_size
    model.predict(np.zeros((args.batch_size, size, size, 3), np.float32), verbose=0)  # warm-up
    started = time.perf_counter()
    batch = []
    for i, path in enumerate(paths):
        with Image.open(path) as image:
            batch.append(np.asarray(image.convert("RGB").resize((size, size)), dtype=np.uint8))
        if len(batch) == args.batch_size or i == len(paths) - 1:
            model.predict(prep.normalize(np.stack(batch)), verbose=0)
            batch = []
    return time.perf_counter() - started


def phase_pipeline(paths, args) -> float:
    """`Index.add` with the encoder already loaded: the indexing pipeline
    (threaded decode, batched inference, commits) without process start-up."""
    import tempfile

    from imgsearch import Index

    with tempfile.TemporaryDirectory() as work, \
            Index.build(Path(work) / "ix", encoder=args.encoder, weights=args.weights) as index:
        started = time.perf_counter()
        index.add([Path(args.paths_file).parent / "images"], batch_size=args.batch_size)
        return time.perf_counter() - started


PHASES = {"decode": phase_decode, "encode": phase_encode, "naive": phase_naive, "pipeline": phase_pipeline}


def _child(command: list[str]) -> tuple[float, float, str]:
    """Run a command; its wall seconds, peak RSS in MiB and stdout."""
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    out = process.stdout.read()
    _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - started
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"benchmark step failed: {' '.join(command)}")
    return seconds, usage.ru_maxrss / 1024, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path)
    parser.add_argument("--encoder", default="efficientnet-lite0")
    parser.add_argument("--weights", default=None)
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--phase", choices=sorted(PHASES), help=argparse.SUPPRESS)
    parser.add_argument("--paths-file", help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

    if args.phase:  # inside a child: time one phase, print seconds
        paths = [Path(p) for p in Path(args.paths_file).read_text().splitlines()]
        print(json.dumps({"seconds": PHASES[args.phase](paths, args)}))
        return

    paths = _images(args.folder, args.limit)
    if not paths:
        raise SystemExit(f"no images in {args.folder}")
    work = Path(tempfile.mkdtemp(prefix="imgsearch-bench-"))
    try:
        listing = work / "paths.txt"
        listing.write_text("\n".join(str(p) for p in paths))
        # `imgsearch index` takes folders: give it exactly these images.
        subset = work / "images"
        for i, path in enumerate(paths):
            label_dir = subset / path.parent.name
            label_dir.mkdir(parents=True, exist_ok=True)
            os.symlink(path, label_dir / f"{i:06d}{path.suffix}")
        common = ["--encoder", args.encoder, "--batch-size", str(args.batch_size)]
        if args.weights:
            common += ["--weights", args.weights]

        results: dict[str, list[tuple[float, float]]] = {}
        for _ in range(args.repeats):
            for phase in ("decode", "encode", "naive", "pipeline"):
                _, rss, out = _child([sys.executable, __file__, str(args.folder), "--phase", phase,
                                      "--paths-file", str(listing), *common])
                results.setdefault(phase, []).append((json.loads(out)["seconds"], rss))
            index_dir = work / "index"
            shutil.rmtree(index_dir, ignore_errors=True)
            seconds, rss, _ = _child([sys.executable, "-m", "imgsearch", "index", str(subset),
                                      "--index", str(index_dir), *common])
            results.setdefault("index", []).append((seconds, rss))
    finally:
        shutil.rmtree(work, ignore_errors=True)

    n = len(paths)
    rate = {phase: n / statistics.median(s for s, _ in runs) for phase, runs in results.items()}
    print(f"{n} images from {args.folder}, encoder {args.encoder}, batch {args.batch_size}, "
          f"median of {args.repeats}, {os.cpu_count()} CPUs")
    print(f"{'phase':<34}{'images/s':>10}{'peak MiB':>10}{'vs naive':>10}")
    labels = {
        "decode": "decode + resize (ours)",
        "encode": "encoder only",
        "naive": "naive baseline (Pillow + predict)",
        "pipeline": "Index.add, model loaded",
        "index": "imgsearch index, end to end",
    }
    for phase in ("decode", "encode", "naive", "pipeline", "index"):
        peak = statistics.median(r for _, r in results[phase])
        print(f"{labels[phase]:<34}{rate[phase]:>10.1f}{peak:>10.0f}{rate[phase] / rate['naive']:>9.2f}x")


if __name__ == "__main__":
    main()
