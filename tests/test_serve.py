"""The vectorizer service (Weaviate img2vec-neural protocol), tested over HTTP.

Every test starts the real uvicorn server on a free loopback port (in a
thread, or in a subprocess where signals matter) and talks to it with
http.client: the protocol, vectors equal to what `imgsearch index` stores,
every kind of bad request, readiness, batching, a bounded load and a
graceful shutdown.
"""

from __future__ import annotations

import base64
import http.client
import importlib
import importlib.util
import io
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import textwrap
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import imgsearch
from imgsearch import images as imgs
from imgsearch.encoders import Encoder, l2_normalize, load_registry
from imgsearch.errors import ImgsearchError, WeightsError
from imgsearch.preprocessing import Preprocessing

from conftest import PLUGINS_DIR, SAMPLE_DATA

HAVE_STACK = all(importlib.util.find_spec(name) for name in ("fastapi", "uvicorn"))
needs_stack = pytest.mark.skipif(not HAVE_STACK, reason="FastAPI and uvicorn are not installed")

PHOTOS = sorted((SAMPLE_DATA / "labelled").glob("*/*.jpg"))
REPO = Path(__file__).resolve().parent.parent


# -- helpers ---------------------------------------------------------------

def body_of(data: bytes, ident: str = "some-id") -> bytes:
    return json.dumps({"id": ident, "image": base64.b64encode(data).decode("ascii")}).encode()


class Running:
    """The real uvicorn server in a thread, on a loopback port bound here
    (so there is no race for a free port)."""

    def __init__(self, app):
        import uvicorn

        self.app = app
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "server did not start"
            time.sleep(0.01)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(30)
        self.sock.close()
        assert not self.thread.is_alive(), "server did not stop"

    @property
    def service(self):
        return self.app.state.service

    def call(self, method, path, body=None, headers=None, timeout=60):
        return call(self.port, method, path, body, headers, timeout)

    def vector(self, data: bytes, ident="x", path="/vectors") -> np.ndarray:
        status, reply = self.call("POST", path, body_of(data, ident))
        assert status == 200, reply
        assert reply["id"] == ident and reply["dim"] == len(reply["vector"])
        return np.asarray(reply["vector"], dtype=np.float32)


