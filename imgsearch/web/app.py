"""The search page and its JSON API over one index (``imgsearch serve``).

Endpoints (also described by ``/openapi.json``)::

    GET  /                              the page (its script and style under /static/)
    GET  /api/info                      what `imgsearch info --format json` prints, and the server's limits
    GET  /api/images?label=&after=&limit=   a page of indexed images, in id order
    GET  /api/images/{id}               one indexed image
    GET  /api/images/{id}/thumbnail     a JPEG of at most 256x256
    GET  /api/images/{id}/similar?k=    its nearest indexed images (query by indexed id)
    GET  /api/images/{id}/classify?k=   its label by a vote of its neighbours
    POST /api/query?k=                  body: an image file; like `imgsearch query --format json`
    POST /api/classify?k=               body: an image file; like `imgsearch classify --format json`

Results have the shapes of the CLI's JSON output, each row with the
image's ``id`` and ``thumbnail`` URL added, and classifications their
``votes`` (each label's share of the vote).

Files are only ever read by indexed id, through the index's own rows (see
:mod:`imgsearch.web.thumbnails`), and the page's own files are read once at
start-up from the package: no part of a request is used as a path.
Uploads are bounded in bytes, in megapixels and in decoding memory, as in
the vectorizer service (:mod:`imgsearch.serving`).  Every search sees the
index's latest commit, so ``imgsearch index`` may add to it meanwhile.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Annotated, Literal

import numpy as np

from .. import __version__
from .. import images as imgs
from ..errors import BadIndexError, ImgsearchError, IndexMismatchError, UsageError, first_line
from ..hashing import sha256_bytes
from ..index import Index

MISSING_STACK_MESSAGE = "imgsearch serve needs FastAPI and uvicorn: pip install 'imgsearch[serve]'"


def _import_stack():
    """FastAPI, or the one-line error that says how to get it and uvicorn."""
    try:
        import fastapi
        import uvicorn  # noqa: F401  (run() needs it; checked here to fail early)
    except ImportError:
        raise ImgsearchError(MISSING_STACK_MESSAGE) from None
    return fastapi


_fastapi = _import_stack()

from fastapi import Path as PathParam, Query, Request  # noqa: E402  (only after the check above)
from fastapi.responses import Response  # noqa: E402

from ..knn import DEFAULT_TEMPERATURE, VOTES  # noqa: E402
from ..results import classification_json, query_json  # noqa: E402
from ..serving import (  # noqa: E402
    DEFAULT_DECODE_WAIT_S, DEFAULT_GRACEFUL_TIMEOUT_S, DEFAULT_HOST, DEFAULT_MAX_CONNECTIONS,
    DEFAULT_MAX_DECODE_BYTES, DEFAULT_MAX_MEGAPIXELS, DEFAULT_READ_TIMEOUT_S, DecodeBudget, Rejected,
    decode_error, decode_pixels, error_response, install_error_handlers, logger, read_body, refusal, serve_app,
    server_options, stop_signals_end_run,
)
from .thumbnails import (  # noqa: E402
    DEFAULT_CACHE_BYTES, THUMBNAIL_SIDE, NotIndexedContent, ThumbnailCache, read_indexed, render,
)

DEFAULT_PORT = 8000
# A camera JPEG is a few MiB; 20 MiB leaves room while bounding what one
# upload can make us hold.
DEFAULT_MAX_UPLOAD_BYTES = 20 * 1024 * 1024
MAX_K = 500
MAX_PAGE = 500
# SQLite's integers; larger ids could not be looked up, so they are refused
# as invalid rather than failing inside the query.
_MAX_ID = 2**63 - 1
# Vectors of the latest uploads by content hash: the page asks for the
# neighbours and then the label of one image, which is embedded once.
_RECENT_UPLOADS = 16

_STATIC = Path(__file__).with_name("static")
# Every file the page is made of, by URL.
_ASSETS = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/static/app.js": ("app.js", "text/javascript; charset=utf-8"),
    "/static/style.css": ("style.css", "text/css; charset=utf-8"),
}
# The browser itself refuses anything the page might load from elsewhere.
_PAGE_POLICY = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob:; "
                "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
_LOOPBACK_NAMES = {"127.0.0.1", "localhost", "::1", "[::1]"}


class _Search:
    """The state behind one app: the index, the one thread that uses it,
    the decode pool, the decoding budget and the thumbnails made so far."""

    def __init__(self, index: Index, *, max_upload_bytes: int, max_megapixels: float, formats,
                 max_decode_bytes: int, decode_wait_s: float, read_timeout_s: float, cache_bytes: int,
                 decode_threads: int):
        self.index = index
        self.max_upload_bytes = max_upload_bytes
        self.max_megapixels = max_megapixels
        self.formats = formats
        self.max_decode_bytes = max_decode_bytes
        self.decode_wait_s = decode_wait_s
        self.read_timeout_s = read_timeout_s
        self.decode_threads = decode_threads
        self.thumbnails = ThumbnailCache(cache_bytes)
        self.ready = False
        self.load_error: str | None = None
        self._recent: collections.OrderedDict[str, np.ndarray] = collections.OrderedDict()
        self._index_thread: ThreadPoolExecutor | None = None
        self._decode_pool: ThreadPoolExecutor | None = None
        self.budget: DecodeBudget | None = None

    # -- lifecycle, on the event loop ----------------------------------
    def start(self) -> None:
        # One thread owns the index: its SQLite connection and the encoder
        # are used by one thread at a time, in order.
        self._index_thread = ThreadPoolExecutor(1, thread_name_prefix="imgsearch-index")
        self._decode_pool = ThreadPoolExecutor(self.decode_threads, thread_name_prefix="imgsearch-decode")
        self.budget = DecodeBudget(self.max_decode_bytes, self.decode_wait_s)
        # In a thread of its own, not awaited: browsing and thumbnails work
        # while the model loads (which reads no rows), and uploads wait for
        # `ready` before they use it.
        threading.Thread(target=self._load, name="imgsearch-load", daemon=True).start()

    async def stop(self) -> None:
        for pool in (self._decode_pool, self._index_thread):
            if pool is not None:
                pool.shutdown(wait=False, cancel_futures=True)

    def _load(self) -> None:
        try:
            self.index.encoder  # noqa: B018  (loads it and checks it against the index)
        except Exception as exc:
            # The page stays up to say why; only uploads need the encoder.
            self.load_error = f"the encoder failed to load: {first_line(exc)}"
            logger.error("imgsearch: %s", self.load_error)
            return
        self.ready = True

    # -- the index, on its thread ----------------------------------------
    async def in_index(self, work, *args):
        """``work(*args)`` on the index's thread, its errors as HTTP answers."""
        try:
            return await asyncio.get_running_loop().run_in_executor(self._index_thread, work, *args)
        except BadIndexError as exc:
            raise Rejected(503, str(exc)) from None
        except IndexMismatchError as exc:
            raise Rejected(409, str(exc)) from None
        except UsageError as exc:
            raise Rejected(422, str(exc)) from None

    def _entry(self, image_id: int):
        entry = self.index.store.entries_by_id([image_id]).get(image_id)
        if entry is None:
            raise Rejected(404, f"no image with id {image_id} in this index")
        return entry

    def _indexed(self, image_id: int):
        self._entry(image_id)  # a 404 rather than the library's usage error
        vectors, entries = self.index.indexed([image_id])
        return vectors, entries[0]

    async def indexed(self, image_id: int):
        return await self.in_index(self._indexed, image_id)

    def info(self) -> dict:
        with self.index.store.reading():  # the latest commit's facts
            facts = self.index.info()
        return {**facts, "server": {
            "ready": self.ready, "load_error": self.load_error, "imgsearch_version": __version__,
            "max_upload_bytes": self.max_upload_bytes, "max_megapixels": self.max_megapixels,
            "formats": list(self.formats), "max_k": MAX_K, "thumbnail_side": THUMBNAIL_SIDE,
        }}

    def page(self, label: str | None, after: int, limit: int) -> dict:
        store = self.index.store
        entries = store.entries_page(label=label, after=after, limit=limit)
        with store.reading():  # the count of the latest commit
            total = store.labels().get(label, 0) if label is not None else store.count
        return {"label": label, "total": total, "images": [_image_row(e) for e in entries],
                "next": entries[-1].id if len(entries) == limit else None}

    def image(self, image_id: int) -> dict:
        entry = self._entry(image_id)
        return {**_image_row(entry), "also_at": self.index.store.alias_paths_of(image_id)}

    # -- uploads ----------------------------------------------------------
    async def upload_vector(self, request: Request) -> tuple[np.ndarray, str]:
        """The normalised vector of an uploaded image file, and its hash."""
        if self.load_error is not None:
            raise Rejected(503, self.load_error)
        if not self.ready:
            raise Rejected(503, "the encoder is still loading; try again shortly", {"Retry-After": "1"})
        body = await read_body(request, self.max_upload_bytes, self.read_timeout_s)
        request.state.body_read = True
        if not body:
            raise Rejected(400, "empty request body; send the image file's bytes")
        sha = sha256_bytes(body)
        if sha in self._recent:
            self._recent.move_to_end(sha)
            return self._recent[sha], sha
        loop = asyncio.get_running_loop()
        prep = self.index.encoder.preprocessing
        opened = await loop.run_in_executor(self._decode_pool, self._open_upload, body, prep)
        del body
        async with self.budget.hold(opened.estimate):
            pixels = await loop.run_in_executor(self._decode_pool, decode_pixels, opened, prep,
                                                self.max_megapixels)
            del opened
        vector = (await self.in_index(self.index.embed_pixels, pixels[None]))[0]
        if not np.all(np.isfinite(vector)):
            raise Rejected(500, "the encoder produced a vector with NaN or infinite values")
        self._recent[sha] = vector
        while len(self._recent) > _RECENT_UPLOADS:
            self._recent.popitem(last=False)
        return vector, sha

    def _open_upload(self, body: bytes, prep) -> imgs.Opened:
        try:
            return imgs.open_image(body, draft_size=prep.draft_size, max_megapixels=self.max_megapixels,
                                   formats=self.formats)
        except imgs.DecodeError as exc:
            raise decode_error(exc) from None

    # -- thumbnails -------------------------------------------------------
    async def thumbnail(self, image_id: int) -> tuple[bytes, str]:
        entry = await self.in_index(self._entry, image_id)
        key = (entry.id, entry.sha256)
        data = self.thumbnails.get(key)
        if data is None:
            loop = asyncio.get_running_loop()
            opened = await loop.run_in_executor(self._decode_pool, self._open_indexed, entry)
            async with self.budget.hold(opened.estimate):
                data = await loop.run_in_executor(self._decode_pool, self._render, opened)
            self.thumbnails.put(key, data)
        return data, entry.sha256

    def _open_indexed(self, entry) -> imgs.Opened:
        try:
            data = read_indexed(entry)
            # The index's own limit: these are the user's files, indexed before.
            return imgs.open_image(data, draft_size=(THUMBNAIL_SIDE, THUMBNAIL_SIDE),
                                   max_megapixels=imgs.DEFAULT_MAX_MEGAPIXELS, formats=self.formats)
        except NotIndexedContent as exc:
            raise Rejected(404, str(exc)) from None
        except imgs.DecodeError as exc:
            raise Rejected(422, f"image {entry.id} cannot be shown: {exc}") from None

    @staticmethod
    def _render(opened: imgs.Opened) -> bytes:
        try:
            return render(opened)
        except imgs.DecodeError as exc:
            raise Rejected(422, f"the image cannot be shown: {exc}") from None


