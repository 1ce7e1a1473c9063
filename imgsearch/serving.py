"""What imgsearch's HTTP services share: bounded request bodies, image
decoding within a memory budget, connection limits, JSON errors, binding,
and a shutdown on SIGINT or SIGTERM that lets requests in flight finish.

Used by the vectorizer (:mod:`imgsearch.serve`) and the search page
(:mod:`imgsearch.web`), so that both refuse the same things the same way.
FastAPI and uvicorn are an optional extra: callers check that they are
installed (with a message naming their command) before importing this.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import copy
import logging
import signal
import socket
import threading

import numpy as np
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from uvicorn.protocols.http.h11_impl import H11Protocol

import h11  # uvicorn's own HTTP parser, always installed with it

from . import images as imgs
from .errors import ImgsearchError, UsageError, first_line

DEFAULT_HOST = "127.0.0.1"
DEFAULT_GRACEFUL_TIMEOUT_S = 30.0
# A network service needs a tighter guard than `index` on one's own files:
# 40 megapixels is above any phone or most cameras' photos.
DEFAULT_MAX_MEGAPIXELS = 40.0
# Decoding in flight, all requests together: two of the largest images
# allowed (40 MP with alpha, 160 MB decoded) or hundreds of ordinary photos.
DEFAULT_MAX_DECODE_BYTES = 512 * 1024 * 1024
# How long a request may wait for its share of that before it gets 503.
DEFAULT_DECODE_WAIT_S = 10.0
# Connections at once (idle keep-alive ones count); more get 503.
DEFAULT_MAX_CONNECTIONS = 64
# For a request's headers and then its body; slower clients are cut off
# rather than holding a connection (and a slot under the limit) forever.
DEFAULT_READ_TIMEOUT_S = 30.0

# uvicorn configures this logger, so our lines appear in its output, formatted alike.
logger = logging.getLogger("uvicorn.error")


class Rejected(Exception):
    """A request we answer with ``status`` and ``{"error": message}``."""

    def __init__(self, status: int, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers


def error_response(status: int, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


# How much of a refused body is read and dropped after the answer, at most.
_DRAIN_SECONDS = 10.0
DRAIN_MIN_BYTES = 64 * 1024 * 1024


class AnswerThenDrain(JSONResponse):
    """An error sent before the request body was read, followed by reading
    and dropping the rest of the body before the response ends.

    A client that sends its whole body before it reads the answer, and asks
    for the connection to close (Python's urllib does both), would otherwise
    see "connection reset" instead of the error: uvicorn closes the socket
    right after the response, and closing with unread data makes the kernel
    send a reset that also discards the answer waiting in the client's
    buffer.  Keep-alive clients (Weaviate's among them) are drained by
    uvicorn itself.  The reading is bounded in bytes and in time, so a
    client cannot hold the request open by sending without end.
    """

    def __init__(self, status: int, message: str, drain_bytes: int, headers: dict | None = None):
        super().__init__({"error": message}, status_code=status, headers=headers)
        self.drain_bytes = drain_bytes

    async def __call__(self, scope, receive, send):
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        # The whole answer goes out now (its Content-Length tells the client it
        # is complete); the response only ends once the body is drained.
        await send({"type": "http.response.body", "body": self.body, "more_body": True})
        loop = asyncio.get_running_loop()
        deadline = loop.time() + _DRAIN_SECONDS
        drained = 0
        while drained <= self.drain_bytes:
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            try:
                message = await asyncio.wait_for(receive(), remaining)
            except asyncio.TimeoutError:
                break
            if message["type"] != "http.request":  # the client went away
                break
            drained += len(message.get("body", b""))
            if not message.get("more_body", False):
                break
        await send({"type": "http.response.body", "body": b"", "more_body": False})


def refusal(exc: Rejected, body_read: bool, max_body_bytes: int):
    """The answer to a refused request: with the rest of its body drained
    when it was refused before the body was read (see :class:`AnswerThenDrain`)."""
    # A body that timed out is not drained: its client is too slow to wait for.
    if body_read or exc.status == 408:
        return error_response(exc.status, exc.message, exc.headers)
    return AnswerThenDrain(exc.status, exc.message, max(4 * max_body_bytes, DRAIN_MIN_BYTES), exc.headers)


async def read_body(request, limit: int, timeout_s: float) -> bytes:
    """The request body, refused with 413 as soon as it is known to exceed
    ``limit``: from Content-Length before reading anything, and while
    reading for bodies that declare no length (chunked) or lie about it.
    A body not complete within ``timeout_s`` gets 408."""
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            length = int(declared)
        except ValueError:
            raise Rejected(400, "invalid Content-Length header") from None
        if length > limit:
            raise Rejected(413, f"request body too large ({length} bytes; the limit is {limit})")
    chunks = []
    size = 0
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    stream = request.stream()
    try:
        while True:
            try:
                chunk = await asyncio.wait_for(stream.__anext__(), max(0.0, deadline - loop.time()))
            except StopAsyncIteration:
                break
            except asyncio.TimeoutError:
                raise Rejected(408, f"the request body did not arrive within {timeout_s:g} s",
                                {"Connection": "close"}) from None
            size += len(chunk)
            if size > limit:
                raise Rejected(413, f"request body too large (over the limit of {limit} bytes)")
            chunks.append(chunk)
    except ClientDisconnect:
        # Nobody will read the answer; it only has to be something other
        # than the 500 an unexpected exception would log.
        raise Rejected(400, "the client disconnected while sending the body") from None
    return b"".join(chunks)


def decode_error(exc: imgs.DecodeError) -> Rejected:
    # 413 like a body over the limit: the upload is too big, not malformed.
    status = {"too large": 413, "format": 415}.get(exc.kind, 422)
    return Rejected(status, str(exc))


def decode_pixels(opened: imgs.Opened, preprocessing, max_megapixels: float) -> np.ndarray:
    """An opened image to resized pixels; runs in the decode pool."""
    try:
        return imgs.pixels_of(opened, preprocessing, max_megapixels=max_megapixels)[0]
    except imgs.DecodeError as exc:
        raise decode_error(exc) from None
    except MemoryError:
        raise Rejected(413, "not enough memory to decode this image") from None
    except Exception as exc:  # Pillow's plugins raise more kinds than they document
        raise Rejected(422, f"cannot process image ({type(exc).__name__}: {first_line(exc)})") from None


class DecodeBudget:
    """Bytes of decoding in flight, all requests together.

    A request holds its image's estimate while it decodes.  One that does
    not fit waits its turn, in order of arrival (so a large image is not
    overtaken for ever by small ones), for at most ``wait_s``, then gets
    503 with Retry-After.  An image larger than the whole budget decodes
    when nothing else does.
    """

    def __init__(self, limit: int, wait_s: float):
        self.limit = limit
        self.wait_s = wait_s
        self.used = 0
        self.peak = 0  # the most held at once, for /meta and tests
        self._turns: collections.deque = collections.deque()
        self._changed = asyncio.Condition()

    @contextlib.asynccontextmanager
    async def hold(self, estimate: int):
        amount = min(estimate, self.limit)
        turn = object()
        async with self._changed:
            self._turns.append(turn)
            try:
                await asyncio.wait_for(self._changed.wait_for(
                    lambda: self._turns[0] is turn and self.used + amount <= self.limit), self.wait_s)
            except asyncio.TimeoutError:
                raise Rejected(503, f"busy decoding other images (over {self.limit} bytes in flight); "
                                     "try again shortly", {"Retry-After": "1"}) from None
            finally:
                self._turns.remove(turn)
                self._changed.notify_all()
            self.used += amount
            self.peak = max(self.peak, self.used)
        try:
            yield
        finally:
            async with self._changed:
                self.used -= amount
                self._changed.notify_all()


# Set by run() (and in each worker process) before the server starts: uvicorn
# builds protocols from a class it may pickle into workers, so these cannot
# travel as arguments.
connection_limits = {"read_timeout_s": DEFAULT_READ_TIMEOUT_S, "max_connections": DEFAULT_MAX_CONNECTIONS}


class LimitedProtocol(H11Protocol):
    """uvicorn's h11 protocol with the service's connection limits.

    A connection whose request headers do not arrive within the read
    timeout is closed: uvicorn times out only idle keep-alive connections,
    and stops even that on the first byte, so a client sending headers a
    byte a minute would hold its connection for ever.  Requests on more
    than ``max_connections`` open connections get 503, as uvicorn's own
    ``limit_concurrency`` would answer, but in JSON like every error here
    (Weaviate parses the body before it looks at the status).
    """

    _header_timer = None

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.app = self._within_limit(self.app)

    def _within_limit(self, app):
        async def limited(scope, receive, send):
            if len(self.connections) > connection_limits["max_connections"]:
                refusal = AnswerThenDrain(503, "too many connections; try again shortly", DRAIN_MIN_BYTES,
                                           {"Retry-After": "1"})
                return await refusal(scope, receive, send)
            return await app(scope, receive, send)

        return limited

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._await_headers()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE:  # the headers are in
            self._stop_waiting()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._await_headers()

    def connection_lost(self, exc) -> None:
        self._stop_waiting()
        super().connection_lost(exc)

    def _await_headers(self) -> None:
        self._stop_waiting()
        self._header_timer = self.loop.call_later(connection_limits["read_timeout_s"], self._headers_too_slow)

    def _stop_waiting(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_too_slow(self) -> None:
        self._header_timer = None
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self.transport.close()


def bind(host: str, port: int) -> socket.socket:
    """A listening-ready socket, or a one-line error (uvicorn would exit)."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
        sock = socket.socket(family, kind, proto)
    except OSError as exc:
        raise UsageError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    try:
        # As uvicorn does: a restart must not wait for old connections' TIME_WAIT.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.set_inheritable(True)
    except OSError as exc:
        sock.close()
        raise ImgsearchError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    return sock


class StopOnSignal:
    """SIGINT and SIGTERM make :func:`run` return instead of killing the process.

    After its graceful shutdown uvicorn raises the signal that stopped it
    once more, for the handler it replaced; by default that kills the
    process (or raises KeyboardInterrupt), so a caller such as the CLI could
    never finish normally.  This handler takes that signal instead.  One
    that arrives before the server exists stops it as soon as it is attached.
    """

    def __init__(self):
        self.signalled = False
        self.server = None

    def __call__(self, signum, frame):
        self.signalled = True
        if self.server is not None:
            self.server.should_exit = True

    def attach(self, server) -> None:
        self.server = server
        if self.signalled:
            server.should_exit = True


@contextlib.contextmanager
def stop_signals_end_run():
    handler = StopOnSignal()
    if threading.current_thread() is not threading.main_thread():
        yield handler  # signals only ever reach the main thread
        return
    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield handler
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def install_error_handlers(app) -> None:
    """Every error of ``app`` as JSON ``{"error": ...}``: FastAPI's own 404
    and 405 as well as unexpected exceptions (logged, answered 500)."""

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, exc):
        return JSONResponse({"error": str(exc.detail)}, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid_parameter(request, exc):
        # FastAPI's list of problems, cut to the first, in one line.
        problem = (exc.errors() or [{}])[0]
        where = ".".join(str(part) for part in problem.get("loc", ())[1:]) or "request"
        return error_response(422, f"{where}: {problem.get('msg', 'invalid value')}")

    @app.exception_handler(Exception)
    async def unexpected_error(request, exc):
        logger.error("imgsearch: unexpected error", exc_info=exc)
        return error_response(500, f"internal error ({type(exc).__name__}: {first_line(exc)})")


def server_options(*, read_timeout_s: float, max_connections: int, graceful_timeout_s: float | None,
                   log_level: str, access_log: bool) -> dict:
    """uvicorn's settings for a service with our connection limits (which
    are set here, for :class:`LimitedProtocol`, in this process)."""
    if max_connections < 1:
        raise UsageError("the connection limit must be at least 1")
    connection_limits.update({"read_timeout_s": read_timeout_s, "max_connections": max_connections})
    # uvicorn's own logging, with the access log moved from stdout to stderr
    # beside every other line: stdout is for results.
    import uvicorn

    log_config = copy.deepcopy(uvicorn.config.LOGGING_CONFIG)
    log_config["handlers"]["access"]["stream"] = "ext://sys.stderr"
    # The connection limit is LimitedProtocol's, not uvicorn's limit_concurrency.
    return {"log_level": log_level, "access_log": access_log, "lifespan": "on", "http": LimitedProtocol,
            "timeout_graceful_shutdown": graceful_timeout_s, "log_config": log_config}


def serve_app(app, host: str, port: int, options: dict, stop: StopOnSignal, announce, *, attach=None) -> None:
    """Run ``app`` in this process on ``host:port`` until ``stop`` is
    signalled; ``announce(url)`` logs where it listens once bound, and
    ``attach(server)`` lets the caller stop the server itself."""
    import uvicorn

    sock = bind(host, port)
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, **options))
    stop.attach(server)
    if attach is not None:
        attach(server)
    shown_host = f"[{host}]" if ":" in host else host
    # Logged by us: uvicorn is silent about sockets it did not open.
    announce(f"http://{shown_host}:{sock.getsockname()[1]}")
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
