"""The store at scale: commits, cold and warm queries, recall, memory, disk
and optimize, up to a million 2048-d vectors, beside the format 1 store.

Usage:
    python benchmarks/bench_scale.py [--max 1000000] [--baseline-max 50000]
                                     [--baseline-rev REV] [--imagenette DIR]
                                     [--real 5000] [--workdir DIR] [--keep]

What it does, all in one run:

1. Makes an index with the real CLI (`imgsearch index` of one sample photo
   with resnet50 at random weights: 2048-d, like resnet50's ImageNet
   vectors, and usable offline), then commits synthetic unit vectors
   through `Store.commit` in batches of 1,000 up to --max, timing every
   commit.  Per-commit times are the median of the 10 commits that end at
   10k, 100k and 1M.
2. Runs `imgsearch optimize` (the auto type for that size), then times cold
   `imgsearch query PHOTO -k 10` runs in new processes (median of 3; peak
   RSS of the process), once more after dropping the page cache where this
   user may, and warm queries in one process (single and batches of 100),
   and measures recall@10 against exact search (numpy over the stored
   vectors) on 200 fresh queries.
3. The baseline: the same steps with the store of --baseline-rev (format 1,
   the last commit before segments; its code is taken from git with `git
   archive` into the work folder and run with PYTHONPATH) up to
   --baseline-max, where its quadratic commits still finish.

The vectors: a mixture of unit vectors, x = normalise(a*m + b*s_j + c*t_k
+ d*B_k z + sigma*g), with one direction m shared by all (CNN features
are all positive, so unrelated photos still have cosines around 0.25), 100
"super-class" directions s, 4,000 class centres t (each under one super
class; class sizes follow a Zipf law, as in real collections), a
6-dimensional Gaussian latent z mapped by a random basis B_k of the class
(the few ways photos of one thing vary), and isotropic Gaussian noise g;
(a, b, c, d, sigma) = (0.5, 0.35, 0.6, 0.6, 0.6).  With --imagenette, the
same statistics (cosine of random pairs, of the 1st and 10th nearest
neighbour, the fraction of the 10 nearest in the same class, and the
recall@10 of an IVF index probing one of imgsearch's lists, which says how
hard the set is for an approximate index) are printed for efficientnet-lite0
embeddings of --real imagenette photos and for the generator at that size
with 10 classes; the weights were chosen to match them.

Figures vary between runs on a shared machine: compare ratios in one run.
Needs about 9 GB of free disk per million vectors in --workdir.
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

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_speed import _run  # noqa: E402  (wall time and peak RSS of a command)

REPO = Path(__file__).resolve().parent.parent
PHOTO = REPO / "sample_data" / "queries" / "tench.jpg"
DIM = 2048
BATCH = 1000
MARKS = (10_000, 100_000, 1_000_000)


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# -- the synthetic collection ---------------------------------------------------
class Mixture:
    """Clustered unit vectors (see the module docstring)."""

    def __init__(self, dim=DIM, classes=4000, supers=100, seed=0, a=0.5, b=0.35, c=0.6, d=0.6, sigma=0.6,
                 rank=6, bases=256):
        rng = np.random.default_rng(seed)
        self.dim, self.rng = dim, np.random.default_rng(seed + 1)
        self.shared = _unit(rng.standard_normal(dim))
        self.supers = _unit(rng.standard_normal((supers, dim)))
        self.centres = _unit(rng.standard_normal((classes, dim)))
        self.super_of = rng.integers(0, supers, classes)
        # Each class varies along a few directions of its own (pose, light,
        # background), so neighbours lie along a low-dimensional surface and
        # an inverted-list cell boundary cuts through neighbourhoods, as in
        # real embeddings.  Classes share `bases` such bases (memory).
        self.bases = rng.standard_normal((bases, rank, dim)) / np.sqrt(dim)
        weights = 1.0 / np.arange(1, classes + 1) ** 0.5  # Zipf-like class sizes
        self.p = weights / weights.sum()
        self.a, self.b, self.c, self.d, self.sigma = a, b, c, d, sigma

    def sample(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        classes = self.rng.choice(len(self.centres), size=n, p=self.p)
        rank = self.bases.shape[1]
        latent = np.einsum("nr,nrd->nd", self.rng.standard_normal((n, rank)) / np.sqrt(rank),
                           self.bases[classes % len(self.bases)])
        x = (self.a * self.shared + self.b * self.supers[self.super_of[classes]]
             + self.c * self.centres[classes] + self.d * latent
             + self.sigma * self.rng.standard_normal((n, self.dim)) / np.sqrt(self.dim))
        return _unit(x).astype(np.float32), classes


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def neighbour_stats(vectors: np.ndarray, classes: np.ndarray) -> dict:
    sims = vectors @ vectors.T
    np.fill_diagonal(sims, -np.inf)
    order = np.argsort(-sims, axis=1)[:, :10]
    top = np.take_along_axis(sims, order, axis=1)
    rng = np.random.default_rng(0)
    i, j = rng.integers(0, len(vectors), (2, 20000))
    keep = i != j
    return {"random pair": float(np.mean(np.sum(vectors[i[keep]] * vectors[j[keep]], axis=1))),
            "1st neighbour": float(np.mean(top[:, 0])), "10th neighbour": float(np.mean(top[:, 9])),
            "same class in top 10": float(np.mean(classes[order] == classes[:, None])),
            "IVF recall@10, 1 probe": ivf_one_probe_recall(vectors, order)}


def ivf_one_probe_recall(vectors: np.ndarray, order: np.ndarray) -> float:
    """How hard the set is for an inverted-list index: recall@10 of an IVF
    with imgsearch's number of lists for this size, probing one list."""
    import faiss

    from imgsearch.store.ann import nlist_for

    index = faiss.IndexIVFFlat(faiss.IndexFlatIP(vectors.shape[1]), vectors.shape[1],
                               nlist_for(len(vectors)), faiss.METRIC_INNER_PRODUCT)
    index.cp.min_points_per_centroid = 1
    index.train(vectors)
    index.add(vectors)
    index.nprobe = 1
    rows = np.random.default_rng(1).choice(len(vectors), size=min(300, len(vectors)), replace=False)
    _, found = index.search(vectors[rows], 11)
    hits = [len(set(f[f != r][:10]) & set(order[r])) for f, r in zip(found, rows)]
    return float(np.mean(hits) / 10)


