"""The local store beside Milvus (a standalone server and Milvus Lite) on
the same synthetic vectors, through the same Store code `imgsearch index`
uses.

Usage:
    python benchmarks/bench_milvus.py [--count 100000] [--dim 2048]
                                      [--backends local,standalone,lite]
                                      [--timeout 3600] [--workdir DIR] [--keep]

What it does, all in one run:

1. Draws --count vectors from bench_scale's generator (the same stream as
   bench_scale.py: Mixture(seed=0), batches of 1,000, so its figures are
   comparable), then 1,200 new query vectors from the same mixture, and
   finds their exact 10 nearest by brute force in numpy.
2. For each backend: ``Store.create`` (``--backend milvus --milvus-uri``
   for Milvus, a collection of its own), commits of 1,000 through
   ``Store.commit`` as `imgsearch index` does (the local store also merges
   its small segments by tiers between commits, as the indexer does),
   ``optimize`` with the automatic choice (ivf-sq8 at 100,000) tuned to the
   0.95 recall target, then, with the index opened again for reading (as
   `imgsearch query` does): 200 single queries (p50 and p95; after 50
   warm-up queries), 10 batches of 100 (per query, median), and recall@10 of
   all 1,200 queries against the exact answer.
3. Milvus standalone is the PyPI ``milvus`` server (``milvus-server``),
   started here on loopback on free ports with its own etcd settings, as
   tests/test_backends.py does, and stopped at the end, on errors, Ctrl-C
   and SIGTERM too; a watchdog process stops it if this one is killed
   outright, and at --timeout (plus a minute of grace) ends the run.
   Milvus Lite runs inside this process (pymilvus starts it for a path).

Memory: what the index type needs by imgsearch's estimate (the manifest's
record), and where cheap the real figure: the server's resident memory (its
whole process group) after the queries, or for Milvus Lite the growth of
this process's resident memory over its phase.  Disk: the index folder
plus the Milvus data folder (without its logs) or the Lite folder.

Figures vary between runs on a shared machine: medians are reported, and
ratios within one run are what to compare.  Needs pymilvus, milvus-lite and
milvus (pip install 'imgsearch[milvus]'), about 3 GB of free disk per
100,000 2048-d vectors, and about 6 GB of memory.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_scale import Mixture  # noqa: E402  (the synthetic collection)

BATCH = 1000
SINGLE, BATCHES, WARMUP = 200, 10, 50
SERVER_START_TIMEOUT = 180
SERVER_PORTS = ("etcd-port", "root-coord-port", "proxy-port", "proxy-internal-port", "query-coord-port",
                "query-node-port", "index-coord-port", "index-node-port", "data-coord-port", "data-node-port")
COMPONENTS = ("rootCoord", "proxy", "queryCoord", "queryNode", "indexCoord", "indexNode", "dataCoord", "dataNode")
NAMES = {"local": "local store (faiss)", "standalone": "Milvus standalone", "lite": "Milvus Lite"}


_BEGUN = time.monotonic()


def _log(message: str) -> None:
    print(f"[{time.monotonic() - _BEGUN:6.0f} s] {message}", file=sys.stderr, flush=True)


class Timeout(BaseException):
    """Not an Exception: nothing on the way may take it for a failed call."""


# -- the Milvus standalone server --------------------------------------------------
def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# Runs in its own session: stops the server's process group when the
# benchmark is gone (killed outright), and ends both at the hard deadline.
_WATCHDOG = r"""
import os, shutil, signal, sys, time
parent, group, deadline, work = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
def alive(pgid):
    try:
        os.killpg(pgid, 0)
        return True
    except (ProcessLookupError, PermissionError):
        return False
while os.getppid() == parent and time.time() < deadline and alive(group):
    time.sleep(1)
if os.getppid() == parent and alive(group):  # the deadline: the benchmark stops the server itself
    os.kill(parent, signal.SIGTERM)
    end = time.time() + 60
    while os.getppid() == parent and time.time() < end and alive(group):
        time.sleep(1)