ImageId = Annotated[int, PathParam(ge=0, le=_MAX_ID, description="An id from a result or a listing.")]
K = Annotated[int, Query(ge=1, le=MAX_K, description="How many neighbours.")]
Vote = Literal[VOTES]
Temperature = Annotated[float, Query(gt=0, le=1e6)]
Method = Literal["knn", "linear"]
Name = Annotated[str, Query(max_length=1000, description="Echoed back as the query's name.")]


def thumbnail_url(entry) -> str:
    # The content hash in the URL: a changed image gets a new URL, so the
    # browser may keep what it has under the old one.
    return f"/api/images/{entry.id}/thumbnail?v={entry.sha256[:16]}"


def _image_row(entry) -> dict:
    return {"id": entry.id, "path": entry.path, "label": entry.label, "width": entry.width,
            "height": entry.height, "thumbnail": thumbnail_url(entry)}


def _hit_extra(hit) -> dict:
    return {"id": hit.entry.id, "thumbnail": thumbnail_url(hit.entry)}


def _classification(result) -> dict:
    return {**classification_json(result, _hit_extra),
            "votes": {label: round(share, 6) for label, share in result.votes.items()}}


def _read_assets() -> dict[str, tuple[bytes, str]]:
    assets = {}
    for url, (name, media) in _ASSETS.items():
        try:
            assets[url] = ((_STATIC / name).read_bytes(), media)
        except OSError as exc:
            raise ImgsearchError(f"the page's file {name} is missing from the installation ({exc.strerror})") from None
    return assets


