"""Indexing, embedding and query speed per runtime and precision, beside a
naive baseline, with peak memory, in one run.

Usage:
    python benchmarks/bench_speed.py FOLDER [--encoder resnet50] [--weights W]
                                     [--limit 400] [--big 64] [--query-index-size 10000]
                                     [--repeats 3] [--variants keras-fp32,openvino-fp32,...]
                                     [--batch-sizes 1,8,32] [--embed-images 64]
                                     [--query-precision P] [--cache-dir DIR]
                                     [--skip-query] [--skip-memory]

FOLDER is searched recursively (e.g. imagenette's root: train and val).  Image
sets, picked evenly over FOLDER's images so that every class folder shows up:

  photos    --limit of FOLDER's own photos
  12-MP     --big JPEGs of 4000x3000 generated from photos (bicubic upscale,
            Gaussian noise sigma 6, quality 90) into a temporary folder

Every timed step runs in a process of its own, so that its peak memory
(max RSS) is its own; the timed steps are repeated --repeats times,
interleaved, and the median reported.  Before anything is timed, each model
is loaded once (`load`): the OpenVINO export, int8 calibration and so on are
reported on their own, and every later step finds the model cached in a
fresh cache folder (IMGSEARCH_CACHE_DIR is set to it for the whole run,
whatever it was; --cache-dir names one to keep).  The tables go to stdout
as markdown, progress to stderr.

  load      encoder.ensure_loaded() per runtime/precision: first (export or
            calibration included) and again from the cache
  naive     (a) the baseline: Pillow open/convert/resize one image at a time
            (no draft mode), Keras `model.predict` per batch (model load
            excluded); bench_index.phase_naive
  decode    (a) read + decode (draft mode) + resize only, as the indexer does
            it; bench_index.phase_decode
  index     (a) `imgsearch index` as a user runs it (start-up, cached model
            load, writing the index included), per runtime/precision, on
            each image set
  encode    (b) the encoder alone on pre-resized pixels of --embed-images
            photos, per runtime/precision and batch size (model load
            excluded); bench_index.phase_encode
  query     (c) `imgsearch query ONE.jpg -k 10` in a fresh process on an
            index of --query-index-size images (built once, reported), with
            the default runtime and with --runtime keras; `imgsearch --help`
  memory    (d) peak RSS of `imgsearch index` for N (the photos runs), 4N
            and --query-index-size images at --query-precision

int8 models are calibrated on the images being indexed (as `imgsearch index
--precision int8` does), so each image set has its own; the encoder-only
int8 figures use the photos' one.  Figures vary between runs on a shared
machine: compare the ratios printed in one run rather than figures from
different runs.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_index  # noqa: E402  (the phases shared with the indexing benchmark)

# name -> (--runtime, --precision)
VARIANTS = {
    "keras-fp32": ("keras", "fp32"),
    "openvino-fp32": ("openvino", "fp32"),
    "openvino-bf16": ("openvino", "bf16"),
    "openvino-int8": ("openvino", "int8"),
}
BIG_SIZE = (4000, 3000)
BIG_NOISE_SIGMA = 6.0
BIG_QUALITY = 90


# -- in a child process ---------------------------------------------------
def _runtime_options(variant: str, encoder, calibrate: str | None):
    from imgsearch.runtime import Calibration, RuntimeOptions

    runtime, precision = VARIANTS[variant]
    if precision == "int8":
        # The same images `imgsearch index DIR --precision int8` calibrates
        # on, hence the same cache entry as the index runs.
        return Calibration.from_paths([calibrate], encoder.preprocessing).options(runtime)
    return RuntimeOptions(runtime, precision)


def _use_variant(args, loaded: list) -> None:
    """Make bench_index's phases create their encoder at args.variant; the
    encoder made is appended to ``loaded`` (to report what actually ran)."""
    from imgsearch.encoders import load_registry

    def make(name, weights):
        encoder = load_registry().create(name, weights)
        encoder.use_runtime(_runtime_options(args.variant, encoder, args.calibrate))
        loaded.append(encoder.ensure_loaded())
        return encoder

    bench_index._encoder = make


def child_load(paths, args) -> dict:
    from imgsearch.encoders import load_registry

    encoder = load_registry().create(args.encoder, args.weights)
    encoder.use_runtime(_runtime_options(args.variant, encoder, args.calibrate))
    started = time.perf_counter()
    encoder.ensure_loaded()
    return {"seconds": time.perf_counter() - started, "runtime": encoder.runtime_name}


def child_encode(paths, args) -> dict:
    loaded = []
    _use_variant(args, loaded)
    seconds = bench_index.phase_encode(paths, args)
    return {"seconds": seconds, "runtime": loaded[0].runtime_name}


def child_naive(paths, args) -> dict:
    return {"seconds": bench_index.phase_naive(paths, args), "runtime": "keras predict"}


def child_decode(paths, args) -> dict:
    return {"seconds": bench_index.phase_decode(paths, args), "runtime": "-"}


CHILDREN = {"load": child_load, "encode": child_encode, "naive": child_naive, "decode": child_decode}


# -- in the parent ----------------------------------------------------------
# Runs a command and writes its wall seconds, peak RSS (KiB) and exit code to
# a file.  Linux carries a process's high-water mark across execve, so a
# child started straight from this process would report at least this
# process's own peak (which the 12-MP images made here raise to hundreds of
# MiB); started from this small middle process instead, the floor is a few MiB.
_SPAWN = """\
import os, sys, time
started = time.perf_counter()
pid = os.posix_spawn(sys.argv[2], sys.argv[2:], os.environ)
_, status, usage = os.wait4(pid, 0)
with open(sys.argv[1], "w") as out:
    out.write(f"{time.perf_counter() - started} {usage.ru_maxrss} {os.waitstatus_to_exitcode(status)}")
