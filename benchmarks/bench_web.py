"""How fast the search page answers on an index of 100,000 images,
thumbnails included.

Usage:
    python benchmarks/bench_web.py [PHOTOS] [--count 100000] [--real 1000] [--queries 10]
                                   [--photo-side N] [--workdir DIR] [--keep]

PHOTOS is a folder of labelled photos (class folders; default
sample_data/labelled); with Imagenette (``DIR/train`` and ``DIR/val``) the
index is made from train/ and the queries come from val/, photos the index
has never seen.  Imagenette's photos are 224x224; --photo-side N makes
each photo used (indexed or sent) a JPEG of N pixels on its long side
(upscaled, quality 90, in the work folder), the size of camera photos.

The index, in one run:

1. ``imgsearch index`` of --real photos with efficientnet-lite0 (real
   vectors of real files).
2. Filled up to --count images through ``Store.commit``, 1,000 at a time:
   each synthetic image is one of the real photos seen anew (its vector
   plus Gaussian noise, cosine about 0.9 to it) under a path of its own, a
   symbolic link to that photo, so every result has a real thumbnail made
   from a real file, checked against the recorded SHA-256 as always.
3. ``imgsearch optimize`` (the automatic index type: ivf-sq8 at 100,000).

Then ``imgsearch serve`` runs in a process of its own and this script acts
as the page does, a browser's six connections at a time:

  query       POST /api/query?k=12 with a photo file, then GET the 12 result
              thumbnails; each query photo is sent once, so neither the
              server's upload cache nor its thumbnail cache has seen them
              (thumbnails of a previous query's neighbours may be cached)
  more        GET /api/images/ID/similar?k=12 for a random indexed id, then
              its 12 thumbnails (most not made before); with include_self,
              since the copies of a photo share its content hash, which
              would otherwise leave them all out as the image itself
  browse      GET /api/images?label=..&limit=60 and its 60 thumbnails
  again       the query of a photo sent before (vector and thumbnails cached)

and, when Chromium and Selenium are installed, the page itself in headless
Chromium: from choosing the file to the last result thumbnail drawn.
Each figure is the median (and the slowest) of --queries tries.  Clients
and server share this machine's cores: compare figures of one run.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.parse
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
BATCH = 1000
K = 12


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def imgsearch(*args) -> None:
    subprocess.run([sys.executable, "-m", "imgsearch", *map(str, args)], check=True, stdout=subprocess.DEVNULL)


def photo_folders(photos: Path) -> tuple[Path, list[Path]]:
    """(the folder to index, the query photos)."""
    if (photos / "train").is_dir() and (photos / "val").is_dir():
        queries = sorted((photos / "val").glob("*/*.JPEG")) + sorted((photos / "val").glob("*/*.jpg"))
        return photos / "train", queries[:: max(1, len(queries) // 200)]
    return photos, sorted((REPO / "sample_data" / "queries").glob("*.jpg"))


def place(photo: Path, target: Path, side: int | None) -> Path:
    """The photo at ``target``: a link to it, or a JPEG of ``side`` pixels
    on its long side."""
    if side is None:
        target.symlink_to(photo.resolve())
        return target
    from PIL import Image

    target = target.with_suffix(".jpg")
    with Image.open(photo) as image:
        image = image.convert("RGB")
        scale = side / max(image.size)
        image.resize((round(image.width * scale), round(image.height * scale)), Image.Resampling.BICUBIC).save(
            target, "JPEG", quality=90)
    return target


def build(workdir: Path, source: Path, count: int, real: int, side: int | None) -> Path:
    from imgsearch.store import Changes, Entry, Store

    chosen = workdir / "chosen"
    classes = sorted(p for p in source.iterdir() if p.is_dir())
    per_class = max(1, real // len(classes))
    for folder in classes:
        (chosen / folder.name).mkdir(parents=True)
        for photo in sorted(folder.iterdir())[:per_class]:
            place(photo, chosen / folder.name / photo.name, side)
    index = workdir / "index"
    started = time.perf_counter()
    imgsearch("index", chosen, "--index", index, "--encoder", "efficientnet-lite0", "--no-optimize")
    _log(f"indexed the real photos in {time.perf_counter() - started:.1f} s")

    rng = np.random.default_rng(0)
    links = workdir / "links"
    links.mkdir()
    started = time.perf_counter()
    with Store.open(index, writable=True) as store:
        originals = store.entries()
        vectors = store.vectors([e.id for e in originals])
        next_id = store.next_id
        while store.count < count:
            n = min(BATCH, count - store.count)
            picks = rng.integers(0, len(originals), n)
            noisy = vectors[picks] + 0.5 * rng.standard_normal((n, vectors.shape[1])) / np.sqrt(vectors.shape[1])
            noisy /= np.linalg.norm(noisy, axis=1, keepdims=True)
            entries = []
            for offset, pick in enumerate(picks):
                original = originals[pick]
                path = links / f"{next_id + offset:08d}{Path(original.path).suffix}"
                path.symlink_to(os.path.realpath(original.path))
                entries.append(Entry(next_id + offset, str(path), original.sha256, original.size, 0.0,
                                     original.label, original.width, original.height))
            store.commit(Changes(added=entries, vectors=list(noisy.astype(np.float32))))
            next_id += n
    _log(f"committed {count - len(originals)} more in {time.perf_counter() - started:.1f} s")
    started = time.perf_counter()
    imgsearch("optimize", "--index", index)
    _log(f"optimized in {time.perf_counter() - started:.1f} s")
    return index


class Client:
    """A browser's way of asking: one request per connection of a pool of six."""

    def __init__(self, port: int):
        self.port = port
        self.pool = ThreadPoolExecutor(6)

    def call(self, method: str, path: str, body: bytes | None = None) -> bytes:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=120)
        try:
            conn.request(method, path, body=body)
            response = conn.getresponse()
            data = response.read()
            if response.status != 200:
                raise RuntimeError(f"{method} {path}: {response.status} {data[:200]!r}")
            return data
        finally:
            conn.close()

    def json(self, method: str, path: str, body: bytes | None = None) -> dict:
        return json.loads(self.call(method, path, body))

    def thumbnails(self, rows, expected: int = K) -> None:
        if len(rows) != expected:  # a figure of fewer thumbnails would flatter
            raise RuntimeError(f"{len(rows)} results, not {expected}")
        list(self.pool.map(lambda row: self.call("GET", row["thumbnail"]), rows))