for sig, wait in ((signal.SIGINT, 15), (signal.SIGKILL, 10)):
    if not alive(group):
        break
    os.killpg(group, sig)
    end = time.time() + wait
    while time.time() < end and alive(group):
        time.sleep(0.2)
if work and os.getppid() != parent:  # killed outright: its temporary folder too
    shutil.rmtree(work, ignore_errors=True)
"""


class MilvusServer:
    """A Milvus standalone server (PyPI ``milvus``) on loopback, with its own
    ports and data folder; a context manager that always stops it."""

    def __init__(self, data: Path, deadline: float, work: Path | None = None):
        self.data, self.deadline, self.work = data, deadline, work
        self.process = self.watchdog = self.log = None
        self.uri = None

    def __enter__(self):
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc):
        self.stop()

    def _start(self) -> None:
        exe = shutil.which("milvus-server", path=os.path.dirname(sys.executable))
        if exe is None:
            raise RuntimeError("milvus-server is not installed (pip install 'imgsearch[milvus]')")
        self.data.mkdir(parents=True, exist_ok=True)
        ports = {name: _free_port() for name in SERVER_PORTS}
        # Its embedded etcd listens on 2379 and 2380 unless told otherwise.
        client, peer = ports["etcd-port"], _free_port()
        etcd = self.data / "embedded-etcd.yaml"
        etcd.write_text(f"listen-client-urls: http://127.0.0.1:{client}\n"
                        f"advertise-client-urls: http://127.0.0.1:{client}\n"
                        f"listen-peer-urls: http://127.0.0.1:{peer}\n"
                        f"initial-advertise-peer-urls: http://127.0.0.1:{peer}\n"
                        f"initial-cluster: default=http://127.0.0.1:{peer}\n")
        command = [exe, "--data", str(self.data)]
        for name, port in ports.items():
            command += [f"--{name}", str(port)]
        for component in COMPONENTS:  # loopback only
            command += ["--extra-config", f"{component}.ip=127.0.0.1"]
        self.log = open(self.data / "server.log", "w")
        # Its own process group (the wrapper starts the milvus binary as a
        # child; both must go), out of reach of the terminal's Ctrl-C.
        self.process = subprocess.Popen(command, stdout=self.log, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL, start_new_session=True,
                                        env=dict(os.environ, ETCD_CONFIG_PATH=str(etcd)))
        self.watchdog = subprocess.Popen([sys.executable, "-S", "-c", _WATCHDOG, str(os.getpid()),
                                          str(self.process.pid), str(self.deadline), str(self.work or "")],
                                         stdin=subprocess.DEVNULL, start_new_session=True)
        self.uri = f"http://127.0.0.1:{ports['proxy-port']}"
        self._wait_until_serving()

    def _wait_until_serving(self) -> None:
        from pymilvus import MilvusClient

        started = time.monotonic()
        log_path = self.data / "server.log"
        while True:
            said = log_path.read_text()
            # The wrapper keeps running when the server it started has failed.
            if self.process.poll() is not None or "already stopped" in said or "timeout" in said:
                server_log = self.data / "logs" / "milvus-stdout.log"
                errors = [line for line in server_log.read_text().splitlines() if "[ERROR]" in line][:3] \
                    if server_log.exists() else []
                raise RuntimeError(f"milvus-server failed to start: {said[-500:]} {' '.join(errors)[:1500]}")
            try:
                client = MilvusClient(uri=self.uri, timeout=2)
                client.list_collections()
                client.close()
                self.start_seconds = time.monotonic() - started
                return
            except Exception:
                if time.monotonic() - started > SERVER_START_TIMEOUT:
                    raise RuntimeError(f"milvus-server did not answer within {SERVER_START_TIMEOUT} s") from None
                time.sleep(0.5)

    def rss(self) -> int:
        """Resident bytes of the server's whole process group."""
        import psutil

        total = 0
        for proc in psutil.process_iter(["pid"]):
            with contextlib.suppress(psutil.Error, ProcessLookupError, PermissionError):
                if os.getpgid(proc.pid) == self.process.pid:
                    total += proc.memory_info().rss
        return total

    def stop(self) -> None:
        if self.process is not None:
            group = self.process.pid
            for sig, wait in ((signal.SIGINT, 20), (signal.SIGKILL, 10)):
                try:
                    os.killpg(group, sig)
                except ProcessLookupError:
                    break
                end = time.monotonic() + wait
                while time.monotonic() < end:
                    self.process.poll()  # reap the wrapper
                    try:
                        os.killpg(group, 0)  # the milvus child may outlive the wrapper
                    except ProcessLookupError:
                        break
                    time.sleep(0.2)
                else:
                    continue
                break
            self.process.poll()
            self.process = None
        if self.watchdog is not None:
            if self.watchdog.poll() is None:
                self.watchdog.terminate()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.watchdog.wait(timeout=5)
            self.watchdog = None
        if self.log is not None:
            self.log.close()
            self.log = None