"""


def _run(command: list[str], *, check: bool = True) -> dict:
    """Run a command; its wall seconds, peak RSS (MiB), exit code, stdout and
    stderr.  Unlike bench_index._child, stderr is captured (the CLI's
    progress lines would bury the tables) and shown only on failure, and the
    peak is measured through _SPAWN."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err, \
            tempfile.NamedTemporaryFile("r") as measured:
        subprocess.run([sys.executable, "-S", "-c", _SPAWN, measured.name, *command],
                       stdout=out, stderr=err, check=True)
        seconds, peak_kib, rc = measured.read().split()
        out.seek(0)
        err.seek(0)
        result = {"seconds": float(seconds), "rss": int(peak_kib) / 1024, "rc": int(rc),
                  "stdout": out.read().decode(errors="replace"),
                  "stderr": err.read().decode(errors="replace")}
    if check and result["rc"] != 0:
        raise SystemExit(f"benchmark step failed (exit {result['rc']}): {' '.join(command)}\n"
                     f"{result['stderr'][-3000:]}")
    return result


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _spread(paths: list[Path], n: int) -> list[Path]:
    """``n`` paths picked evenly over the sorted list (every class folder
    contributes, as a user's collection would)."""
    if n >= len(paths):
        return list(paths)
    return [paths[int(i * len(paths) / n)] for i in range(n)]


def _link(paths: list[Path], folder: Path) -> Path:
    """A folder holding exactly these images (symbolic links, in their
    class folders), since `imgsearch index` takes folders."""
    for i, path in enumerate(paths):
        label_dir = folder / path.parent.name
        label_dir.mkdir(parents=True, exist_ok=True)
        os.symlink(path, label_dir / f"{i:06d}{path.suffix}")
    return folder