def timed(work) -> tuple[float, object]:
    started = time.perf_counter()
    result = work()
    return time.perf_counter() - started, result


def start_server(index: Path) -> tuple[subprocess.Popen, int]:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    process = subprocess.Popen([sys.executable, "-m", "imgsearch", "serve", "--index", str(index),
                                "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    client = Client(port)
    deadline = time.monotonic() + 300
    while True:
        try:
            if client.json("GET", "/api/info")["server"]["ready"]:
                return process, port
        except OSError:
            pass
        if time.monotonic() > deadline or process.poll() is not None:
            raise SystemExit("imgsearch serve did not start")
        time.sleep(0.2)


def summary(name: str, seconds: list[float]) -> str:
    return f"| {name} | {statistics.median(seconds) * 1000:.0f} | {max(seconds) * 1000:.0f} | {len(seconds)} |"


def measure(port: int, queries: list[Path], tries: int) -> list[str]:
    client = Client(port)
    info = client.json("GET", "/api/info")
    label = next(iter(info["labels"]))
    rng = np.random.default_rng(1)
    figures = {"query: answer": [], "query: answer + 12 thumbnails": [], "more like this + 12 thumbnails": [],
               "browse a label: 60 + 60 thumbnails": [], "query again (all cached)": []}
    # Warm-up: the first encoder call and the first search touch cold pages.
    client.json("POST", f"/api/query?k={K}", queries[-1].read_bytes())
    for photo in queries[:tries]:
        data = photo.read_bytes()
        answer_s, answer = timed(lambda: client.json("POST", f"/api/query?k={K}", data))
        thumbs_s, _ = timed(lambda: client.thumbnails(answer["results"]))
        figures["query: answer"].append(answer_s)
        figures["query: answer + 12 thumbnails"].append(answer_s + thumbs_s)
        other = client.json("GET", f"/api/images?limit=1&after={rng.integers(0, info['count'])}")["images"][0]["id"]
        figures["more like this + 12 thumbnails"].append(timed(lambda: client.thumbnails(
            client.json("GET", f"/api/images/{other}/similar?k={K}&include_self=true")["results"]))[0])
        figures["query again (all cached)"].append(timed(lambda: client.thumbnails(
            client.json("POST", f"/api/query?k={K}", data)["results"]))[0])
    after = -1
    for _ in range(tries):
        page_s, page = timed(lambda: client.json(
            "GET", f"/api/images?label={urllib.parse.quote(label)}&limit=60&after={after}"))
        thumbs_s, _ = timed(lambda: client.thumbnails(page["images"], 60))
        figures["browse a label: 60 + 60 thumbnails"].append(page_s + thumbs_s)
        after = page["next"]
        if after is None:
            break
    return [summary(name, values) for name, values in figures.items()]


def in_browser(port: int, queries: list[Path], tries: int) -> list[str]:
    chromium, driver_path = shutil.which("chromium"), shutil.which("chromedriver")
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
        from selenium.webdriver.support.ui import WebDriverWait
    except ImportError:
        return ["(no browser figure: selenium is not installed)"]
    if not (chromium and driver_path):
        return ["(no browser figure: chromium and chromedriver are not installed)"]
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,1000"):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    seconds = []
    try:
        driver.get(f"http://127.0.0.1:{port}/")
        WebDriverWait(driver, 60).until(lambda d: "images" in d.find_element("id", "summary").text)
        for photo in queries[-tries - 1:-1]:  # photos the HTTP figures did not send
            driver.execute_script("window.benchStart = performance.now()")
            driver.find_element("id", "file").send_keys(str(photo))
            WebDriverWait(driver, 60, poll_frequency=0.01).until(lambda d: d.execute_script(
                "const imgs = [...document.querySelectorAll('#results img')];"
                "return document.getElementById('query-name').textContent === arguments[0] && imgs.length > 0 &&"
                " imgs.every(i => i.complete && i.naturalWidth > 0)", photo.name))
            seconds.append(driver.execute_script("return (performance.now() - window.benchStart) / 1000"))
    finally:
        driver.quit()
    return [summary("the page in Chromium: choose a file to 12 thumbnails drawn (polled every 10 ms)", seconds)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("photos", nargs="?", type=Path, default=REPO / "sample_data" / "labelled")
    parser.add_argument("--count", type=int, default=100_000)
    parser.add_argument("--real", type=int, default=1000)
    parser.add_argument("--queries", type=int, default=10)
    parser.add_argument("--photo-side", type=int, default=None, metavar="N")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="bench-web-", dir=args.workdir))
    try:
        source, queries = photo_folders(args.photos)
        queries = (queries * (2 * args.queries + 1))[: 2 * args.queries + 1]
        if args.photo_side:
            (workdir / "queries").mkdir()
            queries = [place(photo, workdir / "queries" / f"{n:03d}-{photo.name}", args.photo_side)
                       for n, photo in enumerate(queries)]
        index = build(workdir, source, args.count, args.real, args.photo_side)
        process, port = start_server(index)
        try:
            info = Client(port).json("GET", "/api/info")
            rows = measure(port, queries, args.queries) + in_browser(port, queries, args.queries)
        finally:
            process.terminate()
            process.wait(60)
        size = f"{args.photo_side} px JPEGs" if args.photo_side else "photos as they are"
        print(f"index: {info['count']:,} images ({args.real} real photos, {size}), encoder {info['encoder']}, "
              f"{info['index_type']} {info['search_params']}; {os.cpu_count()} CPUs")
        print("| what | median ms | slowest ms | tries |")
        print("|---|--:|--:|--:|")
        for row in rows:
            print(row)
    finally:
        if args.keep:
            _log(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