# -- measuring ------------------------------------------------------------------------
def du(path: Path, skip: tuple[str, ...] = ()) -> int:
    if path.is_file():
        return path.stat().st_size
    total = 0
    for root, dirs, files in os.walk(path):
        dirs[:] = [d for d in dirs if d not in skip]
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(root, name)).st_size
    return total


def rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def exact_top10(data: np.ndarray, ids: np.ndarray, queries: np.ndarray) -> np.ndarray:
    best = np.full((len(queries), 10), -np.inf, np.float32)
    best_ids = np.full((len(queries), 10), -1, np.int64)
    for start in range(0, len(data), 20_000):
        scores = queries @ data[start:start + 20_000].T
        both = np.hstack([best, scores])
        both_ids = np.hstack([best_ids, np.broadcast_to(ids[start:start + 20_000], scores.shape)])
        order = np.argsort(-both, axis=1)[:, :10]
        best, best_ids = np.take_along_axis(both, order, 1), np.take_along_axis(both_ids, order, 1)
    return best_ids


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(f.tolist()) & set(t.tolist())) / 10 for f, t in zip(found, truth)]))


def _timed_methods(obj, names, spent: dict) -> None:
    """Wrap some of a backend's methods on this instance to time them."""
    for name in names:
        method = getattr(obj, name, None)
        if method is None:
            continue

        def timed(*args, _method=method, _name=name, **kwargs):
            started = time.perf_counter()
            try:
                return _method(*args, **kwargs)
            finally:
                spent[_name] = spent.get(_name, 0.0) + time.perf_counter() - started

        setattr(obj, name, timed)


