"""Throughput and latency of the vectorizer service, beside the encoder alone.

Usage:
    python benchmarks/bench_serve.py [FOLDER] [--encoder efficientnet-lite0] [--weights W]
                                     [--requests 200] [--clients 1,8] [--images 64]
                                     [--batch-window-ms 5] [--max-batch N] [--plugins-dir DIR]

FOLDER (default sample_data/labelled) gives the pictures; each is made a
224x224 JPEG in memory (shorter side scaled to 224, centre crop, quality 90),
the kind of upload a vector database sends.  Then, in one run:

  service   `imgsearch.serve.run` in a process of its own on a free loopback
            port; for each number of concurrent clients, each client a thread
            with one keep-alive connection, --requests requests in all
            (after a warm-up): requests/s, p50 and p99 latency, and the mean
            number of images per encoder call
  encoder   the same encoder alone in this process, after the service has
            stopped: embed_pixels on already-resized batches of 32 (model
            load and warm-up excluded), images/s

The clients run in this process and the server in another, so on a small
machine they compete for the same cores: compare figures printed in one run.
"""

from __future__ import annotations

import argparse
import base64
import http.client
import io
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent


def _jpegs(folder: Path, count: int) -> list[bytes]:
    """Up to ``count`` pictures from ``folder`` as 224x224 JPEG bytes."""
    from PIL import Image

    from imgsearch import images as imgs

    files, _ = imgs.discover([folder])
    out = []
    for file in files[:count]:
        image = imgs.decode(imgs.read_bytes(file.path))
        scale = 224 / min(image.size)
        w, h = max(224, round(image.width * scale)), max(224, round(image.height * scale))
        image = image.resize((w, h), Image.Resampling.BILINEAR)
        left, top = (w - 224) // 2, (h - 224) // 2
        buffer = io.BytesIO()
        image.crop((left, top, left + 224, top + 224)).save(buffer, "JPEG", quality=90)
        out.append(buffer.getvalue())
    if not out:
        raise SystemExit(f"no images in {folder}")
    return out


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _get(port: int, path: str):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        data = response.read()
        return response.status, (json.loads(data) if data else None)
    finally:
        conn.close()


def _start_service(args, port: int) -> subprocess.Popen:
    code = (
        "import sys, json\n"
        "from imgsearch import serve\n"
        "from imgsearch.encoders import load_registry\n"
        "a = json.loads(sys.argv[1])\n"
        "encoder = load_registry(a['plugins_dir']).create(a['encoder'], a['weights'])\n"
        "serve.run(encoder, '127.0.0.1', a['port'], 1, batch_window_s=a['window'], max_batch=a['max_batch'],\n"
        "          plugins_dir=a['plugins_dir'], access_log=False, log_level='warning')\n"
    )
    spec = {"encoder": args.encoder, "weights": args.weights, "plugins_dir": args.plugins_dir,
            "port": port, "window": args.batch_window_ms / 1000, "max_batch": args.max_batch}
    process = subprocess.Popen([sys.executable, "-c", code, json.dumps(spec)], cwd=REPO)
    deadline = time.monotonic() + 300
    while True:
        try:
            status, reply = _get(port, "/.well-known/ready")
            if status == 204:
                return process
            if reply and "failed" in reply.get("error", ""):
                process.terminate()
                raise SystemExit(f"the service cannot serve: {reply['error']}")
        except OSError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise SystemExit("the service did not become ready")
        time.sleep(0.1)


def _load(port: int, bodies: list[bytes], clients: int, requests: int) -> tuple[float, list[float]]:
    """``requests`` POSTs from ``clients`` threads: (wall seconds, latencies)."""
    latencies: list[float] = []
    lock = threading.Lock()
    counter = iter(range(requests))
    start = threading.Barrier(clients)

    def client(_):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        mine = []
        try:
            start.wait()
            while True:
                with lock:
                    i = next(counter, None)
                if i is None:
                    break
                began = time.perf_counter()
                conn.request("POST", "/vectors", body=bodies[i % len(bodies)],
                             headers={"Content-Type": "application/json"})
                response = conn.getresponse()
                data = response.read()
                mine.append(time.perf_counter() - began)
                if response.status != 200:
                    raise RuntimeError(f"status {response.status}: {data[:200]!r}")
        finally:
            conn.close()
        with lock:
            latencies.extend(mine)

    began = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(client, range(clients)))
    return time.perf_counter() - began, latencies


