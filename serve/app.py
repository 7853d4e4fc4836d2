"""The HTTP API and the status page (Starlette); see the route table in the README.

Security: the server listens on localhost unless told otherwise. With a token,
every request needs ``Authorization: Bearer TOKEN`` (the page gets it once as
``/?token=TOKEN`` and keeps it in a cookie, since a browser's EventSource and
<img> cannot send headers). Without one, only requests addressed to localhost
are answered (no DNS rebinding) and a web page of another origin cannot post
or delete. Files are served only from inside ROOT.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import secrets
import threading
from collections import OrderedDict
from collections.abc import AsyncIterator
from importlib import resources
from typing import Any
from urllib.parse import urlsplit

from PIL import Image
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.middleware import Middleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import Request
from starlette.responses import (
    FileResponse,
    JSONResponse,
    RedirectResponse,
    Response,
    StreamingResponse,
)
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from psd_collage.errors import CollageError

from .backend import Backend
from .book import ApiError, JobBook

COOKIE = "psd_collage_token"
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1", "[::1]")
#: Default cap on an upload when the operator set none (bytes).
DEFAULT_MAX_UPLOAD = 2 * 1024**3
#: The page's icon (browsers ask for /favicon.ico whatever the page says): three layers.
FAVICON = (
    b'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 16 16">'
    b'<rect x="1" y="1" width="9" height="9" fill="#3b7dd8"/>'
    b'<rect x="4" y="4" width="9" height="9" fill="#e0a030" opacity=".85"/>'
    b'<rect x="7" y="7" width="8" height="8" fill="#d04848" opacity=".85"/></svg>'
)
#: Bytes a multipart form adds around the document (boundaries, headers, settings).
FORM_OVERHEAD = 1024**2
#: Seconds between checks for news on /api/events, and between keep-alive comments.
EVENT_POLL_S = 0.25
KEEPALIVE_S = 15.0
#: Largest side of a variant thumbnail (?max=N).
MAX_THUMB = 4096


def create_app(
    backend: Backend,
    *,
    token: str | None = None,
    local_only: bool = True,
    max_upload: int = DEFAULT_MAX_UPLOAD,
    manage_backend: bool = True,
) -> Starlette:
    """The ASGI app over ``backend``; it starts and closes the backend with the server."""
    book = JobBook(backend.layout, backend.snapshot)
    api = _Api(book, backend, max_upload)

    @contextlib.asynccontextmanager
    async def lifespan(_app: Starlette) -> AsyncIterator[None]:
        if manage_backend:
            backend.start()
        try:
            yield
        finally:
            api.closing.set()
            if manage_backend:
                await run_in_threadpool(backend.close)

    static = resources.files("serve") / "static"
    routes = [
        Route("/", api.index),
        Mount("/static", app=StaticFiles(directory=str(static)), name="static"),
        Route("/api/jobs", api.submit, methods=["POST"]),
        Route("/api/jobs", api.list_jobs, methods=["GET"]),
        Route("/api/jobs/{id}", api.get_job, methods=["GET"]),
        Route("/api/jobs/{id}", api.cancel, methods=["DELETE"]),
        Route("/api/jobs/{id}/result", api.result),
        Route("/api/jobs/{id}/preview", api.preview),
        Route("/api/jobs/{id}/variants/{n:int}.png", api.variant),
        Route("/api/jobs/{id}/retry", api.retry, methods=["POST"]),
        Route("/api/events", api.events),
        Route("/favicon.ico", api.favicon),
    ]
    middleware = [Middleware(Guard, token=token)]
    if local_only and not token:
        middleware.insert(0, Middleware(TrustedHostMiddleware, allowed_hosts=list(LOOPBACK_HOSTS)))
    app = Starlette(routes=routes, middleware=middleware, lifespan=lifespan)
    app.add_exception_handler(ApiError, _api_error)
    app.state.book = book
    app.state.end_streams = api.closing.set  # call before stopping the server: SSE streams end
    return app


async def _api_error(_request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)
    return JSONResponse({"error": exc.message}, status_code=exc.status)


class _Api:
    def __init__(self, book: JobBook, backend: Backend, max_upload: int) -> None:
        self.book = book
        self.backend = backend
        self.max_upload = max_upload
        self.closing = threading.Event()  # set from uvicorn's thread or a signal handler
        self._pngs: OrderedDict[tuple, bytes] = OrderedDict()

    async def index(self, _request: Request) -> Response:
        page = (resources.files("serve") / "static" / "index.html").read_text(encoding="utf-8")
        return Response(page, media_type="text/html; charset=utf-8")

    async def submit(self, request: Request) -> Response:
        too_big = ApiError(413, f"the upload is over the limit of {_mb(self.max_upload)}")
        length = request.headers.get("content-length", "")
        if length.isdigit() and int(length) > self.max_upload + FORM_OVERHEAD:
            raise too_big
        # Counted as the body streams in, so a chunked upload (no Content-Length) is cut off
        # at the limit instead of being spooled to a temporary file first.
        request = Request(
            request.scope, _limited(request.receive, self.max_upload + FORM_OVERHEAD, too_big)
        )
        async with request.form(max_files=1, max_fields=8) as form:
            upload = form.get("file")
            if not isinstance(upload, UploadFile):
                raise ApiError(400, "send the document as the multipart field 'file'")
            if (upload.size or 0) > self.max_upload:
                raise ApiError(413, f"the upload is over the limit of {_mb(self.max_upload)}")
            settings = form.get("settings") or ""
            if isinstance(settings, UploadFile):
                settings = (await settings.read()).decode("utf-8", "replace")
            view = await run_in_threadpool(
                self.book.submit,
                upload.filename or "",
                upload.file,
                str(settings),
                self.backend.check_upload,
            )
        return JSONResponse(_public(view), status_code=201)

    async def list_jobs(self, _request: Request) -> Response:
        jobs = await run_in_threadpool(self.book.jobs)
        return JSONResponse({"jobs": [_public(j) for j in jobs]})

    async def get_job(self, request: Request) -> Response:
        view = await run_in_threadpool(self.book.job, request.path_params["id"])
        return JSONResponse(_public(view))

    async def cancel(self, request: Request) -> Response:
        view = await run_in_threadpool(self.book.cancel, request.path_params["id"])
        return JSONResponse(_public(view))

    async def retry(self, request: Request) -> Response:
        view = await run_in_threadpool(self.book.retry, request.path_params["id"])
        return JSONResponse(_public(view))

    async def result(self, request: Request) -> Response:
        from psd_collage.render import default_output

        path = await run_in_threadpool(self.book.path_of, request.path_params["id"], "done")
        # Saved as NAME.harmonized.psd, like `render` names it: a download must not take the
        # original's name and replace it in the designer's Downloads folder.
        name = default_output(path).name
        return FileResponse(path, filename=name, media_type="image/vnd.adobe.photoshop")

    async def favicon(self, _request: Request) -> Response:
        return Response(
            FAVICON, media_type="image/svg+xml", headers={"Cache-Control": "max-age=86400"}
        )

    async def preview(self, request: Request) -> Response:
        path = await run_in_threadpool(self.book.path_of, request.path_params["id"], "preview")
        return FileResponse(path, media_type="image/png")

    async def variant(self, request: Request) -> Response:
        job_id, n = request.path_params["id"], request.path_params["n"]
        try:
            biggest = int(request.query_params.get("max", MAX_THUMB * 4))
        except ValueError:
            raise ApiError(400, "max must be a whole number of pixels") from None
        data = await run_in_threadpool(self._variant_png, job_id, n, max(16, biggest))
        return Response(data, media_type="image/png")

    def _variant_png(self, job_id: str, n: int, biggest: int) -> bytes:
        from psd_collage.psd.variants import read_variant

        view = self.book.job(job_id)
        variants = view.get("variants") or []
        if not 0 <= n < len(variants):
            raise ApiError(404, f"job {job_id} has {len(variants)} variants, numbered from 0")
        path = self.book.path_of(job_id, "done")
        key = (str(path), path.stat().st_mtime_ns, n, biggest)
        if key not in self._pngs:
            try:
                pixels = read_variant(path, variants[n]["layer"])
            except CollageError as exc:
                raise ApiError(404, str(exc)) from None
            image = Image.fromarray(pixels, "RGB")
            image.thumbnail((biggest, biggest), Image.Resampling.LANCZOS)
            buffer = io.BytesIO()
            image.save(buffer, format="PNG")
            self._pngs[key] = buffer.getvalue()
            while len(self._pngs) > 32:
                self._pngs.popitem(last=False)
        return self._pngs[key]

    async def events(self, request: Request) -> Response:
        """Server-Sent Events: ``event: status`` with the whole snapshot whenever it changes."""

        async def stream() -> AsyncIterator[str]:
            last, quiet = None, 0.0
            yield "retry: 1000\n\n"
            while not self.closing.is_set() and not await request.is_disconnected():
                snap = await run_in_threadpool(self.book.snapshot)
                body = json.dumps(_public(snap), ensure_ascii=False, default=str)
                if body != last:
                    last, quiet = body, 0.0
                    yield f"event: status\ndata: {body}\n\n"
                elif quiet >= KEEPALIVE_S:
                    quiet = 0.0
                    yield ": keep-alive\n\n"
                await asyncio.sleep(EVENT_POLL_S)
                quiet += EVENT_POLL_S

        headers = {"Cache-Control": "no-store", "X-Accel-Buffering": "no"}
        return StreamingResponse(stream(), media_type="text/event-stream", headers=headers)


def _public(view: Any) -> Any:
    """Drop the internal bits (the raw status entry, ROOT-relative paths) from a view."""
    if isinstance(view, dict):
        return {k: _public(v) for k, v in view.items() if k not in ("entry", "files")}
    if isinstance(view, list):
        return [_public(v) for v in view]
    return view


def _limited(receive: Receive, limit: int, error: ApiError) -> Receive:
    """``receive`` that raises ``error`` once more than ``limit`` body bytes have arrived."""
    seen = 0

    async def counted() -> Message:
        nonlocal seen
        message = await receive()
        if message["type"] == "http.request":
            seen += len(message.get("body", b""))
            if seen > limit:
                raise error
        return message

    return counted


def _mb(size: int) -> str:
    return f"{size / 1024**2:.0f} MB"


class Guard:
    """Bearer token on every request (when set) and no cross-site writes; plain ASGI."""

    def __init__(self, app: ASGIApp, token: str | None) -> None:
        self.app = app
        self.token = token

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request = Request(scope)
        bearer = self._bearer(request)
        if self.token:
            given = request.query_params.get("token")
            if request.url.path == "/" and given and self._valid(given):
                response: Response = RedirectResponse("/", status_code=303)
                response.set_cookie(COOKIE, given, httponly=True, samesite="strict")
                await response(scope, receive, send)
                return
            if not (self._valid(bearer) or self._valid(request.cookies.get(COOKIE))):
                response = JSONResponse(
                    {
                        "error": "this psd-collage server needs its token: send the header "
                        "'Authorization: Bearer TOKEN', or open /?token=TOKEN in a browser"
                    },
                    status_code=401,
                    headers={"WWW-Authenticate": "Bearer"},
                )
                await response(scope, receive, send)
                return
        if request.method not in ("GET", "HEAD", "OPTIONS") and not self._valid(bearer):
            origin = request.headers.get("origin")
            if origin and urlsplit(origin).netloc != request.headers.get("host"):
                response = JSONResponse(
                    {"error": "a page of another site may not change jobs here"}, status_code=403
                )
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)

    def _bearer(self, request: Request) -> str | None:
        scheme, _, value = request.headers.get("authorization", "").partition(" ")
        return value.strip() if scheme.lower() == "bearer" else None

    def _valid(self, given: str | None) -> bool:
        return bool(self.token and given) and secrets.compare_digest(
            str(given).encode(), str(self.token).encode()
        )


def is_loopback(host: str) -> bool:
    """Whether ``--host`` keeps the server on this machine."""
    return host in LOOPBACK_HOSTS or host.startswith("127.")