def compare_with_imagenette(folder: Path, count: int) -> list[str]:
    from imgsearch import images as imgs
    from imgsearch.encoders import l2_normalize, load_registry
    from imgsearch.runtime import RuntimeOptions

    files, _ = imgs.discover([folder])
    files = [files[int(i * len(files) / count)] for i in range(min(count, len(files)))]
    encoder = load_registry().create("efficientnet-lite0", None).use_runtime(RuntimeOptions("auto")).ensure_loaded()
    pixels = [imgs.to_pixels(imgs.read_bytes(f.path), encoder.preprocessing)[0] for f in files]
    real = l2_normalize(np.concatenate([encoder.embed_pixels(np.stack(pixels[i:i + 32]))
                                        for i in range(0, len(pixels), 32)]))
    labels = sorted({f.label for f in files})
    real_stats = neighbour_stats(real, np.array([labels.index(f.label) for f in files]))
    synthetic, classes = Mixture(classes=10, supers=3, seed=7).sample(len(files))
    synth_stats = neighbour_stats(synthetic, classes)
    lines = [f"| statistic | imagenette, efficientnet-lite0 ({len(files)} photos) | generator ({len(files)}, 10 classes) |",
             "|---|--:|--:|"]
    lines += [f"| {key} | {real_stats[key]:.3f} | {synth_stats[key]:.3f} |" for key in real_stats]
    return lines


# -- helpers -----------------------------------------------------------------------
def imgsearch_cmd(*args, pythonpath: Path | None = None) -> list[str]:
    prefix = [shutil.which("env"), f"PYTHONPATH={pythonpath}"] if pythonpath else []
    # -P: the current folder (perhaps this repository) must not shadow PYTHONPATH
    return prefix + [sys.executable, "-P", "-m", "imgsearch", *map(str, args)]


def disk_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file())


def drop_page_cache() -> bool:
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def cold_queries(index: Path, pythonpath: Path | None = None, repeats: int = 3) -> dict:
    command = imgsearch_cmd("query", PHOTO, "--index", index, "-k", "10", pythonpath=pythonpath)
    _run(command)  # the model's export cache and the file cache settle
    runs = [_run(command) for _ in range(repeats)]
    out = {"seconds": statistics.median(r["seconds"] for r in runs), "rss": max(r["rss"] for r in runs)}
    if drop_page_cache():
        dropped = _run(command)
        out.update(dropped_seconds=dropped["seconds"], dropped_rss=dropped["rss"])
    return out