def create_app(index: Index, *, max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES,
               max_megapixels: float = DEFAULT_MAX_MEGAPIXELS, formats=imgs.DEFAULT_FORMATS,
               max_decode_bytes: int = DEFAULT_MAX_DECODE_BYTES, decode_wait_s: float = DEFAULT_DECODE_WAIT_S,
               read_timeout_s: float = DEFAULT_READ_TIMEOUT_S, cache_bytes: int = DEFAULT_CACHE_BYTES,
               decode_threads: int | None = None, allowed_hosts=None):
    """The ASGI app of the page and API over ``index`` (open for reading).

    ``max_upload_bytes``, ``max_megapixels`` and ``formats`` bound an
    uploaded image (413, 413, 415); ``max_decode_bytes`` is the memory for
    decoding uploads and thumbnails at once, which a request waits for up
    to ``decode_wait_s`` (then 503); ``read_timeout_s`` bounds the arrival
    of a body; ``cache_bytes`` the thumbnails kept in memory.
    ``allowed_hosts``: the Host header names answered (None: any); requests
    for other names get 421.  The app's state is at ``app.state.search``.
    """
    formats = imgs.check_formats(formats)
    decode_threads = decode_threads or min(4, os.cpu_count() or 2)
    for name, value in (("upload size limit", max_upload_bytes), ("decoding memory budget", max_decode_bytes),
                        ("thumbnail cache", cache_bytes), ("decode threads", decode_threads)):
        if not (isinstance(value, int) and value >= 1):
            raise UsageError(f"the {name} must be a positive whole number")
    for name, value in (("megapixel limit", max_megapixels), ("decode wait", decode_wait_s),
                        ("read timeout", read_timeout_s)):
        if not (value > 0 and math.isfinite(value)):
            raise UsageError(f"the {name} must be a positive number")
    search = _Search(index, max_upload_bytes=max_upload_bytes, max_megapixels=max_megapixels,
                     formats=formats, max_decode_bytes=max_decode_bytes, decode_wait_s=decode_wait_s,
                     read_timeout_s=read_timeout_s, cache_bytes=cache_bytes, decode_threads=decode_threads)
    assets = _read_assets()

    @contextlib.asynccontextmanager
    async def lifespan(app):
        search.start()
        try:
            yield
        finally:
            await search.stop()

    # No /docs: FastAPI's docs page fetches its scripts from a CDN.
    app = _fastapi.FastAPI(title="imgsearch", version=__version__, lifespan=lifespan, docs_url=None,
                           redoc_url=None, description="Search an image index: the API of `imgsearch serve`.")
    app.state.search = search
    install_error_handlers(app)

    @app.exception_handler(Rejected)
    async def rejected(request, exc):
        return refusal(exc, getattr(request.state, "body_read", True), max_upload_bytes)

    def asset(url):
        data, media = assets[url]

        async def serve_asset():
            return Response(data, media_type=media,
                            headers={"Content-Security-Policy": _PAGE_POLICY, "Cache-Control": "no-cache"})

        return serve_asset

    for url in assets:
        app.add_api_route(url, asset(url), methods=["GET"], include_in_schema=False)

    @app.get("/api/info")
    async def info():
        """The index (as `imgsearch info --format json`) and this server's limits."""
        return await search.in_index(search.info)

    @app.get("/api/images")
    async def images(label: Annotated[str | None, Query(max_length=1000)] = None,
                     after: Annotated[int, Query(ge=-1, le=_MAX_ID)] = -1,
                     limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 60):
        """Indexed images in id order, only those with ``label`` if given;
        ``next`` is the ``after`` of the next page (null on the last)."""
        return await search.in_index(search.page, label, after, limit)

    @app.get("/api/images/{image_id}")
    async def image(image_id: ImageId):
        """One indexed image: path, label, size, and the other paths of its content."""
        return await search.in_index(search.image, image_id)

    @app.get("/api/images/{image_id}/thumbnail", response_class=Response,
             responses={200: {"content": {"image/jpeg": {}}}})
    async def thumbnail(image_id: ImageId, v: Annotated[str | None, Query(max_length=64)] = None):
        """A JPEG of the indexed image, at most 256 pixels a side."""
        data, sha = await search.thumbnail(image_id)
        # Kept by the browser for good under a URL that names its content.
        cache = "private, max-age=31536000, immutable" if v == sha[:16] else "private, no-cache"
        return Response(data, media_type="image/jpeg", headers={"Cache-Control": cache})

    @app.get("/api/images/{image_id}/similar")
    async def similar(image_id: ImageId, k: K = 10, include_self: bool = False):
        """The indexed images nearest to an indexed one (itself left out unless ``include_self``)."""
        vectors, entry = await search.indexed(image_id)
        result = (await search.in_index(lambda: search.index.query_vectors(
            vectors, [entry.path], [entry.sha256], k=k, include_self=include_self)))[0]
        return {"id": image_id, **query_json(result, _hit_extra)}

    @app.get("/api/images/{image_id}/classify")
    async def classify_indexed(image_id: ImageId, k: K = 20, vote: Vote = "weighted",
                               temperature: Temperature = DEFAULT_TEMPERATURE, method: Method = "knn",
                               include_self: bool = False):
        """An indexed image's label by a vote of its neighbours (it does not vote for itself unless ``include_self``)."""
        vectors, entry = await search.indexed(image_id)
        result = (await search.in_index(lambda: search.index.classify_vectors(
            vectors, [entry.path], [entry.sha256], k=k, vote=vote, temperature=temperature,
            include_self=include_self, method=method)))[0]
        return {"id": image_id, **_classification(result)}

    @app.post("/api/query", openapi_extra=_IMAGE_BODY)
    async def query(request: Request, k: K = 10, include_self: bool = False, name: Name = "upload"):
        """The indexed images nearest to the uploaded image file (the request body)."""
        request.state.body_read = False
        vector, sha = await search.upload_vector(request)
        result = (await search.in_index(lambda: search.index.query_vectors(
            vector[None], [name], [sha], k=k, include_self=include_self)))[0]
        return query_json(result, _hit_extra)

    @app.post("/api/classify", openapi_extra=_IMAGE_BODY)
    async def classify(request: Request, k: K = 20, vote: Vote = "weighted",
                       temperature: Temperature = DEFAULT_TEMPERATURE, method: Method = "knn",
                       include_self: bool = False, name: Name = "upload"):
        """The label of the uploaded image file (the request body) by a vote of its neighbours."""
        request.state.body_read = False
        vector, sha = await search.upload_vector(request)
        result = (await search.in_index(lambda: search.index.classify_vectors(
            vector[None], [name], [sha], k=k, vote=vote, temperature=temperature,
            include_self=include_self, method=method)))[0]
        return _classification(result)

    return _Guarded(app, None if allowed_hosts is None else {name.lower() for name in allowed_hosts})


