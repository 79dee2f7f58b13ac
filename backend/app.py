"""The HTTP layer: Label Studio's ML backend protocol on FastAPI.

Endpoints (all JSON unless noted):

=======================  =================================================================
``GET /``, ``GET /health``  ``{"status": "UP", "model_version": ..., ...}``
``POST /setup``             ``{"model_version": ...}`` (Label Studio connects; answered at once)
``POST /predict``           ``{"results": [{"result": [...], "score": ..., "model_version": ...}]}``
``POST /webhook``           training and annotation events
``POST /train``             training request of older Label Studio versions
``POST /job_status``        ``{"job": <run id>}`` -> that run's status
``GET /versions``           ``{"versions": [...], "current": ..., "models": [...]}``
``POST /versions/current``  ``{"version": ...}``: serve that version from now on
``GET /train/status``       the latest training run (``?run=<id>`` for another)
``POST /prelabel``          ``{"project": ID}``: pre-label every task of a project in a worker
``GET /jobs``               pre-label jobs with their progress, and the latest training run
``GET /metrics``            Prometheus text (``?format=json``: JSON summary)
=======================  =================================================================

Every error is a JSON object ``{"error": "<message>", "status": <code>}`` with that status
(``errors.BackendError``), also for malformed JSON, unknown paths and unexpected failures
(500, logged with the traceback), so Label Studio can show the message and the service goes
on answering. With ``MOSAIC_BACKEND_BASIC_AUTH_USER``/``_PASSWORD`` every endpoint except
``GET /health`` needs HTTP basic auth (Label Studio's "Basic auth" connection option; compared
as UTF-8 bytes, anything malformed is a 401). Request bodies are capped
(``MOSAIC_BACKEND_MAX_BODY_MB``, 413), /predict answers too (``MOSAIC_BACKEND_MAX_ANSWER_MB``).

Predictions and other model work run in worker threads, so ``/health`` (which Label Studio
allows 1 s) stays responsive while a pre-label runs. On SIGTERM (or SIGINT) running requests
answer 503 at once and the server exits; their threads stop at the next deadline check.
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import os
import secrets
import signal
import threading
import time
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator, Callable

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from .config import Settings
from .errors import BackendError, status_of
from .service import Backend, decode_predict_request

log = logging.getLogger("mosaic_backend")

OPEN_PATHS = {("GET", "/health")}
MAX_WORKER_THREADS = 40  # model work running at once (as anyio's default thread limiter)


def error_response(request: Request, status: int, message: str) -> JSONResponse:
    """The JSON error answer, also logged: Label Studio shows its users only the status
    ("400 Client Error"), so the reason is in the backend's log."""
    log.warning("%s %s -> %d: %s", request.method, request.url.path, status, message)
    return JSONResponse({"error": message, "status": status}, status_code=status)


