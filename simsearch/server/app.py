"""`create_app(settings)`: the FastAPI application of `simsearch serve`, the HTTP API over
one index (and the web page in static/). Each route is a thin translation of a request into
a call on `Server` (state.py); errors are JSON (schemas.Error), never a traceback."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from contextlib import asynccontextmanager
from importlib import resources
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException

from simsearch._version import __version__
from simsearch.errors import (
    ImageError,
    IndexLockedError,
    ModelLoadError,
    QueryError,
    SimsearchError,
)
from simsearch.server import collection, routes
from simsearch.server.guard import Guard, is_loopback
from simsearch.server.metrics import Metrics
from simsearch.server.state import Server, Settings

log = logging.getLogger(__name__)


def _status(exc: SimsearchError) -> int:
    if isinstance(exc, routes.NotFound):
        return 404
    if isinstance(exc, IndexLockedError):
        return 409  # the background run, or another process, holds the write lock
    if isinstance(exc, ModelLoadError):
        return 503
    if isinstance(exc, (QueryError, ImageError)):
        return 400
    return 500  # storage and database errors: the message says what failed


def _error(status: int, exc: BaseException, kind: str | None = None) -> JSONResponse:
    body: dict[str, str | None] = {
        "error": str(exc) or type(exc).__name__,
        "type": kind or type(exc).__name__,
    }
    if isinstance(exc, SimsearchError):
        body.update(param=exc.param, fix=exc.fix)
    return JSONResponse(body, status_code=status)


class Measure:
    """Counts each request and its latency by route template (pure ASGI: the body stream
    passes through untouched, so the guard's 413 stays a 413)."""

    def __init__(self, app, metrics: Callable[[], Metrics]) -> None:
        self.app = app
        self.metrics = metrics  # looked up per request: the server is made after the app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status = time.perf_counter(), 500

        async def sending(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            route = getattr(scope.get("route"), "path", "unmatched")  # set by the router
            seconds = time.perf_counter() - start
            self.metrics().request(scope["method"], route, status, seconds)


def create_app(settings: Settings, server: Server | None = None) -> FastAPI:
    """The application; `server`: an already opened Server (tests), else one is opened."""
    holder: dict[str, Server] = {}

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        if "server" in holder:
            holder["server"].close()

    app = FastAPI(
        title="simsearch",
        version=__version__,
        description="Image similarity search over one simsearch index.",
        lifespan=lifespan,
        docs_url="/api/docs",
        redoc_url=None,
    )
    holder["server"] = server or Server(settings)
    app.state.server = holder["server"]

    @app.exception_handler(SimsearchError)
    async def simsearch_error(request: Request, exc: SimsearchError):
        return _error(_status(exc), exc)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException):
        names = {401: "Unauthorized", 404: "NotFound", 405: "MethodNotAllowed",
                 413: "PayloadTooLarge"}  # fmt: skip
        return JSONResponse(
            {"error": str(exc.detail), "type": names.get(exc.status_code, "HTTPError")},
            status_code=exc.status_code,
            headers=getattr(exc, "headers", None),
        )

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p not in ("body", "query"))
        message = f"{where}: {first.get('msg', 'invalid')}" if where else "invalid request"
        return JSONResponse({"error": message, "type": "ValidationError"}, status_code=422)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception):
        log.exception("error answering %s %s", request.method, request.url.path)
        return JSONResponse(
            {"error": "internal error (the server log has the details)", "type": "InternalError"},
            status_code=500,
        )

    app.add_middleware(Measure, metrics=lambda: holder["server"].metrics)
    app.include_router(routes.router)
    app.include_router(collection.router)

    @app.get("/metrics", response_class=PlainTextResponse, include_in_schema=False)
    def metrics() -> PlainTextResponse:
        return PlainTextResponse(
            holder["server"].metrics.text(), media_type="text/plain; version=0.0.4"
        )

    @app.get("/api/index/events", include_in_schema=False)
    async def index_events(request: Request):
        """The background run's state as server-sent events, one per change."""
        job = holder["server"].job

        async def stream():
            # Waits of a second, so that a closed connection or a stopping server ends
            # the stream within one (a long wait held shutdown for its length).
            version, quiet_since = -1, time.monotonic()
            while not await request.is_disconnected():
                state = await asyncio.to_thread(job.wait, version, 1.0)
                if state["version"] != version:
                    version, quiet_since = state["version"], time.monotonic()
                    yield f"data: {json.dumps(state)}\n\n"
                elif time.monotonic() - quiet_since > 15:
                    quiet_since = time.monotonic()
                    yield ": keep-alive\n\n"

        return StreamingResponse(stream(), media_type="text/event-stream")

    static = Path(str(resources.files("simsearch.server") / "static"))
    app.mount("/static", StaticFiles(directory=static), name="static")

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def page() -> HTMLResponse:
        return HTMLResponse((static / "index.html").read_text("utf-8"))

    app.add_middleware(
        Guard,
        token=settings.token,
        max_body=settings.max_upload,
        loopback=is_loopback(settings.host),
        cors=settings.cors,
    )
    if settings.cors:  # outermost: a preflight carries no token
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(settings.cors),
            allow_methods=["GET", "POST"],
            allow_headers=["authorization", "content-type"],
        )
    return app
