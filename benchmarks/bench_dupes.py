"""How well `imgsearch dupes` finds near-duplicates, and how long it takes.

Usage:
    python benchmarks/bench_dupes.py IMAGENETTE [--planted 150] [--others 400]
                                     [--vectors 100000] [--seed 0] [--workdir DIR]
                                     [--skip-quality] [--skip-timing]

Quality, on real photos (efficientnet-lite0 with its ImageNet weights):

1. Indexes imagenette's val photos as they are (kept in --workdir for the
   next run), to know which photos look alike: the three nearest other
   photos of each planted original become its distractors (distinct but
   similar pictures, mostly of the same class and scene type), and so do
   all val photos that already reach cosine 0.9 with another one (golf
   balls, one portrait taken twice), split between the corpora;
   nobody planted those, so grouping them counts as a false positive.
2. Builds two disjoint corpora (tuning and test) from val photos.  Each
   photo is upscaled 3x to 672 px (imagenette's photos are 224 px, smaller
   than the 256 px the encoder reads; camera photos are far larger).  Each
   planted original gets four near-duplicates: resized (to half size),
   recompressed (JPEG quality 30), cropped (a window of 90% of each side,
   placed at random) and mirrored (left-right); one in ten also gets a
   byte-identical copy.  The rest of the corpus is the distractors and
   --others random val photos.
3. Indexes each corpus with `imgsearch`'s library, runs `dupes.find` at a
   range of thresholds and scores the groups: a planted copy counts as
   found when it is in its original's group; precision counts the pairs of
   images inside each group that come from one photo.  The default
   threshold is chosen on the tuning corpus (the one with the best lowest
   per-kind recall among those with precision >= 0.95) and reported on the
   test corpus.  The pairs `dupes.pairs` returns are checked against
   brute-force numpy over the stored vectors.

Timing, on --vectors synthetic 1280-d vectors (efficientnet-lite0's width;
the clustered generator of bench_scale.py) with 500 planted copies at
cosine 0.93 to 0.99: the range search of every vector over the index as
committed (segments searched exactly: the reference) and after `optimize`
with the automatic type (ivf-sq8 at 100,000), with the share of the exact
pairs that the approximate search finds, and `dupes.find` on the latter.

Figures vary between runs on a shared machine: compare within one run.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_scale import Mixture  # noqa: E402  (clustered synthetic vectors)

KINDS = ("resized", "recompressed", "cropped", "mirrored")
UPSCALE = 3
ENCODER = "efficientnet-lite0"
THRESHOLDS = [round(t, 2) for t in np.arange(0.80, 0.995, 0.01)]
IMAGEDEDUP_CNN_DEFAULT = 0.9  # imagededup's documented min_similarity_threshold for CNN


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# -- the planted corpus ---------------------------------------------------------
def _upright(path: Path):
    from PIL import Image, ImageOps

    image = ImageOps.exif_transpose(Image.open(path)).convert("RGB")  # a few val photos are grey
    return image.resize((image.width * UPSCALE, image.height * UPSCALE), Image.BICUBIC)


def _plant(image, stem: str, folder: Path, rng: random.Random) -> dict[str, Path]:
    from PIL import Image, ImageOps

    w, h = image.size
    out = {}
    out["resized"] = folder / f"{stem}.resized.jpg"
    image.resize((w // 2, h // 2), Image.LANCZOS).save(out["resized"], quality=90)
    out["recompressed"] = folder / f"{stem}.recompressed.jpg"
    image.save(out["recompressed"], quality=30)
    cw, ch = int(w * 0.9), int(h * 0.9)
    x, y = rng.randint(0, w - cw), rng.randint(0, h - ch)
    out["cropped"] = folder / f"{stem}.cropped.jpg"
    image.crop((x, y, x + cw, y + ch)).save(out["cropped"], quality=90)
    out["mirrored"] = folder / f"{stem}.mirrored.jpg"
    ImageOps.mirror(image).save(out["mirrored"], quality=90)
    return out


def build_corpus(folder: Path, originals: list[Path], distractors: list[Path], seed: int) -> dict:
    """Files of one corpus and what each of them is a copy of."""
    rng = random.Random(seed)
    folder.mkdir(parents=True)
    source_of: dict[str, str] = {}   # path -> the val photo it shows
    kind_of: dict[str, str] = {}     # planted copy -> its kind
    exact: list[str] = []
    for number, photo in enumerate(originals):
        image = _upright(photo)
        path = folder / f"{photo.stem}.jpg"
        image.save(path, quality=95)
        source_of[str(path)] = photo.stem
        for kind, copy in _plant(image, photo.stem, folder, rng).items():
            source_of[str(copy)] = photo.stem
            kind_of[str(copy)] = kind
        if number % 10 == 0:
            twin = folder / f"{photo.stem}.exact.jpg"
            shutil.copyfile(path, twin)
            exact.append(str(twin))
            source_of[str(twin)] = photo.stem
    for photo in distractors:
        path = folder / f"{photo.stem}.jpg"
        _upright(photo).save(path, quality=95)
        source_of[str(path)] = photo.stem
    return {"source_of": source_of, "kind_of": kind_of, "exact": exact}


def index_folder(folder: Path, index: Path) -> None:
    from imgsearch import Index

    started = time.perf_counter()
    with Index.build(index, encoder=ENCODER) as ix:
        report = ix.add([folder])
    _log(f"  indexed {report.added} images of {folder.name} ({len(report.duplicates)} exact copies) "
         f"in {time.perf_counter() - started:.0f} s")


# -- scoring --------------------------------------------------------------------
def score(groups, corpus: dict) -> dict:
    """Recall per kind (copies in their original's group), and precision of
    the image pairs inside groups (overall and per kind of copy)."""
    source_of, kind_of = corpus["source_of"], corpus["kind_of"]
    group_of = {}
    for number, group in enumerate(groups):
        for member in group.members:
            group_of[member.entry.path] = number
            group_of.update((copy, number) for copy in member.copies)
    exact = set(corpus["exact"])
    originals = {source_of[p]: p for p in source_of if p not in kind_of and p not in exact}
    found = {kind: [] for kind in KINDS}
    for path, kind in kind_of.items():
        original = originals[source_of[path]]
        found[kind].append(path in group_of and group_of.get(original) == group_of[path])
    pairs = {"all": [0, 0], **{kind: [0, 0] for kind in KINDS}}  # [true, predicted]
    for group in groups:
        paths = [m.entry.path for m in group.members]
        for i, a in enumerate(paths):
            for b in paths[i + 1:]:
                true = source_of[a] == source_of[b]
                for key in {"all", kind_of.get(a, "all"), kind_of.get(b, "all")}:
                    pairs[key][0] += true
                    pairs[key][1] += 1
    copies_listed = sum(len(m.copies) for g in groups for m in g.members)
    return {"recall": {k: float(np.mean(v)) for k, v in found.items()},
            "precision": {k: (t / n if n else 1.0) for k, (t, n) in pairs.items()},
            "predicted_pairs": pairs["all"][1], "exact_copies_listed": copies_listed,
            "groups": len(groups)}


def sweep(index: Path, corpus: dict) -> dict[float, dict]:
    from imgsearch import dupes
    from imgsearch.store import Store

    results = {}
    with Store.open(index) as store:
        for threshold in THRESHOLDS:
            results[threshold] = score(dupes.find(store, threshold), corpus)
    return results


def brute_force_check(index: Path, threshold: float) -> tuple[bool, int]:
    """Whether dupes.pairs equals numpy's all-pairs answer; the pair count."""
    from imgsearch import dupes
    from imgsearch.store import Store

    with Store.open(index) as store:
        ids = store.ids()
        vectors = store.vectors(ids)
        found = {(a, b) for a, b, _ in dupes.pairs(store, threshold)}
    rows, cols = np.nonzero(np.triu(vectors @ vectors.T, 1) >= threshold)
    expected = {(int(ids[r]), int(ids[c])) for r, c in zip(rows, cols)}
    return found == expected, len(expected)


def choose(results: dict[float, dict]) -> float:
    ok = [t for t, r in results.items() if r["precision"]["all"] >= 0.95]
    return max(ok, key=lambda t: (min(results[t]["recall"].values()), t)) if ok else max(results)


def _row(name: str, r: dict) -> str:
    return (f"| {name} | " + " | ".join(f"{r['precision'][k]:.3f} / {r['recall'][k]:.3f}" for k in KINDS)
            + f" | {r['precision']['all']:.3f} | {r['predicted_pairs']} | {r['exact_copies_listed']} |")


def quality(imagenette: Path, work: Path, planted: int, others: int, seed: int, cache: Path | None) -> None:
    from imgsearch import dupes
    from imgsearch.store import Store

    photos = sorted((imagenette / "val").glob("*/*.JPEG"))
    val_index = (cache or work) / "val-ix"
    if not val_index.exists():
        _log(f"1. indexing {len(photos)} imagenette val photos as they are")
        index_folder(imagenette / "val", val_index)
    with Store.open(val_index) as store:
        ids = store.ids()
        entries = store.entries_by_id(ids)
        by_stem = {Path(e.path).stem: e for e in entries.values()}
        # Distinct val photos that already reach cosine 0.9 (golf balls, a
        # portrait taken twice): the hardest distractors there are.
        # Nobody planted them, so grouping them counts against precision.
        twins = dupes.pairs(store, 0.9)
        print(f"imagenette val: {len(twins)} pairs of distinct photos at cosine >= 0.9; they go into the "
              "corpora as distractors (grouping them counts as a false positive)")
        for a, b, s in sorted(twins, key=lambda t: -t[2])[:10]:
            print(f"  {s:.3f} {Path(entries[a].path).name} {Path(entries[b].path).name}")
        link: dict[str, str] = {}

        def root(stem):
            while link.get(stem, stem) != stem:
                stem = link[stem]
            return stem

        for a, b, _ in twins:
            link.setdefault(Path(entries[a].path).stem, Path(entries[a].path).stem)
            link.setdefault(Path(entries[b].path).stem, Path(entries[b].path).stem)
            link[root(Path(entries[a].path).stem)] = root(Path(entries[b].path).stem)
        clusters: dict[str, list[str]] = {}
        for stem in link:
            clusters.setdefault(root(stem), []).append(stem)
        twin_sets = [[], []]
        for number, members in enumerate(sorted(clusters.values())):
            twin_sets[number % 2] += members
        rng = random.Random(seed)
        taken: set[str] = set(link)
        usable = [p for p in photos if p.stem not in taken]
        rng.shuffle(usable)
        corpora = []
        for name, twin_stems in zip(("tuning", "test"), twin_sets):
            originals = []
            for photo in usable:
                if len(originals) == planted:
                    break
                if photo.stem not in taken:
                    originals.append(photo)
                    taken.add(photo.stem)
            # The 3 nearest other photos of each original: similar, distinct.
            near = store.search(store.vectors([by_stem[p.stem].id for p in originals]), 8)
            distractors = [Path(by_stem[stem].path) for stem in twin_stems]
            for hits in near:
                chosen = [Path(h.entry.path) for h in hits if Path(h.entry.path).stem not in taken][:3]
                for path in chosen:
                    taken.add(path.stem)
                distractors += chosen
            hard = len(distractors)
            for photo in usable:
                if len(distractors) == hard + others:
                    break
                if photo.stem not in taken:
                    distractors.append(photo)
                    taken.add(photo.stem)
            corpora.append((name, originals, distractors, hard))
    results = {}
    for name, originals, distractors, hard in corpora:
        _log(f"2. {name} corpus: {len(originals)} originals x {len(KINDS)} kinds, {hard} similar and "
             f"{len(distractors) - hard} random distractors")
        corpus = build_corpus(work / name, originals, distractors, seed)
        index = work / f"{name}-ix"
        index_folder(work / name, index)
        results[name] = (corpus, index, sweep(index, corpus))
        print(f"{name} corpus: {len(corpus['source_of'])} files, {len(originals)} originals "
              f"with {len(corpus['kind_of'])} planted copies and {len(corpus['exact'])} exact copies, "
              f"{hard} similar distractors (val photos at cosine >= 0.9 to another, and the 3 nearest other "
              f"val photos of each original) and {len(distractors) - hard} random ones")
    tuned = choose(results["tuning"][2])
    print(f"\nthreshold chosen on the tuning corpus: {tuned} (dupes.DEFAULT_THRESHOLD is {dupes.DEFAULT_THRESHOLD})")
    header = ("| threshold | " + " | ".join(f"{k} P / R" for k in KINDS)
              + " | precision, all pairs | pairs in groups | exact copies listed |")
    for name in ("tuning", "test"):
        corpus, index, sweep_results = results[name]
        print(f"\n{name} corpus, precision / recall per kind of planted copy:")
        print(header)
        print("|" + "---|" * (len(KINDS) + 4))
        for threshold, r in sweep_results.items():
            print(_row(f"{threshold:.2f}" + (" (default)" if threshold == dupes.DEFAULT_THRESHOLD else ""), r))
    corpus, index, sweep_results = results["test"]
    at_default = sweep_results[dupes.DEFAULT_THRESHOLD]
    print(f"\ntest corpus at the default {dupes.DEFAULT_THRESHOLD}: "
          f"lowest recall {min(at_default['recall'].values()):.3f}, precision {at_default['precision']['all']:.3f}")
    print(f"imagededup's CNN default ({IMAGEDEDUP_CNN_DEFAULT}) with this encoder: "
          + _row("", sweep_results[IMAGEDEDUP_CNN_DEFAULT]))
    for name in ("tuning", "test"):
        same, count = brute_force_check(results[name][1], dupes.DEFAULT_THRESHOLD)
        print(f"{name}: dupes.pairs equals brute-force numpy at {dupes.DEFAULT_THRESHOLD}: {same} ({count} pairs)")


# -- timing ---------------------------------------------------------------------
def timing(work: Path, count: int, seed: int) -> None:
    from imgsearch import dupes
    from imgsearch.store import Changes, Entry, Store, optimize

    dim, planted = 1280, 1000  # the first 1,000 vectors: 500 and a copy of each
    mixture = Mixture(dim=dim, seed=seed)
    rng = np.random.default_rng(seed)
    index = work / "synthetic-ix"
    store = Store.create(index, encoder={"name": "synthetic"}, dim=dim)
    next_id = 1
    for start in range(0, count, 1000):
        n = min(1000, count - start)
        vectors, _ = mixture.sample(n)
        if start < planted:  # copies of earlier vectors at cosine about 0.93 to 0.99
            base = vectors[: n // 2]
            eps = rng.uniform(0.15, 0.4, (len(base), 1))
            noise = eps * rng.standard_normal(base.shape) / np.sqrt(dim)
            copies = base + noise
            vectors[n // 2: n // 2 + len(base)] = copies / np.linalg.norm(copies, axis=1, keepdims=True)
        entries = [Entry(next_id + i, f"/v/{next_id + i:07d}.jpg", os.urandom(16).hex(), 1, 0.0, None, 224, 224)
                   for i in range(n)]
        store.commit(Changes(added=entries, vectors=list(vectors)))
        next_id += n
    store.close()
    print(f"\ntiming: {count} synthetic {dim}-d vectors, dupes.find at {dupes.DEFAULT_THRESHOLD}")

    def run(label: str, exact=None):
        with Store.open(index) as reader:
            started = time.perf_counter()
            pairs = {(a, b) for a, b, _ in dupes.pairs(reader, dupes.DEFAULT_THRESHOLD)}
            seconds = time.perf_counter() - started
            started = time.perf_counter()
            groups = dupes.find(reader, dupes.DEFAULT_THRESHOLD) if exact is not None else None
            find_seconds = time.perf_counter() - started
        found = f"{len(pairs & exact)} of {len(exact)}" if exact is not None else "(the reference)"
        whole = f"{find_seconds:.1f} s, {len(groups)} groups" if groups is not None else "-"
        print(f"| {label} | {seconds:.1f} s | {len(pairs)} | {found} | {whole} |")
        return pairs

    with Store.open(index) as reader:
        segments = len(reader.segments)
    print("| index | range search of every vector | pairs | exact pairs found | dupes.find |")
    print("|---|--:|--:|--:|--:|")
    exact = run(f"as committed: {segments} segments, exact")
    with Store.open(index, writable=True) as writer:
        report = optimize(writer, index_type="auto", force=True)
    run(f"optimized, auto: {report.index_type} (nprobe {report.params.get('value')})", exact)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("imagenette", type=Path)
    parser.add_argument("--planted", type=int, default=150, help="originals with planted copies, per corpus")
    parser.add_argument("--others", type=int, default=400, help="random distractor photos, per corpus")
    parser.add_argument("--vectors", type=int, default=100_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--skip-quality", action="store_true")
    parser.add_argument("--skip-timing", action="store_true")
    args = parser.parse_args()
    if not (args.imagenette / "val").is_dir():
        parser.error(f"{args.imagenette} has no val/ folder (imagenette's layout)")
    work = Path(tempfile.mkdtemp(prefix="bench-dupes-", dir=args.workdir))
    try:
        if not args.skip_quality:
            quality(args.imagenette, work, args.planted, args.others, args.seed, args.workdir)
        if not args.skip_timing:
            timing(work, args.vectors, args.seed)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