class _Guarded:
    """The app behind two checks on every response: requests whose Host
    header names another site are refused (a page elsewhere could point
    its own name at 127.0.0.1, DNS rebinding, and read the API through the
    user's browser), and no response may be sniffed as another type."""

    def __init__(self, app, allowed_hosts: set[str] | None):
        self.app = app
        self.state = app.state
        self.allowed_hosts = allowed_hosts

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if self.allowed_hosts is not None:
            host = dict(scope["headers"]).get(b"host", b"").decode("latin-1").lower()
            name = host if host.endswith("]") else host.rsplit(":", 1)[0]
            if name not in self.allowed_hosts:
                refused = error_response(421, f"this server answers for {', '.join(sorted(self.allowed_hosts))} "
                                              f"only, not {host!r}")
                return await refused(scope, receive, send)

        async def send_unsniffed(message):
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), (b"x-content-type-options", b"nosniff")]
            await send(message)

        return await self.app(scope, receive, send_unsniffed)


# The body of an upload, for the OpenAPI description.
_IMAGE_BODY = {"requestBody": {"required": True, "description": "The image file's bytes, as they are on disk.",
                               "content": {"application/octet-stream": {"schema": {"type": "string",
                                                                                   "format": "binary"}}}}}


def allowed_hosts_for(host: str) -> set[str] | None:
    """The Host names a server bound to ``host`` answers: loopback names
    for a loopback address, any for others (the user chose to publish it)."""
    return set(_LOOPBACK_NAMES) if host in _LOOPBACK_NAMES else None


def run(index: Index, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, *,
        read_timeout_s: float = DEFAULT_READ_TIMEOUT_S, max_connections: int = DEFAULT_MAX_CONNECTIONS,
        graceful_timeout_s: float | None = DEFAULT_GRACEFUL_TIMEOUT_S, log_level: str = "info",
        access_log: bool = True, **limits) -> None:
    """Serve the page and API over ``index`` until SIGINT or SIGTERM (then
    requests in flight finish first).  ``limits`` are :func:`create_app`'s."""
    app = create_app(index, read_timeout_s=read_timeout_s, allowed_hosts=allowed_hosts_for(host), **limits)
    options = server_options(read_timeout_s=read_timeout_s, max_connections=max_connections,
                             graceful_timeout_s=graceful_timeout_s, log_level=log_level, access_log=access_log)
    with stop_signals_end_run() as stop:
        serve_app(app, host, port, options, stop, lambda url: logger.info(
            "imgsearch: serving index %s (%d images) on %s (Ctrl-C to stop)",
            index.store.directory, index.store.count, url))