def commit_loop(index: Path, total: int, mixture: Mixture, marks, start_id: int) -> dict:
    """Commit synthetic vectors in batches; median commit time at each mark."""
    from imgsearch.store import Changes, Entry, Store

    times = []
    with Store.open(index, writable=True) as store:
        next_id = store.next_id
        committed = 0  # the index also holds the CLI's one photo
        while committed < total:
            vectors, classes = mixture.sample(BATCH)
            entries = [Entry(next_id + i, f"/photos/{next_id + i:08d}.jpg", os.urandom(32).hex(), 100_000, 0.0,
                             f"class{c}", 224, 224) for i, c in enumerate(classes)]
            started = time.perf_counter()
            store.commit(Changes(added=entries, vectors=list(vectors)))
            committed += BATCH
            times.append((committed, time.perf_counter() - started))
            next_id += BATCH
            if committed % 100_000 == 0:
                _log(f"  {committed} vectors, last commit {times[-1][1] * 1000:.0f} ms")
    # The 10 commits that end at each mark.
    return {mark: statistics.median(t for n, t in times if mark - 10 * BATCH < n <= mark)
            for mark in marks if mark <= total}


def baseline_worker(index: str, total: int, seed: int) -> None:
    """In a process whose PYTHONPATH holds the old code: commit like the new loop."""
    print(json.dumps({str(k): v for k, v in commit_loop(Path(index), total, Mixture(seed=seed),
                                                         (10_000, 50_000, total), 0).items()}))


def warm_queries(index: Path, queries: np.ndarray) -> dict:
    from imgsearch.store import Store

    for path in index.iterdir():  # warm: the files in the page cache, as on a server that has run a while
        with open(path, "rb") as handle:
            while handle.read(1 << 24):
                pass
    with Store.open(index) as store:
        store.search(queries[:50], 10)
        single = []
        for q in queries[:200]:
            started = time.perf_counter()
            store.search(q[None], 10)
            single.append(time.perf_counter() - started)
        batched = []
        for start in range(0, len(queries), 100):
            started = time.perf_counter()
            store.search(queries[start:start + 100], 10)
            batched.append((time.perf_counter() - started) / 100)
        _, found = store.nearest(queries[:200], 10)
        exact = []
        for segment in store.segments:
            scores, rows = segment.search(queries[:200], 10)
            exact.append((scores, np.asarray(segment.ids)[rows]))
        scores = np.hstack([s for s, _ in exact])
        ids = np.hstack([i for _, i in exact])
        truth = np.take_along_axis(ids, np.argsort(-scores, axis=1)[:, :10], axis=1)
        recall = float(np.mean([len(set(f) & set(t)) / 10 for f, t in zip(found, truth)]))
        return {"single_ms": statistics.median(single) * 1000, "batched_ms": statistics.median(batched) * 1000,
                "recall": recall}


