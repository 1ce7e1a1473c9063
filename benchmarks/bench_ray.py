"""Indexing with and without Ray on this machine, in one run.

    python benchmarks/bench_ray.py PHOTOS [--images 2000] [--repeat 3]
        [--encoder efficientnet-lite0] [--encoder resnet50:none]

For each encoder (``NAME`` or ``NAME:WEIGHTS``), the same copy of
``--images`` photos from PHOTOS is indexed into a new index, in turn:

- locally (``imgsearch index``),
- on one node (``--ray local``: a Ray cluster started for the run),
- on two nodes of one CPU each, started here on loopback with ``ray start``
  and token authentication before the run and stopped after it (what a
  cluster that is already running costs over one node).

Each is timed as a whole command in a new process, start-up included, the
median of ``--repeat`` runs in rotation (so that a slow minute of a noisy
machine hits each the same), and the Ray indexes are checked against the
local one (same rows, cosine of every vector pair).  The encoder's exported
model is made once before timing.  Every figure printed comes from this run.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

BIN = Path(sys.executable).parent
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from ray_nodes import TwoNodes  # noqa: E402  (the tests' cluster on loopback)
SUFFIXES = {".jpg", ".jpeg", ".png", ".JPEG"}


def copy_photos(source: Path, target: Path, count: int) -> int:
    """The first ``count`` photos, sorted, spread over source's sub-folders."""
    photos = sorted(p for p in source.rglob("*") if p.suffix in SUFFIXES)
    by_folder: dict[Path, list[Path]] = {}
    for photo in photos:
        by_folder.setdefault(photo.parent, []).append(photo)
    folders = sorted(by_folder)
    chosen = []
    while len(chosen) < count and any(by_folder.values()):
        for folder in folders:
            if by_folder[folder] and len(chosen) < count:
                chosen.append(by_folder[folder].pop(0))
    for photo in chosen:
        destination = target / photo.parent.name / photo.name
        destination.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(photo, destination)
    return len(chosen)


def timed(args, env) -> float:
    started = time.perf_counter()
    result = subprocess.run([str(BIN / "imgsearch"), *map(str, args)], env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if result.returncode:
        sys.exit(f"imgsearch {' '.join(map(str, args))} failed:\n{result.stderr}")
    return seconds


def _folder(way: str, round_: int) -> str:
    return f"{way.replace(' ', '').replace(',', '')}-{round_}"


def compare(local: Path, other: Path) -> tuple[bool, float]:
    from imgsearch.store import Store

    with Store.open(local) as a, Store.open(other) as b:
        rows_a, rows_b = a.entries(), b.entries()
        same = [(e.id, e.path, e.sha256, e.label, e.width, e.height) for e in rows_a] == \
               [(e.id, e.path, e.sha256, e.label, e.width, e.height) for e in rows_b]
        cosines = np.sum(a.vectors([e.id for e in rows_a]) * b.vectors([e.id for e in rows_b]), axis=1)
        return same, float(cosines.min())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("photos", type=Path)
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--encoder", action="append", default=None,
                        help="NAME or NAME:WEIGHTS (default: efficientnet-lite0 and resnet50:none)")
    args = parser.parse_args()
    encoders = args.encoder or ["efficientnet-lite0", "resnet50:none"]
    work = Path(tempfile.mkdtemp(prefix="bench-ray-"))
    try:
        photos = work / "photos"
        count = copy_photos(args.photos, photos, args.images)
        print(f"{count} photos, {os.cpu_count()} CPUs, median of {args.repeat} runs each, start-up included\n")
        env = {**os.environ, "RAY_ADDRESS": ""}
        rows = []
        for spec in encoders:
            name, _, weights = spec.partition(":")
            chosen = ["--encoder", name] + (["--weights", weights] if weights else [])
            # The exported model is made once, outside the timings.
            few = work / "few"
            copy_photos(args.photos, few, 4)
            timed(["index", few, "--index", work / "warm", *chosen], env)
            shutil.rmtree(work / "warm")
            times = {"local": [], "ray, 1 node": [], "ray, 2 nodes": []}
            for round_ in range(args.repeat):
                def run(way, extra, way_env):
                    target = work / _folder(way, round_)
                    times[way].append(timed(["index", photos, "--index", target, *chosen, *extra], way_env))

                run("local", [], env)
                run("ray, 1 node", ["--ray", "local"], env)
                # Started only for its own runs, so that its idle
                # processes take nothing from the others.
                with TwoNodes(work) as cluster:
                    run("ray, 2 nodes", ["--ray", cluster.address], cluster.env)
            checks = {way: compare(work / _folder("local", 0), work / _folder(way, 0))
                      for way in ("ray, 1 node", "ray, 2 nodes")}
            local = statistics.median(times["local"])
            for way, seconds in times.items():
                middle = statistics.median(seconds)
                same, cosine = checks.get(way, (True, 1.0))
                rows.append((spec, way, middle, count / middle, middle / local, same, cosine))
            for path in work.glob("*-[0-9]*"):
                shutil.rmtree(path)
        print("| encoder | how | seconds | images/s | x local | same rows | min cosine |")
        print("|---|---|--:|--:|--:|:-:|--:|")
        for spec, way, seconds, rate, ratio, same, cosine in rows:
            print(f"| {spec} | {way} | {seconds:.1f} | {rate:.0f} | {ratio:.2f} | {'yes' if same else 'NO'} "
                  f"| {cosine:.6f} |")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
