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
``GET /health`` needs HTTP basic auth (Label Studio's "Basic auth" connection option).

Predictions and other model work run in worker threads, so ``/health`` (which Label Studio
allows 1 s) stays responsive while a pre-label runs.
"""
from __future__ import annotations

import base64
import binascii
import json
import logging
import secrets
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


def _authorized(header: str | None, settings: Settings) -> bool:
    if not header or not header.startswith("Basic "):
        return False
    try:
        user, _, password = base64.b64decode(header[6:], validate=True).decode().partition(":")
    except (binascii.Error, UnicodeDecodeError):
        return False
    return secrets.compare_digest(user, settings.basic_auth_user or "") & \
        secrets.compare_digest(password, settings.basic_auth_password or "")


def create_app(settings: Settings | None = None, backend: Backend | None = None) -> FastAPI:
    """The ASGI app. Models are loaded here (before the first request), not in /setup."""
    settings = settings or (backend.settings if backend else Settings.from_env())
    backend = backend or Backend(settings)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        await run_in_threadpool(backend.close)

    app = FastAPI(title="mosaic-sam ML backend", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.backend = backend

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

    async def call(fn: Callable[..., Any], *args: Any) -> Any:
        try:
            return await run_in_threadpool(fn, *args)
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
    async def predict(request: Request) -> dict[str, Any]:
        started = time.perf_counter()
        body = await request.body()
        answer = await call(lambda: backend.predict(decode_predict_request(body)))
        log.debug("predict answered in %.3f s", time.perf_counter() - started)
        return answer

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