def make_index(folder: Path, pythonpath: Path | None = None) -> None:
    photo_dir = folder.parent / (folder.name + "-photo")
    photo_dir.mkdir(exist_ok=True)
    shutil.copy(PHOTO, photo_dir / PHOTO.name)
    args = ["index", photo_dir, "--index", folder, "--encoder", "resnet50", "--weights", "none"]
    _run(imgsearch_cmd(*args, pythonpath=pythonpath))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max", type=int, default=1_000_000)
    parser.add_argument("--baseline-max", type=int, default=50_000)
    parser.add_argument("--baseline-rev", default="cdf3c0c")
    parser.add_argument("--imagenette", type=Path)
    parser.add_argument("--real", type=int, default=5000)
    parser.add_argument("--workdir", type=Path)
    parser.add_argument("--keep", action="store_true")
    parser.add_argument("--baseline-worker", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.baseline_worker:
        index, total, seed = args.baseline_worker
        baseline_worker(index, int(total), int(seed))
        return
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    work = Path(tempfile.mkdtemp(prefix="bench-scale-", dir=args.workdir))
    report = []
    try:
        if args.imagenette:
            _log("neighbour statistics: imagenette against the generator")
            report += ["## Real and synthetic neighbours", ""] + compare_with_imagenette(args.imagenette, args.real)
            report.append("")

        # The baseline first: its commits slow down as it grows.
        old_code = work / "old-code"
        old_code.mkdir()
        archive = subprocess.run(["git", "-C", str(REPO), "archive", args.baseline_rev, "imgsearch"],
                                 capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(old_code)], input=archive, check=True)
        old_index = work / "old-index"
        _log(f"baseline ({args.baseline_rev}, format 1): committing up to {args.baseline_max}")
        make_index(old_index, old_code)
        worker = subprocess.run(["env", f"PYTHONPATH={old_code}", sys.executable, __file__, "--baseline-worker",
                                 str(old_index), str(args.baseline_max), "0"], capture_output=True, text=True)
        if worker.returncode:
            raise SystemExit(worker.stderr[-3000:])
        old_commits = {int(k): v for k, v in json.loads(worker.stdout.splitlines()[-1]).items()}
        old_cold = cold_queries(old_index, old_code)
        old_disk = disk_bytes(old_index)

        new_index = work / "index"
        _log(f"segments (format 2): committing up to {args.max}")
        make_index(new_index)
        mixture = Mixture(seed=0)
        new_commits = commit_loop(new_index, args.max, mixture, sorted({*MARKS, args.baseline_max, args.max}), 0)
        same_size = work / "same-size"
        _log(f"format 2 at the baseline's size ({args.baseline_max}) for the side-by-side query figures")
        make_index(same_size)
        commit_loop(same_size, args.baseline_max, Mixture(seed=0), (), 0)
        small_cold = cold_queries(same_size)
        _log("cold queries before optimize (every segment searched exactly)")
        unmerged_cold = cold_queries(new_index)
        _log("optimize")
        optimized = _run(imgsearch_cmd("optimize", "--index", new_index))
        info = json.loads(_run(imgsearch_cmd("info", "--index", new_index, "--format", "json"))["stdout"])
        _log("cold and warm queries")
        new_cold = cold_queries(new_index)
        queries, _ = mixture.sample(1000)
        warm = warm_queries(new_index, queries)
        warm_small = warm_queries(same_size, queries)
        new_disk = disk_bytes(new_index)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            _log(f"kept {work}")

    n, b = args.max, args.baseline_max
    fmt = lambda s: f"{s * 1000:.0f} ms"  # noqa: E731
    report += [f"## Store at scale: {n:,} x {DIM} (format 2) beside format 1 ({args.baseline_rev}) at {b:,}", ""]
    report += ["| figure | format 1 | format 2 |", "|---|--:|--:|"]
    for mark in sorted(set(old_commits) | set(new_commits)):
        old = fmt(old_commits[mark]) if mark in old_commits else "-"
        new = fmt(new_commits[mark]) if mark in new_commits else "-"
        report.append(f"| one commit of 1,000 at {mark:,} | {old} | {new} |")
    first, last = new_commits[min(new_commits)], new_commits[max(new_commits)]
    report.append(f"| commit at {max(new_commits):,} / at {min(new_commits):,} | "
                  f"{old_commits[max(old_commits)] / old_commits[min(old_commits)]:.2f} "
                  f"(at {max(old_commits):,}) | {last / first:.2f} |")
    report.append(f"| cold `imgsearch query`, {b:,} images | {old_cold['seconds']:.2f} s, "
                  f"{old_cold['rss']:.0f} MiB | {small_cold['seconds']:.2f} s, {small_cold['rss']:.0f} MiB |")
    report.append(f"| cold `imgsearch query`, {n:,} images, before optimize | - | "
                  f"{unmerged_cold['seconds']:.2f} s, {unmerged_cold['rss']:.0f} MiB |")
    report.append(f"| cold `imgsearch query`, {n:,} images, optimized | - | "
                  f"{new_cold['seconds']:.2f} s, {new_cold['rss']:.0f} MiB |")
    if "dropped_seconds" in new_cold:
        report.append(f"| the same after dropping the page cache | {old_cold.get('dropped_seconds', 0):.2f} s | "
                      f"{new_cold['dropped_seconds']:.2f} s, {new_cold['dropped_rss']:.0f} MiB |")
    report.append(f"| warm query at {b:,} (flat), one image / per image in batches of 100 | - | "
                  f"{warm_small['single_ms']:.2f} / {warm_small['batched_ms']:.2f} ms |")
    report.append(f"| warm query at {n:,}, one image / per image in batches of 100 | - | "
                  f"{warm['single_ms']:.2f} / {warm['batched_ms']:.2f} ms |")
    report.append(f"| recall@10 against exact search, 200 fresh queries | 1 (exact) | {warm['recall']:.3f} |")
    report.append(f"| recall@10 measured by optimize (held-back vectors) | - | {info['recall_at_10']} |")
    params = ", ".join(f"{k} {v}" for k, v in (info["search_params"] or {}).items())
    report.append(f"| index type, parameters | flat | {info['index_type']}{', ' + params if params else ''} |")
    report.append(f"| memory the index type needs | - | {info['memory_bytes'] / 2**30:.2f} GiB |")
    report.append(f"| `imgsearch optimize` | - | {optimized['seconds']:.0f} s, peak {optimized['rss']:.0f} MiB |")
    report.append(f"| disk | {old_disk / 2**20:.0f} MiB at {b:,} | {new_disk / 2**30:.2f} GiB at {n:,} |")
    print("\n".join(report))


if __name__ == "__main__":
    main()