def run_backend(kind: str, directory: Path, data: np.ndarray, classes: np.ndarray, queries: np.ndarray,
                truth: np.ndarray, *, uri: str | None = None) -> dict:
    from imgsearch.store import Changes, Entry, Store, compact, compaction_due
    from imgsearch.store import ann

    out: dict = {}
    options = {} if kind == "local" else {"backend": "milvus", "backend_options": {"uri": uri, "collection": "bench"}}
    rss_before = rss()
    store = Store.create(directory, encoder={"name": "synthetic", "dim": data.shape[1]}, dim=data.shape[1],
                         **options)
    commits, compactions = [], 0.0
    with store:
        first = store.next_id
        assert first == 1, first
        started = time.perf_counter()
        for start in range(0, len(data), BATCH):
            vectors = data[start:start + BATCH]
            entries = [Entry(first + start + i, f"/photos/{first + start + i:08d}.jpg", os.urandom(32).hex(),
                             100_000, 0.0, f"class{c}", 224, 224)
                       for i, c in enumerate(classes[start:start + BATCH])]
            t0 = time.perf_counter()
            store.commit(Changes(added=entries, vectors=list(vectors)))
            commits.append(time.perf_counter() - t0)
            if store.backend.local:  # as the indexer does between commits
                t0 = time.perf_counter()
                while compaction_due(store):
                    compact(store)
                compactions += time.perf_counter() - t0
            if (start + BATCH) % 20_000 == 0:
                _log(f"  {start + BATCH:,} vectors, last commit {commits[-1] * 1000:.0f} ms")
        out["insert_s"] = time.perf_counter() - started
        out["commit_ms"] = statistics.median(commits) * 1000
        out["commit_p95_ms"] = float(np.percentile(commits, 95)) * 1000
        out["compact_s"] = compactions if store.backend.local else None

        _log("  optimize")
        spent: dict = {}
        if store.backend.local:
            # The recall sweep's time: ann.build's exact neighbours and trials.
            real_exact, real_recall = ann._exact_neighbours, ann._recall
            _timed_module = {}

            def exact(*a, **k):
                t0 = time.perf_counter()
                try:
                    return real_exact(*a, **k)
                finally:
                    _timed_module["tuning"] = _timed_module.get("tuning", 0) + time.perf_counter() - t0

            def trial(*a, **k):
                t0 = time.perf_counter()
                try:
                    return real_recall(*a, **k)
                finally:
                    _timed_module["tuning"] = _timed_module.get("tuning", 0) + time.perf_counter() - t0

            ann._exact_neighbours, ann._recall = exact, trial
            try:
                started = time.perf_counter()
                report = store.backend.optimize()
                out["optimize_s"] = time.perf_counter() - started
            finally:
                ann._exact_neighbours, ann._recall = real_exact, real_recall
            out["tuning_s"] = _timed_module.get("tuning")
        else:
            _timed_methods(store.backend, ("_held_back", "_recall"), spent)
            started = time.perf_counter()
            report = store.backend.optimize()
            out["optimize_s"] = time.perf_counter() - started
            out["tuning_s"] = sum(spent.values()) if spent else None
        built = store.manifest.get("ann") or {}
        out["index_type"] = report.index_type
        out["optimize_recall"] = report.recall_at_10
        params = dict(built.get("build_params") or {})
        params.update({k: v for k, v in (built.get("params") or {}).items() if k not in ("name", "value")})
        if (built.get("params") or {}).get("name"):
            params[built["params"]["name"]] = built["params"]["value"]
        out["params"] = params
        out["milvus_index"] = built.get("milvus_index")
        out["memory_needed"] = built.get("memory")

    if kind == "local":  # warm: the files in the page cache, as on a server that has run a while
        for path in directory.iterdir():
            if path.is_file():
                with open(path, "rb") as handle:
                    while handle.read(1 << 24):
                        pass
    _log("  queries")
    t0 = time.perf_counter()
    with Store.open(directory) as reader:
        reader.search(queries[:1], 10)
        out["open_first_s"] = time.perf_counter() - t0
        for q in queries[SINGLE:SINGLE + WARMUP]:
            reader.search(q[None], 10)
        single = []
        for q in queries[:SINGLE]:
            t0 = time.perf_counter()
            hits = reader.search(q[None], 10)
            single.append(time.perf_counter() - t0)
            assert len(hits[0]) == 10
        batched = []
        for b in range(BATCHES):
            chunk = queries[SINGLE + b * 100:SINGLE + (b + 1) * 100]
            t0 = time.perf_counter()
            reader.search(chunk, 10)
            batched.append((time.perf_counter() - t0) / len(chunk))
        _, found = reader.nearest(queries, 10)
        if not reader.backend.local:
            # The index was committed moments ago, so the searches above read
            # Strong; an index committed longer ago than the plugin's
            # FRESH_S reads Bounded.  The same searches as for such an index:
            import imgsearch_milvus

            fresh, imgsearch_milvus.FRESH_S = imgsearch_milvus.FRESH_S, 0.0
            try:
                settled = []
                for q in queries[:SINGLE]:
                    t0 = time.perf_counter()
                    reader.search(q[None], 10)
                    settled.append(time.perf_counter() - t0)
            finally:
                imgsearch_milvus.FRESH_S = fresh
            out["settled_p50_ms"] = statistics.median(settled) * 1000
            out["settled_p95_ms"] = float(np.percentile(settled, 95)) * 1000
    out["single_p50_ms"] = statistics.median(single) * 1000
    out["single_p95_ms"] = float(np.percentile(single, 95)) * 1000
    out["batched_ms"] = statistics.median(batched) * 1000
    out["recall"] = recall(found, truth)
    out["recall_single"] = recall(found[:SINGLE], truth[:SINGLE])
    out["rss_growth"] = rss() - rss_before
    return out