async def read_json(request: Request) -> Any:
    """The request body as JSON (None when empty); a 400 error when it is not JSON."""
    body = await request.body()
    if not body.strip():
        return None
    try:
        return await run_in_threadpool(json.loads, body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BackendError(f"{request.url.path}: the body is not valid JSON ({exc})") from exc


class BodyLimit:
    """ASGI middleware: a request body larger than ``max_bytes`` is a 413 error, refused from
    its Content-Length before it is read, or (chunked, no length) as soon as the bytes read
    pass the limit."""

    def __init__(self, app: Any, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    def too_large(self) -> BackendError:
        return BackendError(f"request body larger than {self.max_bytes / 2**20:g} MiB "
                            "(MOSAIC_BACKEND_MAX_BODY_MB)", 413)

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        for name, value in scope.get("headers") or ():
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    raise BackendError("malformed Content-Length header") from None
                if declared > self.max_bytes:
                    raise self.too_large()
        read = 0

        async def counted() -> dict:
            nonlocal read
            message = await receive()
            if message.get("type") == "http.request":
                read += len(message.get("body", b""))
                if read > self.max_bytes:
                    raise self.too_large()
            return message

        await self.app(scope, counted, send)


def _authorized(header: str | None, settings: Settings) -> bool:
    """HTTP basic auth, compared as bytes (UTF-8), in constant time. Any malformed header
    (not base64, non-ASCII characters, no colon) is simply not authorised: a 401, never a 500."""
    if not header or not header.startswith("Basic "):
        return False
    try:
        raw = base64.b64decode(header[6:].encode("latin-1"), validate=True)
    except (binascii.Error, ValueError, UnicodeEncodeError):
        return False
    user, colon, password = raw.partition(b":")
    expected_user = (settings.basic_auth_user or "").encode("utf-8")
    expected_password = (settings.basic_auth_password or "").encode("utf-8")
    return bool(colon) & secrets.compare_digest(user, expected_user) & \
        secrets.compare_digest(password, expected_password)


async def in_daemon_thread(stop: threading.Event, fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)`` in a daemon thread; a 503 error as soon as ``stop`` is set (SIGTERM), so
    the server answers and exits within a second instead of waiting for the work to end. The
    abandoned thread stops at its next deadline check, or with the process."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future = loop.create_future()

    def settle(result: Any, error: BaseException | None) -> None:
        if not future.done():
            future.set_exception(error) if error is not None else future.set_result(result)

    def run() -> None:
        try:
            result, error = fn(*args), None
        except BaseException as exc:  # noqa: BLE001 (handed to the request)
            result, error = None, exc
        try:
            loop.call_soon_threadsafe(settle, result, error)
        except RuntimeError:  # the event loop is gone: the server has stopped
            pass

    threading.Thread(target=run, name="mosaic-backend request", daemon=True).start()
    while True:
        done, _ = await asyncio.wait({future}, timeout=0.1)
        if done:
            return future.result()
        if stop.is_set():
            raise BackendError("the server is shutting down; the request was stopped", 503)


def _on_signals(callback: Callable[[], None]) -> Callable[[], None]:
    """Call ``callback`` first on SIGTERM and SIGINT, then the handler there was (uvicorn's);
    returns the function that puts the old handlers back. Only in the main thread (signals
    cannot be handled elsewhere; the test client runs the app in another thread)."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    previous: dict[int, Any] = {}

    def handler(signum: int, frame: Any) -> None:
        callback()
        before = previous.get(signum)
        if callable(before):
            before(signum, frame)
        elif before == signal.SIG_DFL:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)

    for sig in (signal.SIGTERM, signal.SIGINT):
        previous[sig] = signal.getsignal(sig)
        signal.signal(sig, handler)

    def restore() -> None:
        for sig, before in previous.items():
            if signal.getsignal(sig) is handler:
                signal.signal(sig, before if before is not None else signal.SIG_DFL)

    return restore


def create_app(settings: Settings | None = None, backend: Backend | None = None) -> FastAPI:
    """The ASGI app. Models are loaded here (before the first request), not in /setup."""
    settings = settings or (backend.settings if backend else Settings.from_env())
    backend = backend or Backend(settings)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        restore = _on_signals(backend.stop)  # SIGTERM stops running requests (503) at once
        try:
            yield
        finally:
            restore()
            await run_in_threadpool(backend.close)

    app = FastAPI(title="mosaic-sam ML backend", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.backend = backend
    app.add_middleware(BodyLimit, max_bytes=int(settings.max_body_mb * 2**20))  # inside guard

    @app.middleware("http")
    async def guard(request: Request, call_next: Callable) -> Response:
        """Basic auth, JSON errors for everything, request metrics."""
        route = request.url.path
        if settings.auth_enabled and (request.method, route) not in OPEN_PATHS \
                and not _authorized(request.headers.get("authorization"), settings):
            response: Response = error_response(request, 401, "authentication required (HTTP basic auth)")
            response.headers["WWW-Authenticate"] = 'Basic realm="mosaic-backend"'
        else:
            try:
                response = await call_next(request)
            except Exception as exc:  # noqa: BLE001 (never a bare 500 page)
                status = status_of(exc)
                if status >= 500 and not isinstance(exc, BackendError):
                    log.exception("%s %s failed", request.method, route)
                    response = error_response(request, 500, f"internal error: {type(exc).__name__}: {exc}")
                else:
                    response = error_response(request, status, str(exc))
        known = "endpoint" in request.scope  # set by the router when a route matched
        backend.metrics.request(route if known else "(unknown)", response.status_code)
        return response

    @app.exception_handler(BackendError)
    async def backend_error(request: Request, exc: BackendError) -> JSONResponse:
        return error_response(request, exc.status, str(exc))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = f"{request.method} {request.url.path}: {exc.detail}"
        return error_response(request, exc.status_code, message)

    workers = asyncio.Semaphore(MAX_WORKER_THREADS)

    async def call(fn: Callable[..., Any], *args: Any) -> Any:
        try:
            async with workers:
                return await in_daemon_thread(backend.stopping, fn, *args)
        except BackendError:
            raise
        except Exception as exc:  # a MosaicError is bad input (400); anything else is a bug (500)
            status = status_of(exc)
            if status >= 500:
                raise
            raise BackendError(str(exc), status) from exc

    @app.get("/")
    @app.get("/health")
    async def health() -> dict[str, Any]:
        return backend.health()

    @app.post("/setup")
    async def setup(request: Request) -> dict[str, Any]:
        return backend.setup(await read_json(request))

    @app.post("/predict")
    async def predict(request: Request) -> Response:
        started = time.perf_counter()
        body = await request.body()
        answer = await call(lambda: backend.predict_json(decode_predict_request(body)))
        log.debug("predict answered in %.3f s", time.perf_counter() - started)
        return Response(answer, media_type="application/json")

    @app.post("/webhook")
    async def webhook(request: Request) -> dict[str, Any]:
        return await call(backend.webhook, await read_json(request))

    @app.post("/train")
    async def train(request: Request) -> dict[str, Any]:
        return await call(backend.train_legacy, await read_json(request))

    @app.post("/job_status")
    async def job_status(request: Request) -> dict[str, Any]:
        body = await read_json(request)
        job = body.get("job") if isinstance(body, dict) else None
        return await call(backend.training.status, job if isinstance(job, str) else None)

    @app.get("/versions")
    async def versions() -> dict[str, Any]:
        return await call(backend.versions)

    @app.post("/versions/current")
    async def select_version(request: Request) -> dict[str, Any]:
        return await call(backend.select_version, await read_json(request))

    @app.get("/train/status")
    async def train_status(run: str | None = None) -> dict[str, Any]:
        return await call(backend.training.status, run)

    @app.post("/prelabel")
    async def prelabel(request: Request) -> dict[str, Any]:
        return await call(backend.prelabels.start, await read_json(request))

    @app.get("/jobs")
    async def jobs() -> dict[str, Any]:
        return await call(backend.jobs)

    @app.get("/metrics")
    async def metrics(format: str = "prometheus") -> Response:
        if format == "json":
            return JSONResponse(backend.metrics.summary())
        info = {"engine": backend.engines.base.name, "model_version": backend.engines.active_version}
        return PlainTextResponse(backend.metrics.prometheus(info),
                                 media_type="text/plain; version=0.0.4")

    return app


def create_app_from_env() -> FastAPI:
    """Factory for uvicorn worker processes (``mosaic-backend --workers N``)."""
    settings = Settings.from_env()
    logging.basicConfig(level=settings.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return create_app(settings)