def _encoder_only(args, jpegs: list[bytes], batches: list[int], images: int = 256) -> dict[int, float]:
    """images/s of embed_pixels on resized pixels, for each batch size."""
    from imgsearch import images as imgs
    from imgsearch.encoders import load_registry

    encoder = load_registry(args.plugins_dir).create(args.encoder, args.weights).ensure_loaded()
    prep = encoder.preprocessing
    pixels = np.stack([prep.resize_image(imgs.decode(d, draft_size=prep.draft_size)) for d in jpegs])
    rates = {}
    for batch in batches:
        count = max(images, batch)
        repeated = np.concatenate([pixels] * (-(-count // len(pixels))))[:count]
        encoder.embed_pixels(repeated[:batch])  # warm-up: graph building, allocations
        began = time.perf_counter()
        for start in range(0, count, batch):
            encoder.embed_pixels(repeated[start : start + batch])
        rates[batch] = count / (time.perf_counter() - began)
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", nargs="?", type=Path, default=REPO / "sample_data" / "labelled")
    parser.add_argument("--encoder", default="efficientnet-lite0")
    parser.add_argument("--weights", default=None)
    parser.add_argument("--plugins-dir", default=None)
    parser.add_argument("--requests", type=int, default=200, help="requests per setting")
    parser.add_argument("--clients", default="1,8", help="comma-separated concurrent clients")
    parser.add_argument("--images", type=int, default=64, help="distinct pictures to cycle through")
    parser.add_argument("--batch-window-ms", type=float, default=5.0)
    parser.add_argument("--max-batch", type=int, default=None)
    args = parser.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # before this process imports TensorFlow
    settings = [int(c) for c in args.clients.split(",")]

    jpegs = _jpegs(args.folder, args.images)
    bodies = [json.dumps({"id": f"img-{i}", "image": base64.b64encode(d).decode()}).encode()
              for i, d in enumerate(jpegs)]
    print(f"{args.encoder}: {len(jpegs)} distinct 224x224 JPEGs from {args.folder} "
          f"(mean {statistics.mean(map(len, jpegs)) / 1024:.0f} KiB), {os.cpu_count()} CPUs", flush=True)

    port = _free_port()
    process = _start_service(args, port)
    rows = []
    try:
        for clients in settings:  # warm-up at every concurrency: threads, pools, batch shapes
            _load(port, bodies, clients, max(2 * clients, 8))
        for clients in settings:
            before = _get(port, "/meta")[1]["served"]
            seconds, latencies = _load(port, bodies, clients, args.requests)
            after = _get(port, "/meta")[1]["served"]
            batches = after["batches"] - before["batches"]
            per_batch = (after["vectors"] - before["vectors"]) / max(batches, 1)
            ms = np.percentile(np.asarray(latencies) * 1000, [50, 99])
            rows.append((clients, args.requests / seconds, ms[0], ms[1], per_batch))
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(60)

    # 32 is the reference (the batch size of the speed benchmarks and of
    # `index`); smaller batches show what the service's own batches can reach.
    rates = _encoder_only(args, jpegs, sorted({1, 8, 32, *settings}))
    print(f"{'clients':>7}  {'requests/s':>10}  {'p50 ms':>7}  {'p99 ms':>7}  {'images/batch':>12}  {'of encoder-only':>15}")
    for clients, rate, p50, p99, per_batch in rows:
        print(f"{clients:>7}  {rate:>10.1f}  {p50:>7.1f}  {p99:>7.1f}  {per_batch:>12.2f}  {rate / rates[32]:>15.0%}")
    print("encoder alone (embed_pixels on resized pixels, model loaded and warm), images/s: "
          + ", ".join(f"batch {b}: {r:.1f}" for b, r in sorted(rates.items())))


if __name__ == "__main__":
    main()