# -- the table ---------------------------------------------------------------------------
def _fmt_params(r: dict) -> str:
    names = {"nlist": "nlist", "nprobe": "nprobe", "efSearch": "ef", "ef": "ef", "refine": "re-ranking"}
    parts = []
    for key, value in r["params"].items():
        parts.append(f"{names.get(key, key)} {value}{'x' if key == 'refine' else ''}")
    kind = r["index_type"] + (f" ({r['milvus_index']})" if r.get("milvus_index") else "")
    return ", ".join([kind] + parts)


def table(results: dict, count: int, dim: int) -> list[str]:
    kinds = list(results)
    lines = ["| figure | " + " | ".join(NAMES[k] for k in kinds) + " |", "|---|" + "--:|" * len(kinds)]

    def row(label, fn):
        cells = []
        for k in kinds:
            r = results[k]
            if "error" in r:
                cells.append("failed (below)" if len(lines) == 2 else "-")
                continue
            try:
                cells.append(fn(r))
            except (KeyError, TypeError):
                cells.append("-")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")

    mib = lambda b: f"{b / 2**20:,.0f} MiB"  # noqa: E731
    row(f"insert + commit of {count:,}, total", lambda r: f"{r['insert_s']:.1f} s"
        + (f" (merges {r['compact_s']:.1f} s)" if r.get("compact_s") else ""))
    row("one commit of 1,000: median / p95", lambda r: f"{r['commit_ms']:.0f} / {r['commit_p95_ms']:.0f} ms")
    row("optimize (index build + tuning)", lambda r: f"{r['optimize_s']:.1f} s"
        + (f" (tuning {r['tuning_s']:.1f} s)" if r.get("tuning_s") is not None else ""))
    row("index type, parameters", _fmt_params)
    row("recall@10 measured by optimize (200 held-back vectors)", lambda r: f"{r['optimize_recall']:.3f}")
    row(f"recall@10 against exact search, {SINGLE + BATCHES * 100:,} new queries",
        lambda r: f"{r['recall']:.3f}")
    row("open the index + first query", lambda r: f"{r['open_first_s'] * 1000:.0f} ms")
    row(f"one query, index committed moments ago: p50 / p95 ({SINGLE} queries)",
        lambda r: f"{r['single_p50_ms']:.2f} / {r['single_p95_ms']:.2f} ms")
    row("one query, index committed over a minute ago: p50 / p95",
        lambda r: f"{r.get('settled_p50_ms', r['single_p50_ms']):.2f} / "
                  f"{r.get('settled_p95_ms', r['single_p95_ms']):.2f} ms")
    row("per query in batches of 100 (median of 10)", lambda r: f"{r['batched_ms']:.2f} ms")
    row("memory the index type needs (estimate)", lambda r: mib(r["memory_needed"]))
    row("memory measured", lambda r: r["memory_measured"])
    row("disk", lambda r: mib(r["disk"]))
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=2048)
    parser.add_argument("--backends", default="local,standalone,lite",
                        help="comma-separated, of local, standalone, lite")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds for the whole run")
    parser.add_argument("--workdir", type=Path)
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args()
    kinds = [k.strip() for k in args.backends.split(",") if k.strip()]
    if unknown := set(kinds) - set(NAMES):
        parser.error(f"unknown backends {sorted(unknown)}")
    if args.count % BATCH:
        parser.error(f"--count must be a multiple of {BATCH}")

    begun = _BEGUN
    deadline = time.time() + args.timeout

    def on_alarm(*_):
        raise Timeout(f"the run passed --timeout {args.timeout:.0f} s")

    def on_term(*_):
        raise KeyboardInterrupt("SIGTERM")

    signal.signal(signal.SIGALRM, on_alarm)
    signal.signal(signal.SIGTERM, on_term)
    signal.alarm(max(1, int(args.timeout)))
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    work = Path(tempfile.mkdtemp(prefix="bench-milvus-", dir=args.workdir))
    results: dict = {}
    lite_path = None
    try:
        _log(f"generating {args.count:,} x {args.dim} vectors and {SINGLE + BATCHES * 100:,} queries")
        mixture = Mixture(dim=args.dim, seed=0)
        parts = [mixture.sample(BATCH) for _ in range(args.count // BATCH)]
        data = np.concatenate([v for v, _ in parts])
        classes = np.concatenate([c for _, c in parts])
        del parts
        queries, _ = mixture.sample(SINGLE + BATCHES * 100)
        ids = np.arange(1, args.count + 1, dtype=np.int64)  # a new index's ids
        t0 = time.perf_counter()
        truth = exact_top10(data, ids, queries)
        exact_s = time.perf_counter() - t0
        _log(f"  exact top 10 of {len(queries)} queries by numpy: {exact_s:.1f} s")

        for kind in kinds:
            _log(f"{NAMES[kind]}")
            try:
                if kind == "local":
                    r = run_backend(kind, work / "local", data, classes, queries, truth)
                    r["disk"] = du(work / "local")
                    r["memory_measured"] = "-"
                elif kind == "standalone":
                    with MilvusServer(work / "milvus-data", deadline + 60, None if args.keep else work) as server:
                        _log(f"  server up in {server.start_seconds:.1f} s at {server.uri}")
                        r = run_backend(kind, work / "standalone", data, classes, queries, truth, uri=server.uri)
                        r["memory_measured"] = f"{server.rss() / 2**20:,.0f} MiB server RSS"
                        r["server_start_s"] = server.start_seconds
                    r["disk"] = du(work / "standalone") + du(work / "milvus-data", skip=("logs",))
                else:
                    import milvus_lite  # noqa: F401  (else: "not installed", in the table)

                    lite_path = work / "lite.db"
                    r = run_backend(kind, work / "lite", data, classes, queries, truth, uri=str(lite_path))
                    r["memory_measured"] = f"+{r['rss_growth'] / 2**20:,.0f} MiB RSS of this process"
                    r["disk"] = du(work / "lite") + du(lite_path)
            except (Timeout, KeyboardInterrupt):
                raise
            except Exception as exc:  # one backend failing does not lose the others' figures
                r = {"error": f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"}
                _log(f"  failed: {r['error']}")
            results[kind] = r
            _log(f"  {r}")
    finally:
        signal.alarm(0)
        if lite_path is not None:
            with contextlib.suppress(Exception):
                from milvus_lite.server_manager import server_manager_instance

                server_manager_instance.release_server(str(lite_path))
        if args.keep:
            _log(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)

    import faiss
    import pymilvus

    try:
        from importlib.metadata import version
        versions = (f"pymilvus {pymilvus.__version__}, milvus (server) {version('milvus')}, "
                    f"milvus-lite {version('milvus-lite')}, faiss {faiss.__version__}")
    except Exception:
        versions = f"pymilvus {pymilvus.__version__}, faiss {faiss.__version__}"
    report = [f"## Local store, Milvus standalone and Milvus Lite: {args.count:,} x {args.dim}", ""]
    report += table(results, args.count, args.dim)
    report += ["", "Settings: bench_scale's generator (Mixture(seed=0), batches of 1,000); "
               f"{args.count:,} vectors committed 1,000 at a time through Store.commit; optimize with the "
               "automatic index type and the 0.95 recall target; queries through Store.search (k 10) on the "
               "index opened again for reading; recall@10 through Store.nearest against numpy brute force "
               f"({exact_s:.1f} s for {len(queries):,} queries); {os.cpu_count()} CPUs; {versions}."]
    standalone = results.get("standalone", {})
    if "server_start_s" in standalone:
        report.append(f"Milvus standalone: started on loopback in {standalone['server_start_s']:.0f} s, "
                      "stopped at the end.")
    for kind, r in results.items():
        if "error" in r:
            report.append(f"{NAMES[kind]} failed: {r['error']}")
    report.append(f"Whole run: {time.monotonic() - begun:.0f} s.")
    print("\n".join(report))


if __name__ == "__main__":
    try:
        main()
    except Timeout as exc:
        raise SystemExit(f"bench_milvus: {exc}; everything it started is stopped") from None
