"""An HTTP vectorizer: any registered encoder behind the protocol of Weaviate's
``img2vec-neural`` inference container.

Endpoints::

    GET  /.well-known/live    204 as soon as the process answers
    GET  /.well-known/ready   204 once the encoder is loaded, 503 before
    GET  /meta                the encoder: name, dim, preprocessing, weights fingerprint, version
    POST /vectors  (and /vectors/)
         {"id": "...", "image": "<base64 of the image file>"}
      -> {"id": "...", "vector": [...], "dim": N}

A vector is exactly what ``imgsearch index`` stores for the same file: the
same decode (draft size, megapixel limit), the same resize, the same encoder
and the same L2 normalisation.  Bad requests get a 4xx with ``{"error": ...}``
(Weaviate parses the body as JSON before it looks at the status, so even
errors must be JSON).

Concurrency: bodies are parsed and images decoded in a thread pool (Pillow
releases the GIL), and one encoder thread embeds whatever has queued up,
so concurrent requests share a batch and the model never runs twice at once.

Memory: a request's body is bounded (``max_body_bytes``) and must arrive
within ``read_timeout_s``; its image's header is read first, and decoding
waits until the bytes it will take (estimated from the header) fit the
service-wide ``max_decode_bytes``.  With the connection limit of
:func:`run` that bounds what a burst of small requests can make us hold.

FastAPI and uvicorn are an optional extra; importing this module without
them raises :class:`~imgsearch.errors.ImgsearchError` saying how to install
them.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import collections
import contextlib
import json
import math
import os
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from . import __version__
from . import images as imgs
from .encoders import Encoder, l2_normalize
from .errors import ImgsearchError, UsageError, first_line

MISSING_STACK_MESSAGE = "the vectorizer service needs FastAPI and uvicorn: pip install 'imgsearch[serve]'"


def _import_stack():
    """FastAPI and uvicorn, or the one-line error that says how to get them.

    A function, so that this check runs before anything else in the module
    touches either package and a missing extra gives this message rather
    than a traceback from some import further down.
    """
    try:
        import fastapi
        import uvicorn
    except ImportError:
        raise ImgsearchError(MISSING_STACK_MESSAGE) from None
    return fastapi, uvicorn


_fastapi, _uvicorn = _import_stack()

from fastapi import Request  # noqa: E402  (only after the check above)
from fastapi.responses import JSONResponse, Response  # noqa: E402

from .serving import (  # noqa: E402
    DEFAULT_DECODE_WAIT_S, DEFAULT_GRACEFUL_TIMEOUT_S, DEFAULT_HOST, DEFAULT_MAX_CONNECTIONS,
    DEFAULT_MAX_DECODE_BYTES, DEFAULT_MAX_MEGAPIXELS, DEFAULT_READ_TIMEOUT_S, DecodeBudget, Rejected, bind,
    decode_error, decode_pixels, error_response, install_error_handlers, logger, read_body, refusal, serve_app,
    server_options, stop_signals_end_run,
)

DEFAULT_PORT = 8080
# A base64 body is 4/3 of the file: 20 MiB admits photos up to about 15 MiB,
# far above any camera JPEG, while bounding what one request can make us hold.
DEFAULT_MAX_BODY_BYTES = 20 * 1024 * 1024
# Long enough for requests sent together to meet in one batch, short enough
# to be lost in the encoder's own time; only waited for when another
# request is known to be on its way (see _Batcher).
DEFAULT_BATCH_WINDOW_S = 0.005
# The multi-worker path rebuilds the encoder in each worker from this.
_SPEC_ENV = "IMGSEARCH_SERVE_SPEC"


# Media types sent with JSON bodies in practice.  Weaviate sends none at all;
# curl -d sends form-urlencoded and some tools text/plain, whatever the body is.
_LENIENT_TYPES = {"", "application/json", "application/x-www-form-urlencoded", "text/plain"}


def _check_content_type(value: str | None) -> None:
    media = (value or "").split(";", 1)[0].strip().lower()
    if media in _LENIENT_TYPES or media.endswith("+json"):
        return
    raise Rejected(415, f"unsupported content type {media!r}: send a JSON body "
                         '{"id": "...", "image": "<base64 of the image file>"} as application/json')



def _image_bytes(text: str) -> bytes:
    """The file bytes of the ``image`` field.

    Standard base64; a ``data:...;base64,`` prefix and line breaks (MIME
    style) are tolerated because browsers and mail tools produce them, but
    any other character is an error rather than silently skipped, so that a
    mangled upload is reported instead of decoded into something else.
    """
    if text.startswith("data:") and ";base64," in text[:200]:
        text = text.split(",", 1)[1]
    text = "".join(text.split())
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise Rejected(400, f"'image' is not valid base64 ({first_line(exc)})") from None



def _open_request(body: bytes, preprocessing, max_megapixels: float, formats) -> tuple[str, imgs.Opened]:
    """Request body to (id, the image with its header read); runs in the
    decode pool.

    The image is opened from memory exactly as ``Index.add`` opens a file;
    the id is only echoed back, never used as a path.
    """
    if not body:
        raise Rejected(400, 'empty request body; expected JSON {"id": "...", "image": "<base64>"}')
    try:
        payload = json.loads(body)
    except (ValueError, RecursionError) as exc:  # ValueError covers bad UTF-8 too
        raise Rejected(400, f"invalid JSON ({first_line(exc)})") from None
    if not isinstance(payload, dict):
        raise Rejected(422, 'the body must be a JSON object {"id": "...", "image": "<base64>"}')
    for field in ("id", "image"):
        if field not in payload:
            raise Rejected(422, f"missing field {field!r}")
        if not isinstance(payload[field], str):
            raise Rejected(422, f"field {field!r} must be a string, not {type(payload[field]).__name__}")
    try:
        payload["id"].encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate (JSON "\\ud800") cannot be echoed in UTF-8
        raise Rejected(422, "field 'id' is not valid Unicode") from None
    data = _image_bytes(payload["image"])
    if not data:
        raise Rejected(422, "'image' is empty")
    try:
        opened = imgs.open_image(data, draft_size=preprocessing.draft_size, max_megapixels=max_megapixels,
                                 formats=formats)
    except imgs.DecodeError as exc:
        raise decode_error(exc) from None
    return payload["id"], opened



class _Batcher:
    """Collects resized images and hands them to the encoder in batches.

    One batch runs at a time.  Whatever queues up while it runs forms the
    next batch, so under load batches fill without any waiting.  When the
    encoder is idle a batch starts at once, unless another request is being
    read or decoded right now: then it waits for that one, but no longer
    than ``window_s`` after the first image queued.  A lone client thus pays
    no latency for batching, while requests sent together share a batch.
    """

    def __init__(self, run_batch, max_batch: int, window_s: float):
        self._run_batch = run_batch  # async: list of pixel arrays -> (n, dim) vectors
        self.max_batch = max_batch
        self.window_s = window_s
        self._queue: collections.deque = collections.deque()
        self._wake = asyncio.Event()
        self._incoming = 0
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._serve())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        while self._queue:  # only after a graceful-shutdown timeout
            _, _, future = self._queue.popleft()
            if not future.done():
                future.set_exception(Rejected(503, "the service is shutting down"))

    @contextlib.contextmanager
    def incoming(self):
        """Marks a request as on its way to :meth:`submit`."""
        self._incoming += 1
        try:
            yield
        finally:
            self._incoming -= 1
            self._wake.set()

    def submit(self, pixels: np.ndarray) -> asyncio.Future:
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._queue.append((loop.time(), pixels, future))
        self._wake.set()
        return future

    async def _wait(self, timeout: float | None) -> bool:
        self._wake.clear()
        try:
            await asyncio.wait_for(self._wake.wait(), timeout)
            return True
        except asyncio.TimeoutError:
            return False

    async def _serve(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            while not self._queue:
                await self._wait(None)
            deadline = self._queue[0][0] + self.window_s
            while len(self._queue) < self.max_batch and self._incoming > 0:
                remaining = deadline - loop.time()
                if remaining <= 0 or not await self._wait(remaining):
                    break
            batch = [self._queue.popleft() for _ in range(min(self.max_batch, len(self._queue)))]
            batch = [item for item in batch if not item[2].done()]  # a caller gone since
            if not batch:
                continue
            try:
                vectors = await self._run_batch([pixels for _, pixels, _ in batch])
            except asyncio.CancelledError:
                for _, _, future in batch:
                    if not future.done():
                        future.set_exception(Rejected(503, "the service is shutting down"))
                raise
            except Exception as exc:  # the callers report it; the loop must go on
                for _, _, future in batch:
                    if not future.done():
                        future.set_exception(exc)
                continue
            for (_, _, future), vector in zip(batch, vectors):
                if not future.done():
                    future.set_result(vector)


class _Service:
    """The state behind one app: the encoder, its thread, the decode pool."""

    def __init__(self, encoder: Encoder, *, max_body_bytes: int, max_megapixels: float,
                 batch_window_s: float, max_batch: int, decode_threads: int, formats,
                 max_decode_bytes: int, decode_wait_s: float, read_timeout_s: float):
        self.encoder = encoder
        self.max_body_bytes = max_body_bytes
        self.max_megapixels = max_megapixels
        self.formats = formats
        self.max_decode_bytes = max_decode_bytes
        self.decode_wait_s = decode_wait_s
        self.read_timeout_s = read_timeout_s
        self.weights_fingerprint: str | None = None  # once loaded; may hash a file, so once
        self.batch_window_s = batch_window_s
        self.max_batch = max_batch
        self.decode_threads = decode_threads
        self.ready = False
        self.load_error: str | None = None
        # Called (from the loading thread) when the model cannot load; run()
        # stops the server then, so that the process exits and says why.
        self.on_load_failure = None
        self.load_seconds: float | None = None
        self.batches = 0  # embed calls made, for /meta and tests
        self.vectors = 0
        self._encoder_thread: ThreadPoolExecutor | None = None
        self._decode_pool: ThreadPoolExecutor | None = None
        self.batcher: _Batcher | None = None
        self.budget: DecodeBudget | None = None

    # -- lifecycle, on the event loop ----------------------------------
    def start(self) -> None:
        loop = asyncio.get_running_loop()
        # One thread owns the model: loading and every batch run there, in
        # order, so a batch can never start before the load has finished
        # and two batches never run at once.
        self._encoder_thread = ThreadPoolExecutor(1, thread_name_prefix="imgsearch-encoder")
        self._decode_pool = ThreadPoolExecutor(self.decode_threads, thread_name_prefix="imgsearch-decode")
        self.batcher = _Batcher(self._run_batch, self.max_batch, self.batch_window_s)
        self.batcher.start()
        self.budget = DecodeBudget(self.max_decode_bytes, self.decode_wait_s)
        # Not awaited: the server must answer /live while the model loads.
        loop.run_in_executor(self._encoder_thread, self._load)

    async def stop(self) -> None:
        if self.batcher is not None:
            await self.batcher.stop()
        # No waiting for threads here: uvicorn only gets here once in-flight
        # requests are answered (or its graceful timeout is over).
        for pool in (self._decode_pool, self._encoder_thread):
            if pool is not None:
                pool.shutdown(wait=False, cancel_futures=True)

    # -- work, in threads ----------------------------------------------
    def _load(self) -> None:
        started = time.perf_counter()
        try:
            self.encoder.ensure_loaded()
            self.weights_fingerprint = self.encoder.weights_fingerprint()
        except Exception as exc:
            # The service stays up to say why (/ready and /vectors answer 503
            # with this message) instead of exiting where nobody reads a log.
            self.load_error = f"the encoder failed to load: {first_line(exc)}"
            logger.error("imgsearch: %s", self.load_error)
            if self.on_load_failure is not None:
                self.on_load_failure()
            return
        self.load_seconds = time.perf_counter() - started
        self.ready = True
        logger.info("imgsearch: encoder %s loaded in %.1f s; ready", self.encoder.name, self.load_seconds)

    def _embed(self, pixels: list[np.ndarray]) -> np.ndarray:
        if self.load_error is not None:
            raise Rejected(503, self.load_error)
        # Exactly the library's path: Index.add stacks resized pixels, calls
        # embed_pixels and normalises the rows.
        vectors = l2_normalize(self.encoder.embed_pixels(np.stack(pixels)))
        self.batches += 1
        self.vectors += len(pixels)
        return vectors

    async def _run_batch(self, pixels: list[np.ndarray]) -> np.ndarray:
        return await asyncio.get_running_loop().run_in_executor(self._encoder_thread, self._embed, pixels)

    # -- requests --------------------------------------------------------
    def meta(self) -> dict:
        """What a client needs to know that its vectors match an index's;
        no local paths (the weights are named by their fingerprint), and
        nothing that costs more than reading a few attributes."""
        encoder = self.encoder
        return {
            "encoder": encoder.name,
            "dim": encoder.dim,
            "preprocessing": encoder.preprocessing.to_dict(),
            "weights_fingerprint": self.weights_fingerprint,
            "random_weights": encoder.random_weights,
            "precision": encoder.precision,  # what runs (a bf16 fallback is fp32)
            "runtime": encoder.runtime_name,
            "ready": self.ready,
            "imgsearch_version": __version__,
            "max_batch": self.max_batch,
            "max_megapixels": self.max_megapixels,
            "max_body_bytes": self.max_body_bytes,
            "formats": list(self.formats),
            "max_decode_bytes": self.max_decode_bytes,
            # Since start, in this worker: how well requests share batches.
            "served": {"vectors": self.vectors, "batches": self.batches},
        }

    async def vectorize(self, request) -> JSONResponse:
        loop = asyncio.get_running_loop()
        body_read = False
        try:
            _check_content_type(request.headers.get("content-type"))
            if self.load_error is not None:
                raise Rejected(503, self.load_error)
            prep = self.encoder.preprocessing
            with self.batcher.incoming():
                body = await read_body(request, self.max_body_bytes, self.read_timeout_s)
                body_read = True
                ident, opened = await loop.run_in_executor(
                    self._decode_pool, _open_request, body, prep, self.max_megapixels, self.formats)
                del body  # up to max_body_bytes; not needed from here on
                async with self.budget.hold(opened.estimate):
                    pixels = await loop.run_in_executor(
                        self._decode_pool, decode_pixels, opened, prep, self.max_megapixels)
                    del opened
                future = self.batcher.submit(pixels)
            vector = await future
        except Rejected as exc:
            return refusal(exc, body_read, self.max_body_bytes)
        except Exception as exc:
            # Bad requests are all Rejected above; anything else is a fault
            # of the encoder (or ours): a logged 500, and the service goes on.
            logger.exception("imgsearch: embedding failed")
            return error_response(500, f"the encoder failed ({type(exc).__name__}: {first_line(exc)})")
        if not np.all(np.isfinite(vector)):
            return error_response(500, "the encoder produced a vector with NaN or infinite values")
        return JSONResponse({"id": ident, "vector": vector.tolist(), "dim": int(vector.shape[0])})


def create_app(encoder: Encoder, *, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
               max_megapixels: float = DEFAULT_MAX_MEGAPIXELS,
               batch_window_s: float = DEFAULT_BATCH_WINDOW_S, max_batch: int | None = None,
               decode_threads: int | None = None, formats=imgs.DEFAULT_FORMATS,
               max_decode_bytes: int = DEFAULT_MAX_DECODE_BYTES, decode_wait_s: float = DEFAULT_DECODE_WAIT_S,
               read_timeout_s: float = DEFAULT_READ_TIMEOUT_S):
    """The ASGI app serving ``encoder`` (loaded or not: it loads in the
    background once the server starts).

    ``max_body_bytes``: larger requests get 413.  ``max_megapixels``: larger
    images get 413, as ``index --max-megapixels`` skips them.  ``formats``:
    the Pillow formats read (others get 415).  ``batch_window_s``: how long
    a batch may wait for requests already being read or decoded (0: never).
    ``max_batch``: images per encoder call (default the encoder's own batch
    size).  ``decode_threads``: parallel decodes (default the CPU count, at
    most 8).  ``max_decode_bytes``: bytes of decoding in flight at once, all
    requests together; a request waits up to ``decode_wait_s`` for its share,
    then gets 503.  ``read_timeout_s``: time allowed for a request's body.
    """
    max_batch = encoder.batch_size if max_batch is None else max_batch
    decode_threads = decode_threads or min(8, os.cpu_count() or 2)
    formats = imgs.check_formats(formats)
    if not (isinstance(max_body_bytes, int) and max_body_bytes >= 1):
        raise UsageError("the body size limit must be a positive number of bytes")
    if not (isinstance(max_decode_bytes, int) and max_decode_bytes >= 1):
        raise UsageError("the decoding memory budget must be a positive number of bytes")
    for name, value in (("decode wait", decode_wait_s), ("read timeout", read_timeout_s)):
        if not (value > 0 and math.isfinite(value)):
            raise UsageError(f"the {name} must be a positive number of seconds")
    if not (max_megapixels > 0 and math.isfinite(max_megapixels)):
        raise UsageError("the megapixel limit must be a positive number")
    if not (batch_window_s >= 0 and math.isfinite(batch_window_s)):
        raise UsageError("the batch window must be zero or more seconds")
    if max_batch < 1 or decode_threads < 1:
        raise UsageError("the batch size and the decode threads must be at least 1")

    service = _Service(encoder, max_body_bytes=max_body_bytes, max_megapixels=max_megapixels,
                       batch_window_s=batch_window_s, max_batch=max_batch, decode_threads=decode_threads,
                       formats=formats, max_decode_bytes=max_decode_bytes, decode_wait_s=decode_wait_s,
                       read_timeout_s=read_timeout_s)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        service.start()
        try:
            yield
        finally:
            await service.stop()

    # No /docs or /openapi.json: the protocol is fixed, and the docs page
    # would fetch scripts from a CDN.
    app = _fastapi.FastAPI(title="imgsearch vectorizer", version=__version__, lifespan=lifespan,
                           docs_url=None, redoc_url=None, openapi_url=None)
    app.state.service = service

    install_error_handlers(app)

    @app.get("/.well-known/live")
    async def live():
        return Response(status_code=204)

    @app.get("/.well-known/ready")
    async def ready():
        if service.ready:
            return Response(status_code=204)
        return error_response(503, service.load_error or "the encoder is still loading")

    @app.get("/meta")
    async def meta():
        return JSONResponse(service.meta())

    # Both spellings: Weaviate posts to /vectors, its smoke test to /vectors/.
    # A redirect between them would make clients post the body twice.
    async def vectors(request: Request):
        return await service.vectorize(request)

    app.add_api_route("/vectors", vectors, methods=["POST"])
    app.add_api_route("/vectors/", vectors, methods=["POST"])
    return app


def _app_from_environment():
    """App factory of each worker process when ``workers > 1``: workers are
    fresh processes, so they rebuild the encoder from its name and weights."""
    from .encoders import load_registry

    from .runtime import RuntimeOptions

    spec = json.loads(os.environ[_SPEC_ENV])
    server_options(**spec["connections"])  # sets this worker's connection limits
    encoder = load_registry(spec["plugins_dir"]).create(spec["encoder"], spec["weights"])
    # The parent cached the exported (and calibrated) model before starting
    # workers, so the calibration id alone finds it.
    encoder.use_runtime(RuntimeOptions(**spec["runtime"]))
    return create_app(encoder, **spec["limits"])


def run(encoder: Encoder, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, workers: int = 1, *,
        max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, max_megapixels: float = DEFAULT_MAX_MEGAPIXELS,
        batch_window_s: float = DEFAULT_BATCH_WINDOW_S, max_batch: int | None = None,
        decode_threads: int | None = None, formats=imgs.DEFAULT_FORMATS,
        max_decode_bytes: int = DEFAULT_MAX_DECODE_BYTES, decode_wait_s: float = DEFAULT_DECODE_WAIT_S,
        read_timeout_s: float = DEFAULT_READ_TIMEOUT_S, plugins_dir=None,
        graceful_timeout_s: float | None = DEFAULT_GRACEFUL_TIMEOUT_S,
        max_connections: int = DEFAULT_MAX_CONNECTIONS, log_level: str = "info", access_log: bool = True) -> None:
    """Serve ``encoder`` with uvicorn until SIGINT or SIGTERM.

    On a signal the server stops accepting connections, answers the requests
    it has (for up to ``graceful_timeout_s``; None: as long as they take)
    and returns.  ``workers > 1`` runs that many processes, each with its own
    copy of the model, rebuilt from the encoder's name and weights (pass
    ``plugins_dir`` when the encoder comes from a plugin file).
    ``max_connections``: open connections (per worker) above which uvicorn
    answers 503.  ``read_timeout_s`` also bounds the wait for a request's
    headers; the other limits are :func:`create_app`'s.
    """
    if workers < 1:
        raise UsageError("workers must be at least 1")
    limits = {"max_body_bytes": max_body_bytes, "max_megapixels": max_megapixels,
              "batch_window_s": batch_window_s, "max_batch": max_batch, "decode_threads": decode_threads,
              "formats": list(formats), "max_decode_bytes": max_decode_bytes, "decode_wait_s": decode_wait_s,
              "read_timeout_s": read_timeout_s}
    connections = {"read_timeout_s": read_timeout_s, "max_connections": max_connections,
                   "graceful_timeout_s": graceful_timeout_s, "log_level": log_level, "access_log": access_log}
    options = server_options(**connections)

    with stop_signals_end_run() as stop:
        if workers == 1:
            app = create_app(encoder, **limits)  # checks the limits before binding
            # A service whose model cannot load is of no use: it exits with
            # the reason, and an orchestrator restarts it (a person reads why).
            serve_app(app, host, port, options, stop, lambda url: logger.info(
                "imgsearch: serving encoder %s (dim %d) on %s (IMAGE_INFERENCE_API=%s; Ctrl-C to stop)",
                encoder.name, encoder.dim, url, url),
                attach=lambda server: setattr(app.state.service, "on_load_failure",
                                              lambda: setattr(server, "should_exit", True)))
            if app.state.service.load_error is not None:
                raise ImgsearchError(app.state.service.load_error)
            return

        create_app(encoder, **limits)  # the same checks, once, before any worker starts
        # uvicorn binds for its workers itself and exits on failure; a trial
        # bind first turns "address in use" into our one-line error.
        bind(host, port).close()
        runtime = encoder.options()
        # Loaded here first: a model that cannot load stops the command with
        # its reason before any worker starts (uvicorn would restart failing
        # workers forever), and an export (and calibration) is made once, not
        # in every worker at once.
        encoder.ensure_loaded()
        runtime_name = "keras"
        if runtime.runtime != "keras":
            runtime_name = "keras" if encoder.runtime_name in ("keras", "native") else runtime.runtime
        if stop.signalled:  # uvicorn's supervisor would not know
            return
        os.environ[_SPEC_ENV] = json.dumps({
            "encoder": encoder.name, "weights": encoder.weights,
            # Workers run what the export here settled on: a failed export
            # is not retried by every worker at once.
            "runtime": {"runtime": runtime_name, "precision": runtime.precision,
                        "calibration_id": runtime.calibration_id},
            "plugins_dir": str(plugins_dir) if plugins_dir else None, "limits": limits,
            "connections": connections,
        })
        _uvicorn.run(f"{__name__}:_app_from_environment", factory=True, host=host, port=port,
                     workers=workers, **options)