def _make_big(sources: list[Path], folder: Path) -> list[Path]:
    """12-megapixel JPEGs from small photos.  Noise keeps the upscaled
    pictures from compressing unrealistically well (about 2.5 MB each, as
    a camera's are) and gives the decoder real work."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    folder.mkdir(parents=True)
    out = []
    for i, source in enumerate(sources):
        with Image.open(source) as image:
            pixels = np.array(image.convert("RGB").resize(BIG_SIZE, Image.Resampling.BICUBIC))
        for top in range(0, pixels.shape[0], 500):  # in bands: 12 MP of float32 noise is 144 MB
            band = pixels[top : top + 500]
            noise = rng.standard_normal(band.shape, dtype=np.float32) * BIG_NOISE_SIGMA
            band[...] = np.clip(band + noise + 0.5, 0, 255).astype(np.uint8)
        path = folder / f"{i:06d}.jpg"
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, "JPEG", quality=BIG_QUALITY)
        path.write_bytes(buffer.getvalue())
        out.append(path)
    return out


def _machine() -> str:
    from importlib import metadata

    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = re.search(r"^model name\s*:\s*(.+)$", cpuinfo, re.M)
    flags = re.search(r"^flags\s*:\s*(.+)$", cpuinfo, re.M)
    flags = set(flags.group(1).split()) if flags else set()
    wanted = ("avx512_bf16", "avx512_vnni", "amx_bf16", "amx_int8", "amx_tile")
    has = [f for f in wanted if f in flags] or ["none of them"]
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()

    def version(*names):
        for name in names:
            try:
                return metadata.version(name)
            except metadata.PackageNotFoundError:
                continue
        return "not installed"

    return (f"{model.group(1).strip() if model else platform.processor() or 'unknown CPU'}, "
            f"{os.cpu_count()} CPUs ({usable} usable); of {'/'.join(wanted)} it has: {', '.join(has)}; "
            f"load average {os.getloadavg()[0]:.2f} at start\n"
            f"openvino {version('openvino')}, tensorflow {version('tensorflow', 'tensorflow-cpu')}, "
            f"keras {version('keras')}, nncf {version('nncf')}, Pillow {version('pillow')}, "
            f"numpy {version('numpy')}, Python {platform.python_version()}")


def _table(header: list[str], rows: list[list]) -> str:
    """A markdown table, columns padded for reading as plain text too."""
    cells = [header] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    numbers = [[re.fullmatch(r"[-0-9.,x%]+", row[i]) for row in cells[1:]] for i in range(len(header))]
    right = [i > 0 and all(numbers[i]) and any(re.search(r"\d", row[i]) for row in cells[1:])
             for i in range(len(header))]

    def line(row):
        return "| " + " | ".join(c.rjust(w) if r else c.ljust(w) for c, w, r in zip(row, widths, right)) + " |"

    rule = "|" + "|".join("-" * (w + 1) + ":" if r else "-" * (w + 2) for w, r in zip(widths, right)) + "|"
    return "\n".join([line(header), rule] + [line(row) for row in cells[1:]])


def _ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}x" if a and b else "-"


def _ran_as(stderr: str) -> str:
    """What `imgsearch index` says it runs on ("encoder: NAME (D-d, RUNTIME)")."""
    found = re.search(r"^encoder: \S+ \(\d+-d, ([^)]+)\)", stderr, re.M)
    return found.group(1) if found else "?"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path, help="images, searched recursively (e.g. imagenette's root)")
    parser.add_argument("--encoder", default="resnet50")
    parser.add_argument("--weights", default=None, help="'none' (random, fine for speed) or as the CLI takes")
    parser.add_argument("--limit", type=int, default=400, help="photos from FOLDER for (a) and (b)")
    parser.add_argument("--big", type=int, default=64, help="generated 12-MP JPEGs for (a); 0 skips them")
    parser.add_argument("--query-index-size", type=int, default=10000, help="images in the index of (c)")
    parser.add_argument("--query-precision", choices=("fp32", "bf16", "int8"), default=None,
                        help="precision of the (c) index and the (d) runs (default: the fastest "
                             "the encoder offers, int8 then bf16)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32, help="for `imgsearch index` and the baseline")
    parser.add_argument("--batch-sizes", default="1,8,32", help="encoder-only batch sizes for (b)")
    parser.add_argument("--embed-images", type=int, default=64, help="photos embedded per step of (b)")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="runtime-precision pairs to compare")
    parser.add_argument("--cache-dir", type=Path, default=None,
                        help="model cache to use and keep (default: a fresh one, removed at the end; "
                             "with a warm one the export and calibration times read as cached loads)")
    parser.add_argument("--skip-query", action="store_true", help="leave out (c) and the last point of (d)")
    parser.add_argument("--skip-memory", action="store_true", help="leave out the 4N run of (d)")
    parser.add_argument("--phase", choices=sorted(CHILDREN), help=argparse.SUPPRESS)
    parser.add_argument("--paths-file", help=argparse.SUPPRESS)
    parser.add_argument("--variant", choices=sorted(VARIANTS), help=argparse.SUPPRESS)
    parser.add_argument("--calibrate", help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

    if args.phase:  # inside a child: one step, its result as JSON on the last line
        paths = [Path(p) for p in Path(args.paths_file).read_text().splitlines()]
        print(json.dumps(CHILDREN[args.phase](paths, args)))
        return

    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variants {unknown}; choose from {', '.join(VARIANTS)}")
    # An encoder may refuse precisions that would change its neighbours
    # (Encoder.precisions); those are left out, and said so.
    from imgsearch.encoders import load_registry

    offered = getattr(load_registry().get(args.encoder), "precisions", ("fp32", "bf16", "int8"))
    notes = [f"{args.encoder} does not offer {v}: left out"
             for v in variants if VARIANTS[v][1] not in offered]
    variants = [v for v in variants if VARIANTS[v][1] in offered]
    if args.query_precision is None:
        args.query_precision = next(p for p in ("int8", "bf16", "fp32") if p in offered)
    elif args.query_precision not in offered:
        raise SystemExit(f"{args.encoder} does not offer --query-precision {args.query_precision}")
    batch_sizes = sorted({int(b) for b in args.batch_sizes.split(",")} | {args.batch_size})
    all_paths = bench_index._images(args.folder, None)
    if not all_paths:
        raise SystemExit(f"no images in {args.folder}")

    began = time.perf_counter()
    machine = _machine()
    work = Path(tempfile.mkdtemp(prefix="imgsearch-speed-"))
    os.environ["IMGSEARCH_CACHE_DIR"] = str(args.cache_dir or work / "cache")  # children inherit it
    try:
        report = _measure(args, variants, batch_sizes, all_paths, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    _print_report(args, variants, batch_sizes, machine + "".join(f"\n{n}" for n in notes), report,
                  time.perf_counter() - began)


def _measure(args, variants, batch_sizes, all_paths, work: Path) -> dict:
    common = ["--encoder", args.encoder] + (["--weights", args.weights] if args.weights else [])
    lists: dict[str, Path] = {}

    def listing(name: str, paths: list[Path]) -> Path:
        lists[name] = work / f"{name}.txt"
        lists[name].write_text("\n".join(str(p) for p in paths))
        return lists[name]

    def child(phase: str, set_name: str, variant: str | None = None, batch: int | None = None,
              calibrate: Path | None = None) -> dict:
        command = [sys.executable, __file__, str(args.folder), "--phase", phase,
                   "--paths-file", str(lists[set_name]), *common,
                   "--batch-size", str(batch or args.batch_size)]
        if variant:
            command += ["--variant", variant]
        if calibrate:
            command += ["--calibrate", str(calibrate)]
        result = _run(command)
        result.update(json.loads(result["stdout"].strip().splitlines()[-1]))
        return result

    def index(folder: Path, variant: str, target: Path) -> dict:
        runtime, precision = VARIANTS[variant]
        shutil.rmtree(target, ignore_errors=True)
        result = _run([sys.executable, "-m", "imgsearch", "index", str(folder), "--index", str(target),
                       *common, "--runtime", runtime, "--precision", precision,
                       "--batch-size", str(args.batch_size)])
        result["runtime"] = _ran_as(result["stderr"])
        added = re.search(r"^added (\d+)", result["stdout"], re.M)
        result["added"] = int(added.group(1)) if added else 0
        return result

    model_cache = Path(os.environ["IMGSEARCH_CACHE_DIR"]) / "openvino"
    made_by_loads: set[str] = set()

    def models() -> set[str]:
        return {p.name for p in model_cache.glob("[!.]*")} if model_cache.is_dir() else set()

    def watched(result: dict) -> dict:
        """Flag a timed step that found no cached model and made one (a cache
        key changed under the run, e.g. the library was edited meanwhile):
        its figures include an export or a calibration."""
        made = models() - made_by_loads
        if made:
            result["exported"] = True
            made_by_loads.update(made)
            _log("  warning: this step made a model the loads had not cached; its figures include that")
        return result

    # -- image sets ---------------------------------------------------------
    photos = _spread(all_paths, args.limit)
    sets = {"photos": (_link(photos, work / "photos"), photos)}
    listing("photos", photos)
    listing("embed", photos[: args.embed_images])
    big_mb = 0.0
    if args.big:
        _log(f"generating {args.big} JPEGs of {BIG_SIZE[0]}x{BIG_SIZE[1]} ...")
        started = time.perf_counter()
        big = _make_big(_spread(all_paths, args.big), work / "big")
        big_mb = statistics.mean(p.stat().st_size for p in big) / 1e6
        _log(f"  {len(big)} files, mean {big_mb:.2f} MB, in {time.perf_counter() - started:.0f} s")
        sets["big"] = (work / "big", big)
        listing("big", big)
    large_variant = f"openvino-{args.query_precision}"
    four_n = [] if args.skip_memory else _spread(all_paths, 4 * len(photos))
    if four_n:
        sets["4N"] = (_link(four_n, work / "four-n"), four_n)
    query_set = [] if args.skip_query else _spread(all_paths, args.query_index_size)
    if query_set:
        sets["query"] = (_link(query_set, work / "query-set"), query_set)

    # -- model loads: export and calibration once, then cached --------------
    # fp32 and bf16 share one exported model; an int8 model is calibrated on
    # the images being indexed, so every set indexed in int8 gets its own.
    keyed = [(v, "photos") for v in variants]
    if "big" in sets and "openvino-int8" in variants:
        keyed.append(("openvino-int8", "big"))
    for set_name in ("4N", "query"):
        if set_name in sets:
            key = (large_variant, set_name if args.query_precision == "int8" else "photos")
            if key not in keyed:
                keyed.append(key)
    loads: dict[tuple, dict] = {}
    for variant, set_name in keyed:
        for attempt in ("first", "cached"):
            _log(f"load {variant} ({set_name}), {attempt} ...")
            result = child("load", "photos", variant, calibrate=sets[set_name][0])
            loads.setdefault((variant, set_name), {})[attempt] = result
            _log(f"  {result['seconds']:.1f} s, {result['runtime']}, peak {result['rss']:.0f} MiB")
    made_by_loads.update(models())

    # -- (a) and (b), interleaved so that drift touches every figure alike ---
    results: dict[tuple, list[dict]] = {}
    for repeat in range(1, args.repeats + 1):
        for set_name in [s for s in ("photos", "big") if s in sets]:
            folder, _ = sets[set_name]
            steps = [("naive", None), ("decode", None)] + [("index", v) for v in variants]
            for phase, variant in steps:
                _log(f"[{repeat}/{args.repeats}] {phase} {variant or ''} on {set_name} ...")
                if phase == "index":
                    result = watched(index(folder, variant, work / "index"))
                else:
                    result = watched(child(phase, set_name))
                results.setdefault((phase, set_name, variant), []).append(result)
                _log(f"  {result['seconds']:.1f} s, peak {result['rss']:.0f} MiB")
        for variant in variants:
            for batch in batch_sizes:
                _log(f"[{repeat}/{args.repeats}] encode {variant} batch {batch} ...")
                result = watched(child("encode", "embed", variant, batch, calibrate=sets["photos"][0]))
                results.setdefault(("encode", batch, variant), []).append(result)
                _log(f"  {result['seconds']:.1f} s, peak {result['rss']:.0f} MiB")

    # -- (d) memory: 4N images, one run (peak RSS barely varies) ------------
    memory = {}
    if "4N" in sets:
        _log(f"index {large_variant} on {len(four_n)} images (4N) ...")
        memory["4N"] = watched(index(sets["4N"][0], large_variant, work / "index"))
        _log(f"  {memory['4N']['seconds']:.1f} s, peak {memory['4N']['rss']:.0f} MiB")

    # -- (c) queries from a cold process on a large index -------------------
    queries: dict[str, list[dict]] = {}
    if query_set:
        _log(f"building the query index: {len(query_set)} images, {large_variant} ...")
        query_index = work / "query-index"
        memory["query"] = watched(index(sets["query"][0], large_variant, query_index))
        _log(f"  {memory['query']['seconds']:.0f} s, peak {memory['query']['rss']:.0f} MiB")
        one = str(photos[0])
        imgsearch = [sys.executable, "-m", "imgsearch"]
        commands = {
            "imgsearch --help": imgsearch + ["--help"],
            f"imgsearch query ONE.jpg -k 10 (default runtime: {large_variant})": imgsearch + [
                "query", one, "--index", str(query_index), "-k", "10"],
            "imgsearch query ONE.jpg -k 10 --runtime keras": imgsearch + [
                "query", one, "--index", str(query_index), "-k", "10", "--runtime", "keras"],
        }
        for label, command in commands.items():
            _run(command, check=False)  # warm-up: the files in the page cache, as on a used machine
        for repeat in range(1, args.repeats + 1):
            for label, command in commands.items():
                _log(f"[{repeat}/{args.repeats}] {label} ...")
                result = watched(_run(command, check=False))
                queries.setdefault(label, []).append(result)
                _log(f"  {result['seconds']:.2f} s, exit {result['rc']}")

    return {"photos": photos, "sets": {k: len(v[1]) for k, v in sets.items()}, "big_mb": big_mb,
            "loads": loads, "results": results, "memory": memory, "queries": queries,
            "large_variant": large_variant, "work": str(work)}


def _median(runs: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in runs)


def _flag(runs: list[dict]) -> str:
    return " (+ a model export: see the warning)" if any(r.get("exported") for r in runs) else ""


def _print_report(args, variants, batch_sizes, machine, report, wall) -> None:
    results, sizes = report["results"], report["sets"]
    large_variant = report["large_variant"]

    def rate(key, n):
        return n / _median(results[key], "seconds") if key in results else None

    print(f"# imgsearch speed: encoder {args.encoder}"
          f"{f', weights {args.weights}' if args.weights else ''}, batch {args.batch_size}, "
          f"median of {args.repeats}\n")
    print(f"`python benchmarks/bench_speed.py {' '.join(sys.argv[1:])}`  ")
    print(machine.replace("\n", "  \n") + "\n")

    print("## Model loads (untimed elsewhere)\n")
    rows = []
    for (variant, set_name), runs in report["loads"].items():
        first, cached = runs["first"], runs["cached"]
        rows.append([variant, set_name if VARIANTS[variant][1] == "int8" else "-",
                     f"{first['seconds']:.1f}", f"{cached['seconds']:.2f}",
                     f"{first['rss']:.0f}", f"{cached['rss']:.0f}", cached["runtime"]])
    print(_table(["model", "calibrated on", "first load s (export/calibration)", "cached load s",
                  "peak MiB first", "peak MiB cached", "ran as"], rows) + "\n")

    encode_batch = args.batch_size
    n_embed = len(report["photos"][: args.embed_images])
    naive_photos = None
    for set_name, title in (("photos", f"{sizes['photos']} photos from {args.folder}"),
                            ("big", f"{sizes.get('big', 0)} generated {BIG_SIZE[0]}x{BIG_SIZE[1]} JPEGs "
                                    f"(12 MP, quality {BIG_QUALITY}, mean {report['big_mb']:.2f} MB)")):
        if set_name not in sizes:
            continue
        n = sizes[set_name]
        naive = rate(("naive", set_name, None), n)
        naive_photos = naive_photos or naive
        print(f"## (a) `imgsearch index` end to end: {title}\n")
        rows = []
        for phase, variant, label in [("naive", None, "naive: Pillow one at a time + Keras predict"),
                                      ("decode", None, "decode + resize only (draft mode)")] + \
                                     [("index", v, f"imgsearch index, {v}") for v in variants]:
            runs = results[(phase, set_name, variant)]
            r = rate((phase, set_name, variant), n)
            encoder_only = rate(("encode", encode_batch, variant), n_embed) if variant else None
            ran = runs[-1]["runtime"] if phase == "index" else ("keras" if phase == "naive" else "-")
            ran += _flag(runs)
            if phase == "index" and any(run["added"] != n for run in runs):
                ran += f" (added {runs[-1]['added']} of {n}!)"
            rows.append([label, f"{r:.1f}", _ratio(r, naive),
                         f"{encoder_only:.1f}" if encoder_only else "-", _ratio(r, encoder_only),
                         f"{_median(runs, 'rss'):.0f}", ran])
        print(_table(["pipeline", "images/s", "vs naive", f"encoder only b{encode_batch} images/s",
                      "end-to-end / encoder-only", "peak MiB", "ran as"], rows) + "\n")

    print(f"## (b) encoder only: {n_embed} pre-resized photos, model load excluded\n")
    rows = []
    for variant in variants:
        for batch in batch_sizes:
            runs = results[("encode", batch, variant)]
            r = rate(("encode", batch, variant), n_embed)
            keras = rate(("encode", batch, "keras-fp32"), n_embed)
            rows.append([variant, batch, f"{r:.1f}", _ratio(r, keras), _ratio(r, naive_photos),
                         f"{_median(runs, 'rss'):.0f}", runs[-1]["runtime"] + _flag(runs)])
    print(_table(["runtime", "batch", "images/s", "vs keras-fp32 same batch", "vs naive (photos, end to end)",
                  "peak MiB", "ran as"], rows) + "\n")

    memory = report["memory"]
    if "query" in memory:
        built = memory["query"]
        print(f"## (c) query from a cold process: index of {sizes['query']} images\n")
        print(f"Index built once with `imgsearch index` ({built['runtime']}{_flag([built])}): "
              f"{built['seconds']:.0f} s, "
              f"{sizes['query'] / built['seconds']:.1f} images/s, peak {built['rss']:.0f} MiB.\n")
        rows = []
        for label, runs in report["queries"].items():
            last = runs[-1]
            # Sane: exit 0, something on stdout, nothing on stderr but warnings.
            sane = all(run["rc"] == 0 and run["stdout"].strip() for run in runs) and not any(
                "Traceback" in run["stderr"] or "error" in run["stderr"].lower() for run in runs)
            stderr = [line.replace(report["work"], "$TMP") for line in last["stderr"].splitlines()
                      if line.strip()]
            shown = stderr[0][:80] + (f" (+{len(stderr) - 1} lines)" if len(stderr) > 1 else "") \
                if stderr else "(empty)"
            rows.append([label, f"{_median(runs, 'seconds'):.2f}", f"{_median(runs, 'rss'):.0f}",
                         ",".join(str(run["rc"]) for run in runs), ("yes" if sane else "NO") + _flag(runs),
                         f"{len(last['stdout'].splitlines())} lines", shown])
        print(_table(["command", "median s", "peak MiB", "exit codes", "sane", "stdout", "stderr"], rows)
              + "\n")

    rows = []
    photos_runs = results.get(("index", "photos", large_variant))
    base = _median(photos_runs, "rss") if photos_runs else None
    if photos_runs:
        n = sizes["photos"]
        rows.append([n, f"{n / _median(photos_runs, 'seconds'):.1f}", f"{base:.0f}", "1.00x",
                     f"median of {args.repeats}, the photos runs of (a){_flag(photos_runs)}"])
    for set_name, note in (("4N", "one run"), ("query", "one run, the query index of (c)")):
        if set_name in memory:
            run, n = memory[set_name], sizes[set_name]
            rows.append([n, f"{n / run['seconds']:.1f}", f"{run['rss']:.0f}", _ratio(run["rss"], base),
                         note + _flag([run])])
    if rows:
        print(f"## (d) peak memory of `imgsearch index` against the number of images ({large_variant})\n")
        print(_table(["images", "images/s", "peak MiB", "vs N", "runs"], rows) + "\n")
    print(f"Whole benchmark: {wall / 60:.1f} min; load average {os.getloadavg()[0]:.2f} at the end.")


if __name__ == "__main__":
    main()