def call(port, method, path, body=None, headers=None, timeout=60):
    """(status, parsed JSON body or None) of one request on a new connection."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        data = response.read()
        content_type = response.getheader("content-type", "")
    finally:
        conn.close()
    if data:
        assert content_type.startswith("application/json"), (response.status, content_type, data[:200])
        return response.status, json.loads(data)
    return response.status, None


def library_vectors(encoder, datas) -> np.ndarray:
    """What Index.add computes for these file contents, in one batch."""
    prep = encoder.preprocessing
    pixels = np.stack([prep.resize_image(imgs.decode(d, draft_size=prep.draft_size)) for d in datas])
    return l2_normalize(encoder.embed_pixels(pixels))


def index_vectors(tmp_path, registry, encoder_name, paths) -> dict[str, np.ndarray]:
    """Vectors by absolute path from an index built by the library."""
    from imgsearch import Index

    with Index.build(tmp_path / f"index-{encoder_name}", encoder=encoder_name, registry=registry) as index:
        report = index.add([str(p) for p in paths])
        assert report.added == len(paths) and not report.skipped
        entries = index.store.by_path()
        assert len(entries) == len(paths)
        ordered = sorted(entries)
        stored = index.store.vectors([entries[p].id for p in ordered])
    return dict(zip(ordered, stored))


def png_bomb(width=20000, height=20000) -> bytes:
    """A valid 1-bit PNG of width x height pixels (400 megapixels by default):
    50 MB of zero rows that deflate to some 50 kB."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row = b"\x00" * (1 + (width + 7) // 8)  # filter byte + packed bits
    packer = zlib.compressobj(9)
    idat = b"".join(packer.compress(row * 1000) for _ in range(height // 1000)) + packer.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def png_bytes(size=(40, 30), colour=(200, 30, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, "PNG")
    return buffer.getvalue()


@pytest.fixture
def tiny(registry):
    return registry.create("tiny-color").ensure_loaded()


# -- the optional dependency ------------------------------------------------

def test_import_without_fastapi_says_how_to_install(monkeypatch):
    # None in sys.modules makes `import fastapi` raise ImportError, as when
    # the extra is not installed.
    monkeypatch.setitem(sys.modules, "fastapi", None)
    monkeypatch.delitem(sys.modules, "imgsearch.serve", raising=False)
    with pytest.raises(ImgsearchError) as caught:
        importlib.import_module("imgsearch.serve")
    assert str(caught.value) == "the vectorizer service needs FastAPI and uvicorn: pip install 'imgsearch[serve]'"


# -- the protocol -------------------------------------------------------------

@needs_stack
def test_protocol_with_the_test_encoder(tiny, tmp_path, monkeypatch):
    from imgsearch import serve

    # Deep enough that the ids' "../../evil/..." stays inside tmp_path, where
    # a file written under that name would be seen.
    cwd = tmp_path / "a" / "b"
    cwd.mkdir(parents=True)
    monkeypatch.chdir(cwd)
    before = sorted(tmp_path.rglob("*"))
    with Running(serve.create_app(tiny)) as running:
        assert running.call("GET", "/.well-known/live") == (204, None)
        assert running.call("GET", "/.well-known/ready") == (204, None)
        status, meta = running.call("GET", "/meta")
        assert status == 200
        assert meta["encoder"] == "tiny-color" and meta["dim"] == 48
        assert meta["preprocessing"] == tiny.preprocessing.to_dict()
        assert meta["weights_fingerprint"] == "tiny-color-v1"
        assert meta["imgsearch_version"] == imgsearch.__version__
        assert meta["ready"] is True
        assert meta["formats"] == ["JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF"]

        data = PHOTOS[0].read_bytes()
        expected = library_vectors(tiny, [data])[0]
        # Both spellings, with and without a content type (Weaviate sends none).
        for path, headers in (("/vectors", {}), ("/vectors/", {"Content-Type": "application/json"})):
            # The id is opaque: echoed, never a file name.
            ident = "../../evil/" + path
            status, reply = running.call("POST", path, body_of(data, ident), headers)
            assert status == 200, reply
            assert set(reply) == {"id", "vector", "dim"}
            assert reply["id"] == ident and reply["dim"] == 48 and len(reply["vector"]) == 48
            np.testing.assert_array_equal(np.asarray(reply["vector"], np.float32), expected)
        # A data URL and MIME line breaks are the same bytes.
        wrapped = base64.encodebytes(data).decode()
        status, reply = running.call("POST", "/vectors", json.dumps(
            {"id": "u", "image": "data:image/jpeg;base64," + wrapped}))
        assert status == 200
        np.testing.assert_array_equal(np.asarray(reply["vector"], np.float32), expected)
    assert sorted(tmp_path.rglob("*")) == before, "the service wrote files"
    assert not (tmp_path / "evil").exists()


@needs_stack
def test_vectors_equal_the_index_with_the_test_encoder(tiny, registry, tmp_path):
    from imgsearch import serve

    stored = index_vectors(tmp_path, registry, "tiny-color", PHOTOS[:20])
    with Running(serve.create_app(tiny)) as running:
        for path, expected in stored.items():
            served = running.vector(Path(path).read_bytes(), ident=path)
            np.testing.assert_allclose(served, expected, rtol=0, atol=1e-6)


# -- bad requests ---------------------------------------------------------------

def _bad_requests():
    photo = PHOTOS[0].read_bytes()
    heic = b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + bytes(64)
    cases = [
        # (name, body, headers, status, words in the error)
        ("empty body", b"", {}, 400, "empty"),
        ("invalid JSON", b'{"id": "a", "image": ', {}, 400, "invalid JSON"),
        ("not UTF-8", b'{"id": "\xff\xfe", "image": "x"}', {}, 400, "invalid JSON"),
        ("deeply nested JSON", b"[" * 50000 + b"]" * 50000, {}, 400, "invalid JSON"),
        ("JSON array", b"[1, 2]", {}, 422, "JSON object"),
        ("JSON null", b"null", {}, 422, "JSON object"),
        ("missing id", json.dumps({"image": base64.b64encode(photo).decode()}).encode(), {}, 422, "'id'"),
        ("missing image", b'{"id": "a"}', {}, 422, "'image'"),
        ("id not a string", json.dumps({"id": 7, "image": base64.b64encode(photo).decode()}).encode(),
         {}, 422, "'id' must be a string"),
        ("id with a lone surrogate", b'{"id": "\\ud800", "image": "' + base64.b64encode(photo) + b'"}',
         {}, 422, "'id' is not valid Unicode"),
        ("image not a string", b'{"id": "a", "image": [1, 2, 3]}', {}, 422, "'image' must be a string"),
        ("invalid base64", b'{"id": "a", "image": "not base64!"}', {}, 400, "base64"),
        ("bad base64 padding", b'{"id": "a", "image": "abc"}', {}, 400, "base64"),
        ("empty image", b'{"id": "a", "image": ""}', {}, 422, "empty"),
        ("text, not an image", body_of(b"hello, this is text\n"), {}, 422, "not an image"),
        ("random bytes", body_of(np.random.default_rng(0).bytes(3000)), {}, 422, "not an image"),
        ("HEIC", body_of(heic), {}, 422, "HEIC"),
        ("truncated JPEG", body_of(photo[: len(photo) // 2]), {}, 422, "truncated"),
        ("decompression bomb", body_of(png_bomb()), {}, 413, "too large"),
        ("unsupported content type", body_of(photo), {"Content-Type": "image/jpeg"}, 415, "content type"),
        ("multipart", body_of(photo), {"Content-Type": "multipart/form-data; boundary=x"}, 415, "content type"),
        ("body over the limit", body_of(b"\xff" * 300_000), {}, 413, "too large"),
    ]
    return [pytest.param(*case, id=case[0]) for case in cases]


@pytest.fixture(scope="module")
def strict_service():
    """One server for all bad requests: the point is that it keeps serving.
    A 256 KiB body limit, so oversized bodies are cheap to send."""
    if not HAVE_STACK:
        pytest.skip("FastAPI and uvicorn are not installed")
    from imgsearch import serve

    encoder = load_registry(PLUGINS_DIR).create("tiny-color").ensure_loaded()
    with Running(serve.create_app(encoder, max_body_bytes=256 * 1024)) as running:
        yield running


def _still_serves(running):
    assert running.thread.is_alive()
    status, reply = running.call("POST", "/vectors", body_of(png_bytes(), "after"))
    assert status == 200 and reply["id"] == "after", reply


@needs_stack
@pytest.mark.parametrize("name, body, headers, status, words", _bad_requests())
def test_bad_request(strict_service, name, body, headers, status, words):
    got, reply = strict_service.call("POST", "/vectors", body, headers)
    assert got == status, reply
    assert isinstance(reply, dict) and set(reply) == {"error"}, reply
    assert words.lower() in reply["error"].lower(), reply["error"]
    _still_serves(strict_service)


@needs_stack
def test_declared_length_over_the_limit_is_refused_before_the_body(strict_service):
    conn = http.client.HTTPConnection("127.0.0.1", strict_service.port, timeout=10)
    try:
        conn.putrequest("POST", "/vectors")
        conn.putheader("Content-Length", str(10**9))
        conn.endheaders()  # and not one byte of the gigabyte
        response = conn.getresponse()
        assert response.status == 413
        assert "too large" in json.loads(response.read())["error"]
    finally:
        conn.close()
    _still_serves(strict_service)


@needs_stack
def test_chunked_body_over_the_limit_is_refused_while_reading(strict_service):
    conn = http.client.HTTPConnection("127.0.0.1", strict_service.port, timeout=10)
    try:
        chunks = iter([b"x" * 16384] * 20)  # 320 KiB, no Content-Length
        conn.request("POST", "/vectors", body=chunks, encode_chunked=True,
                     headers={"Transfer-Encoding": "chunked"})
        response = conn.getresponse()
        assert response.status == 413
        assert "too large" in json.loads(response.read())["error"]
    finally:
        conn.close()
    _still_serves(strict_service)


@needs_stack
@pytest.mark.parametrize("size, content_type, status", [
    (16 * 1024 * 1024, "application/json", 413),
    (16 * 1024 * 1024, "image/jpeg", 415),
], ids=["too large", "unsupported type"])
def test_clients_that_close_the_connection_still_read_the_error(strict_service, size, content_type, status):
    # urllib sends the whole body before reading and asks the server to close
    # the connection: the error must reach it, not a connection reset.  16 MiB
    # is more than loopback buffers hold, so the client is still sending when
    # the answer is ready.
    import urllib.error
    import urllib.request

    request = urllib.request.Request(f"http://127.0.0.1:{strict_service.port}/vectors", data=b"x" * size,
                                      headers={"Content-Type": content_type})
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(request, timeout=30)
    assert caught.value.code == status
    assert set(json.loads(caught.value.read())) == {"error"}
    _still_serves(strict_service)


@needs_stack
def test_unknown_paths_and_methods_get_json_errors(strict_service):
    assert strict_service.call("GET", "/nothing-here") == (404, {"error": "Not Found"})
    assert strict_service.call("GET", "/vectors") == (405, {"error": "Method Not Allowed"})
    _still_serves(strict_service)


@needs_stack
def test_limits_are_checked(tiny):
    from imgsearch import serve
    from imgsearch.errors import UsageError

    for bad in ({"max_body_bytes": 0}, {"max_megapixels": 0.0}, {"batch_window_s": -1.0}, {"max_batch": 0}):
        with pytest.raises(UsageError):
            serve.create_app(tiny, **bad)


@needs_stack
def test_meta_names_no_local_path_and_hashes_the_weights_once(registry, tmp_path):
    from imgsearch import serve

    weights = tmp_path / "private" / "weights.bin"
    weights.parent.mkdir()
    weights.write_bytes(b"not really weights")
    calls = []

    class Fingerprinted(registry.get("tiny-color")):
        def weights_fingerprint(self):
            calls.append(1)  # real encoders may hash a large file here
            return "sha256:" + "0" * 64

    encoder = Fingerprinted(str(weights))
    with Running(serve.create_app(encoder)) as running:
        deadline = time.monotonic() + 10
        while running.call("GET", "/.well-known/ready")[0] != 204:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        answers = [running.call("GET", "/meta") for _ in range(5)]
    assert all(status == 200 for status, _ in answers)
    meta = answers[0][1]
    assert meta["weights_fingerprint"] == "sha256:" + "0" * 64
    assert meta["encoder"] == "tiny-color" and meta["dim"] == 48 and "preprocessing" in meta
    text = json.dumps(meta)
    assert str(tmp_path) not in text and "weights.bin" not in text and "private" not in text
    assert len(calls) == 1, f"the fingerprint was computed {len(calls)} times"


@needs_stack
@pytest.mark.parametrize("fmt", ["PPM", "TGA", "EPS"])
def test_formats_outside_the_list_are_refused_unless_listed(tiny, fmt):
    from imgsearch import serve

    if fmt == "EPS":
        data = (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 20 20\n%%EndComments\n"
                b"newpath 0 0 moveto 20 20 lineto stroke\nshowpage\n%%EOF\n")
    else:
        buffer = io.BytesIO()
        Image.new("RGB", (20, 20), (200, 30, 30)).save(buffer, fmt)
        data = buffer.getvalue()
    with Running(serve.create_app(tiny)) as running:
        status, reply = running.call("POST", "/vectors", body_of(data))
        assert status == 415, reply
        assert fmt in reply["error"] and "not among the formats read" in reply["error"], reply
    if fmt != "EPS":  # reading EPS needs Ghostscript
        with Running(serve.create_app(tiny, formats=["jpeg", "png", fmt.lower()])) as running:
            expected = library_vectors(tiny, [png_bytes((20, 20), (200, 30, 30))])[0]
            np.testing.assert_allclose(running.vector(data), expected, atol=1e-6)


@needs_stack
def test_decoding_waits_for_the_memory_budget_then_gets_503(tiny, monkeypatch):
    from imgsearch import serve

    slow = threading.Event()
    original = imgs.pixels_of

    def slow_pixels(*args, **kwargs):
        slow.wait(2)  # holds its share of the budget meanwhile
        return original(*args, **kwargs)

    monkeypatch.setattr(serve.imgs, "pixels_of", slow_pixels)
    data = png_bytes((400, 300))
    estimate = imgs.open_image(data, draft_size=tiny.preprocessing.draft_size).estimate
    # Room for one image at a time, and a short wait.
    app = serve.create_app(tiny, max_decode_bytes=estimate + estimate // 2, decode_wait_s=0.3)
    with Running(app) as running, ThreadPoolExecutor(2) as pool:
        first = pool.submit(running.call, "POST", "/vectors", body_of(data, "first"))
        time.sleep(0.5)
        conn = http.client.HTTPConnection("127.0.0.1", running.port, timeout=30)
        conn.request("POST", "/vectors", body=body_of(data, "second"))
        response = conn.getresponse()
        reply = json.loads(response.read())
        assert response.status == 503 and response.getheader("Retry-After") == "1", reply
        assert "try again" in reply["error"]
        conn.close()
        slow.set()
        assert first.result(30)[0] == 200
        # Once the budget is free again, the next request goes through.
        assert running.call("POST", "/vectors", body_of(data, "third"))[0] == 200
        assert running.service.budget.peak <= estimate + estimate // 2


@needs_stack
def test_a_body_that_does_not_arrive_in_time_gets_408(tiny):
    from imgsearch import serve

    with Running(serve.create_app(tiny, read_timeout_s=0.5)) as running:
        with socket.create_connection(("127.0.0.1", running.port), timeout=10) as sock:
            sock.sendall(b"POST /vectors HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n{\"id\": ")
            started = time.monotonic()
            answer = b""
            while chunk := sock.recv(65536):
                answer += chunk
            assert time.monotonic() - started < 5
        assert answer.startswith(b"HTTP/1.1 408"), answer
        assert b"did not arrive within 0.5 s" in answer
        _still_serves(running)


@needs_stack
def test_megapixel_limit_applies(tiny):
    from imgsearch import serve

    with Running(serve.create_app(tiny, max_megapixels=0.001)) as running:  # 1000 pixels
        status, reply = running.call("POST", "/vectors", body_of(png_bytes((40, 30))))
        assert status == 413 and "too large" in reply["error"]
        assert running.vector(png_bytes((30, 30))).shape == (48,)


# -- readiness ------------------------------------------------------------------

class GatedEncoder(Encoder):
    """Loads only when the test says so, or fails to load when told to."""

    name = "gated"
    dim = 3
    preprocessing = Preprocessing(input_size=8, resize="stretch")
    default_weights = "builtin"

    def __init__(self, fail=False):
        super().__init__()
        self.gate = threading.Event()
        self.fail = fail

    def weights_fingerprint(self):
        return "gated-v1"

    def load(self):
        assert self.gate.wait(30)
        if self.fail:
            raise WeightsError("weights file gated.bin not found")

    def embed_batch(self, pixels):
        return pixels.mean(axis=(1, 2))


@needs_stack
def test_ready_only_once_the_encoder_is_loaded():
    from imgsearch import serve

    encoder = GatedEncoder()
    with Running(serve.create_app(encoder)) as running, ThreadPoolExecutor(1) as pool:
        assert running.call("GET", "/.well-known/live") == (204, None)
        status, reply = running.call("GET", "/.well-known/ready")
        assert status == 503 and "loading" in reply["error"]
        status, meta = running.call("GET", "/meta")
        assert status == 200 and meta["ready"] is False and meta["weights_fingerprint"] is None
        # A request during the load waits for it rather than failing.
        early = pool.submit(running.call, "POST", "/vectors", body_of(png_bytes(), "early"))
        time.sleep(0.3)
        assert not early.done()
        encoder.gate.set()
        status, reply = early.result(30)
        assert status == 200 and reply["id"] == "early" and reply["dim"] == 3
        assert running.call("GET", "/.well-known/ready") == (204, None)
        assert running.call("GET", "/meta")[1]["weights_fingerprint"] == "gated-v1"


@needs_stack
def test_an_encoder_that_fails_to_load_is_reported_not_fatal():
    from imgsearch import serve

    encoder = GatedEncoder(fail=True)
    encoder.gate.set()
    with Running(serve.create_app(encoder)) as running:
        deadline = time.monotonic() + 10
        while running.service.load_error is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert running.call("GET", "/.well-known/live") == (204, None)
        status, reply = running.call("GET", "/.well-known/ready")
        assert status == 503 and "gated.bin not found" in reply["error"]
        status, reply = running.call("POST", "/vectors", body_of(png_bytes()))
        assert status == 503 and "failed to load" in reply["error"]


@needs_stack
def test_run_exits_with_the_reason_when_the_encoder_cannot_load():
    from imgsearch import serve

    encoder = GatedEncoder(fail=True)
    encoder.gate.set()
    outcome = {}

    def serve_it():
        try:
            serve.run(encoder, "127.0.0.1", _free_port(), access_log=False)
            outcome["returned"] = True
        except ImgsearchError as exc:
            outcome["error"] = str(exc)

    # A thread, so that a service that never exits fails this test instead
    # of hanging it.
    thread = threading.Thread(target=serve_it, daemon=True)
    thread.start()
    thread.join(60)
    assert not thread.is_alive(), "the service kept running without its model"
    assert outcome == {"error": "the encoder failed to load: weights file gated.bin not found"}


@needs_stack
def test_several_workers_refuse_an_encoder_that_cannot_load_before_starting():
    from imgsearch import serve

    from imgsearch.runtime import RuntimeOptions

    encoder = GatedEncoder(fail=True)
    encoder.gate.set()
    encoder.use_runtime(RuntimeOptions("keras", "fp32"))  # each worker would load its own model
    port = _free_port()
    with pytest.raises(ImgsearchError, match="gated.bin not found"):
        serve.run(encoder, "127.0.0.1", port, workers=2, access_log=False)
    with pytest.raises(OSError):  # nothing was left listening
        call(port, "GET", "/.well-known/live", timeout=5)




@needs_stack
def test_the_command_exits_with_one_line_when_the_encoder_cannot_load():
    plugins = Path(__file__).resolve().parent / "plugins_broken"
    command = [sys.executable, "-m", "imgsearch", "--plugins-dir", str(plugins), "serve-vectorizer",
               "--encoder", "broken", "--port", str(_free_port())]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("Error:")]
    assert errors == ["Error: the encoder failed to load: weights of broken cannot be downloaded here"]
    assert "Traceback" not in done.stderr and done.stdout == ""


# -- batching and load ------------------------------------------------------------

@needs_stack
def test_concurrent_requests_share_encoder_calls(registry):
    from imgsearch import serve

    base = registry.get("tiny-color")
    calls = []

    class Counting(base):
        def embed_pixels(self, pixels):
            calls.append(len(pixels))
            time.sleep(0.3)  # busy long enough for the others to queue up
            return super().embed_pixels(pixels)

    encoder = Counting().ensure_loaded()
    datas = [p.read_bytes() for p in PHOTOS[:8]]
    expected = library_vectors(registry.create("tiny-color"), datas)
    start = threading.Barrier(len(datas))

    def send(i):
        start.wait()
        return running.call("POST", "/vectors", body_of(datas[i], f"img-{i}"))

    with Running(serve.create_app(encoder, max_batch=4)) as running, ThreadPoolExecutor(len(datas)) as pool:
        replies = list(pool.map(send, range(len(datas))))
    for i, (status, reply) in enumerate(replies):
        assert status == 200 and reply["id"] == f"img-{i}"
        np.testing.assert_allclose(np.asarray(reply["vector"], np.float32), expected[i], atol=1e-6)
    assert sum(calls) == len(datas)
    assert len(calls) < len(datas), calls
    assert max(calls) <= 4, calls  # max_batch holds
    assert max(calls) > 1, calls


@needs_stack
def test_bounded_load_on_loopback(tiny):
    from imgsearch import serve

    datas = [p.read_bytes() for p in PHOTOS[:10]]
    expected = library_vectors(tiny, datas)

    def client(worker):
        # One keep-alive connection per client, as Weaviate's HTTP client keeps.
        conn = http.client.HTTPConnection("127.0.0.1", running.port, timeout=60)
        results = []
        try:
            for i in range(10):
                conn.request("POST", "/vectors", body=body_of(datas[i], f"{worker}-{i}"))
                response = conn.getresponse()
                results.append((i, response.status, json.loads(response.read())))
        finally:
            conn.close()
        return results

    with Running(serve.create_app(tiny)) as running, ThreadPoolExecutor(8) as pool:
        started = time.perf_counter()
        everything = [r for rs in pool.map(client, range(8)) for r in rs]
        elapsed = time.perf_counter() - started
        assert running.service.vectors == 80
    assert len(everything) == 80
    for i, status, reply in everything:
        assert status == 200, reply
        np.testing.assert_allclose(np.asarray(reply["vector"], np.float32), expected[i], atol=1e-6)
    assert elapsed < 30


# -- the real encoder: equality with `imgsearch index` -------------------------------

@pytest.fixture(scope="module")
def lite0(_session_cache, tmp_path_factory):
    """efficientnet-lite0 served, and an index of the sample photos built by
    the library with an encoder of its own, as `imgsearch index` would."""
    if not HAVE_STACK:
        pytest.skip("FastAPI and uvicorn are not installed")
    from imgsearch import serve

    # Module fixtures run before the per-test environment: point the
    # converted-weights cache at the test session's own folder explicitly.
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("IMGSEARCH_CACHE_DIR", str(_session_cache))
        patch.setenv("TF_CPP_MIN_LOG_LEVEL", "3")
        registry = load_registry()
        stored = index_vectors(tmp_path_factory.mktemp("lite0"), registry, "efficientnet-lite0", PHOTOS)
        encoder = registry.create("efficientnet-lite0")
        with Running(serve.create_app(encoder)) as running:
            deadline = time.monotonic() + 120
            while running.call("GET", "/.well-known/ready")[0] != 204:
                assert running.service.load_error is None, running.service.load_error
                assert time.monotonic() < deadline, "efficientnet-lite0 did not load"
                time.sleep(0.05)
            yield running, encoder, stored


@needs_stack
@pytest.mark.slow
def test_lite0_vectors_equal_the_index_one_at_a_time(lite0):
    running, encoder, stored = lite0
    worst = 0.0
    for path, expected in stored.items():
        data = Path(path).read_bytes()
        served = running.vector(data, ident=path)
        # A batch of one is the library's batch of one, bit for bit ...
        np.testing.assert_array_equal(served, library_vectors(encoder, [data])[0])
        # ... and within float rounding of the index, whose batches held 32.
        np.testing.assert_allclose(served, expected, rtol=0, atol=1e-5)
        worst = max(worst, float(np.abs(served - expected).max()))
    print(f"largest difference from the index: {worst:.2e}")


@needs_stack
@pytest.mark.slow
def test_lite0_vectors_equal_the_index_when_batched(lite0):
    running, encoder, stored = lite0
    paths = sorted(stored)
    with ThreadPoolExecutor(8) as pool:
        served = list(pool.map(lambda p: running.vector(Path(p).read_bytes(), ident=p), paths))
    for path, vector in zip(paths, served):
        np.testing.assert_allclose(vector, stored[path], rtol=0, atol=1e-5)
    status, meta = running.call("GET", "/meta")
    assert meta["encoder"] == "efficientnet-lite0" and meta["dim"] == 1280
    assert meta["weights_fingerprint"] == encoder.weights_fingerprint()


# -- the process: graceful shutdown, workers, binding --------------------------------

SLOW_PLUGIN = '''
import os
import time
from pathlib import Path

import numpy as np

from imgsearch import Encoder, Preprocessing


class SlowColor(Encoder):
    """Mean colour, slowly: leaves time to signal the server mid-request."""

    name = "slow-color"
    dim = 3
    preprocessing = Preprocessing(input_size=16, resize="stretch")
    default_weights = "builtin"

    def weights_status(self):
        from imgsearch import WeightsStatus
        return WeightsStatus(True, "no weights")

    def weights_fingerprint(self):
        return "slow-color-v1"

    def load(self):
        pass

    def embed_batch(self, pixels):
        Path(os.environ["SLOW_COLOR_MARKER"]).touch()
        time.sleep(float(os.environ.get("SLOW_COLOR_SECONDS", "0")))
        return pixels.mean(axis=(1, 2))


def register_encoders(register):
    register(SlowColor)
'''


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _start_process(tmp_path, port, workers=1, seconds="0"):
    plugins = tmp_path / "plugins"
    plugins.mkdir(exist_ok=True)
    (plugins / "slow_color.py").write_text(SLOW_PLUGIN)
    marker = tmp_path / "embedding-started"
    env = dict(os.environ, IMGSEARCH_PLUGINS_DIR=str(plugins), SLOW_COLOR_MARKER=str(marker),
               SLOW_COLOR_SECONDS=seconds, PYTHONPATH=str(REPO))
    code = textwrap.dedent(f"""
        import os
        from imgsearch import serve
        from imgsearch.encoders import load_registry
        plugins = os.environ["IMGSEARCH_PLUGINS_DIR"]
        encoder = load_registry(plugins).create("slow-color")
        serve.run(encoder, "127.0.0.1", {port}, {workers}, plugins_dir=plugins, access_log=False)
    """)
    process = subprocess.Popen([sys.executable, "-c", code], env=env, cwd=tmp_path,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 60
    while True:
        try:
            if call(port, "GET", "/.well-known/ready", timeout=5)[0] == 204:
                break
        except OSError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"the service did not start: {process.communicate()[0]}")
        time.sleep(0.05)
    return process, marker


@needs_stack
@pytest.mark.slow
def test_sigterm_finishes_the_request_in_flight(tmp_path):
    port = _free_port()
    process, marker = _start_process(tmp_path, port, seconds="1.5")
    try:
        with ThreadPoolExecutor(1) as pool:
            in_flight = pool.submit(call, port, "POST", "/vectors", body_of(png_bytes(), "in-flight"))
            deadline = time.monotonic() + 20
            while not marker.exists():  # the encoder is working on it now
                assert time.monotonic() < deadline and not in_flight.done(), "the request never reached the encoder"
                time.sleep(0.01)
            process.send_signal(signal.SIGTERM)
            status, reply = in_flight.result(30)
        assert status == 200 and reply["id"] == "in-flight" and reply["dim"] == 3
        output = process.communicate(timeout=30)[0]
        assert process.returncode == 0, output
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    with pytest.raises(OSError):  # and it no longer listens
        call(port, "GET", "/.well-known/live", timeout=5)


@needs_stack
@pytest.mark.slow
def test_several_workers(tmp_path):
    port = _free_port()
    process, _ = _start_process(tmp_path, port, workers=2)
    try:
        for i in range(4):
            status, reply = call(port, "POST", "/vectors", body_of(png_bytes(colour=(i, 2 * i, 3 * i)), f"w{i}"))
            assert status == 200 and reply["id"] == f"w{i}"
        process.send_signal(signal.SIGTERM)
        output = process.communicate(timeout=60)[0]
        assert process.returncode == 0, output
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()


@needs_stack
def test_an_address_in_use_is_a_one_line_error(tiny):
    from imgsearch import serve

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ImgsearchError, match=f"cannot listen on 127.0.0.1:{port}"):
            serve.run(tiny, "127.0.0.1", port)


def test_ci_has_the_service_stack():
    # The test extra installs FastAPI and uvicorn; in CI their absence must
    # fail loudly instead of skipping every service test.
    if os.environ.get("CI"):
        assert HAVE_STACK, "FastAPI and uvicorn are missing: install the project with its [test] extra"


@pytest.mark.slow
@needs_stack
def test_the_serve_vectorizer_command(tmp_path):
    import base64
    import shutil
    import signal
    import subprocess
    import sys
    import time
    import urllib.request

    port = _free_port()
    exe = shutil.which("imgsearch", path=os.path.dirname(sys.executable)) or shutil.which("imgsearch")
    process = subprocess.Popen([exe, "--plugins-dir", str(PLUGINS_DIR), "serve-vectorizer", "--encoder", "tiny-color",
                                "--port", str(port)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if urllib.request.urlopen(f"http://127.0.0.1:{port}/.well-known/ready").status == 204:
                    break
            except OSError:
                assert time.monotonic() < deadline and process.poll() is None, process.stderr.read()
                time.sleep(0.1)
        body = json.dumps({"id": "a/../../b", "image": base64.b64encode(PHOTOS[0].read_bytes()).decode()})
        answer = json.loads(urllib.request.urlopen(urllib.request.Request(
            f"http://127.0.0.1:{port}/vectors", data=body.encode())).read())
        assert answer["id"] == "a/../../b" and answer["dim"] == 48 and len(answer["vector"]) == 48
    finally:
        process.send_signal(signal.SIGTERM)
        out, err = process.communicate(timeout=30)
    assert process.returncode == 0, err
    # Said once, and the access log is on stderr: stdout is for results.
    assert err.count("serving encoder tiny-color") == 1
    assert f"serving encoder tiny-color (dim 48) on http://127.0.0.1:{port}" in err
    assert '"POST /vectors HTTP/1.1" 200' in err and out == ""


# -- memory, connections and timeouts under hostile load ------------------------------

def solid_png(width: int, height: int, depth: int, colour_type: int, pixel: bytes) -> bytes:
    """A valid PNG of one colour, made row by row: a few hundred kilobytes
    however many megapixels, and no memory to make."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row = b"\x00" + pixel * width  # filter byte, then the pixels
    packer = zlib.compressobj(9)
    idat = b"".join(packer.compress(row * 100) for _ in range(height // 100))
    idat += packer.compress(row * (height % 100)) + packer.flush()
    header = struct.pack(">IIBBBBB", width, height, depth, colour_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def grey16_png(width, height) -> bytes:
    return solid_png(width, height, 16, 0, b"\x80\x80")


def rgba_png(width, height) -> bytes:
    return solid_png(width, height, 8, 6, b"\x20\x80\xc0\x80")  # half transparent


def _start_command(*options):
    """`imgsearch serve-vectorizer` with the test encoder in its own process:
    (process, port), once it is ready."""
    import shutil

    port = _free_port()
    exe = shutil.which("imgsearch", path=os.path.dirname(sys.executable)) or shutil.which("imgsearch")
    process = subprocess.Popen([exe, "--plugins-dir", str(PLUGINS_DIR), "serve-vectorizer", "--encoder", "tiny-color",
                                "--port", str(port), *options],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while True:
        try:
            if call(port, "GET", "/.well-known/ready", timeout=5)[0] == 204:
                return process, port
        except OSError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"the service did not start: {process.communicate()[1]}")
        time.sleep(0.1)


def _stop_command(process) -> str:
    process.send_signal(signal.SIGTERM)
    try:
        return process.communicate(timeout=30)[1]
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()


def _peak_memory_mib(pid: int) -> float:
    """The process's peak resident memory so far (VmHWM)."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    pytest.skip("no VmHWM in /proc on this system")


# The README's figure: what the service may hold with its default limits,
# the decoding budget (512 MiB) and the process itself (about 60 MiB).
SERVICE_PEAK_BOUND_MIB = 640


@needs_stack
@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs Linux /proc")
def test_large_16_bit_and_transparent_images_keep_the_service_memory_bounded():
    # Solid pictures of 40 megapixels (the default limit): 16-bit grey once
    # took float64 copies and transparent ones a second full-size image.
    grey, rgba = grey16_png(8000, 5000), rgba_png(8000, 5000)
    assert len(grey) < 300_000 and len(rgba) < 600_000  # small requests, large pictures
    process, port = _start_command()
    try:
        # One of each alone, then a burst of eight at once.
        for data in (grey, rgba):
            status, reply = call(port, "POST", "/vectors", body_of(data, "alone"), timeout=120)
            assert status == 200, reply
        burst = [grey, rgba] * 4
        with ThreadPoolExecutor(len(burst)) as pool:
            answers = list(pool.map(lambda d: call(port, "POST", "/vectors", body_of(d), timeout=120), burst))
        peak = _peak_memory_mib(process.pid)
        print(f"service peak memory after the burst: {peak:.0f} MiB")
        # Each is embedded, or told to come back later when the budget is spent.
        for status, reply in answers:
            assert status in (200, 503), reply
        assert sum(status == 200 for status, _ in answers) >= 1
        assert peak < SERVICE_PEAK_BOUND_MIB, f"peak {peak:.0f} MiB"
        # Beyond the network service's default of 40 megapixels: refused unread.
        status, reply = call(port, "POST", "/vectors", body_of(grey16_png(10000, 10000)), timeout=120)
        assert status == 413 and "limit 40" in reply["error"], reply
    finally:
        _stop_command(process)


@needs_stack
@pytest.mark.slow
def test_connections_are_limited_and_slow_headers_cut_off():
    process, port = _start_command("--max-connections", "3", "--read-timeout", "1")
    try:
        # Headers that never finish: the connection is closed after the
        # read timeout, not held for ever.
        with socket.create_connection(("127.0.0.1", port), timeout=10) as slow:
            slow.sendall(b"POST /vectors HTTP/1.1\r\nHost: x\r\n")
            started = time.monotonic()
            assert slow.recv(1024) == b""
            assert time.monotonic() - started < 5
        # Connections beyond the limit get 503 instead of more memory.
        idle = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(3)]
        try:
            time.sleep(0.2)
            status, reply = call(port, "POST", "/vectors", body_of(png_bytes()))
            assert status == 503, reply
        finally:
            for sock in idle:
                sock.close()
        time.sleep(0.2)
        assert call(port, "POST", "/vectors", body_of(png_bytes()))[0] == 200
    finally:
        _stop_command(process)
