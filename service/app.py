"""The FastAPI app: `create_app(settings)`; models are loaded in the lifespan, kept on app.state.

Start-up discovers the bundles (a configuration that cannot serve anything stops the process
there), then loads and warms them up in a background thread, so /healthz answers at once and
/readyz turns 200 when every bundle is ready. Shutdown (after uvicorn has finished the
in-flight requests) stops the batchers.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import asdict
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute
from starlette.middleware.cors import CORSMiddleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from service import http_protocol, memory
from service.auth import TokenGuard
from service.capture import CaptureWriter
from service.classify import ClassifyEndpoint, openapi_operation
from service.descriptors import install_loop_handler
from service.discovery import configured
from service.errors import (
    RETRY_AFTER,
    ServiceError,
    error_detail,
    error_status,
    validation_detail,
)
from service.metrics import PrometheusMetrics, RequestMetricsMiddleware, route_path
from service.page import add_page
from service.registry import ModelRegistry
from service.registry_state import ModelStatus
from service.schemas import (
    CalibrationSummary,
    ErrorResponse,
    HealthResponse,
    ModelInfo,
    ModelsResponse,
    ModelState,
    QuantileValue,
    ReadyResponse,
)
from service.settings import Settings
from service.v2.routes import routes as v2_routes
from service.workers import WorkerBoard, merge_entries, merge_models

log = logging.getLogger(__name__)

API_DESCRIPTION = """
Image classification with an out-of-distribution verdict from the same forward pass.

Every result carries `min_distance`, the distance of the image's feature to the nearest class
prototype of an IsoMax+ model, and `is_ood` = `min_distance > threshold`, where the threshold
was calibrated on held-out in-distribution images to keep `target_tpr` of them: of the images
predicted as that class when the model has class thresholds, else of all of them.
"""


class ServiceApp(FastAPI):
    """FastAPI, plus direct routes: `POST <path>` requests go straight to an ASGI endpoint.

    Every other request takes the usual way (middleware stack, router). The stack in front of
    the router (ServerErrorMiddleware, FastAPI's telemetry and body-limit layers, the exception
    middleware) costs ~15-25 us per request, ~10% of a single-image request on this machine;
    a direct endpoint catches its own errors and counts its own metrics, so it needs none of it.
    The same endpoint is also a router route, so GET answers 405 as on any other route.
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.direct_posts: dict[str, ASGIApp] = {}  # path (without root_path) -> endpoint
        # What every request goes through first, direct routes included: `_dispatch`, or the
        # Host-header and CORS layers around it when they are configured (`guard`).
        self._entry: ASGIApp = self._dispatch

    def guard(self, trusted_hosts: tuple[str, ...], cors_origins: tuple[str, ...]) -> None:
        """Put the Host allow-list and the CORS policy (Starlette's middleware) in front of
        every route, the direct ones included; empty tuples leave that layer out."""
        entry: ASGIApp = self._dispatch
        if cors_origins:
            entry = CORSMiddleware(
                entry,
                allow_origins=list(cors_origins),
                allow_methods=["GET", "POST"],
                allow_headers=["Content-Type", "Authorization"],
                max_age=600,
            )
        if trusted_hosts:
            entry = TrustedHostMiddleware(entry, allowed_hosts=list(trusted_hosts))
        self._entry = entry

    def add_direct_post(self, path: str, endpoint: ASGIApp, routed: ASGIApp) -> None:
        """Serve POST `path` with `endpoint` directly; `routed` answers it via the router."""
        self.direct_posts[path] = endpoint
        self.router.routes.append(Route(path, routed, methods=["POST"], include_in_schema=False))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self._entry(scope, receive, send)

    async def _dispatch(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            endpoint = self.direct_posts.get(route_path(scope))
            if endpoint is not None:
                await endpoint(scope, receive, send)
                return
        await super().__call__(scope, receive, send)


def get_registry(request: Request) -> ModelRegistry:
    return request.app.state.registry


def get_metrics(request: Request) -> PrometheusMetrics:
    return request.app.state.metrics


RegistryDep = Annotated[ModelRegistry, Depends(get_registry)]
MetricsDep = Annotated[PrometheusMetrics, Depends(get_metrics)]


def _model_info(st: ModelStatus) -> ModelInfo:
    info = ModelInfo(
        name=st.ref.name, version=st.ref.version, status=st.status, error=st.error,
        default=st.default,
    )  # fmt: skip
    m = st.model
    if m is None:
        return info
    cal = m.manifest.calibration
    info.provider = m.provider
    info.labels = list(m.labels)
    info.input = m.manifest.preprocess.model_dump(mode="json")
    info.threshold = m.thresholds.overall
    if m.thresholds.per_class is not None:
        info.class_thresholds = dict(zip(m.labels, m.thresholds.per_class, strict=True))
    info.target_tpr = m.thresholds.target_tpr
    info.global_threshold_classes = (
        list(m.labels)
        if m.thresholds.per_class is None or cal.per_class is None
        else [label for label, c in zip(m.labels, cal.per_class, strict=True) if c.pooled]
    )
    info.calibration = CalibrationSummary(
        score=cal.score,
        in_distribution=cal.in_distribution,
        split=cal.split,
        size=cal.size,
        target_tpr=cal.target_tpr,
        threshold=cal.threshold,
        quantile_range=(cal.quantiles[0].q, cal.quantiles[-1].q),
        per_class=cal.per_class is not None,
        min_class_size=cal.min_class_size,
        temperature=cal.temperature,
        quantiles=[QuantileValue(q=p.q, value=p.value) for p in cal.quantiles],
        class_quantiles=None
        if cal.per_class is None
        else {
            label: [QuantileValue(q=p.q, value=p.value) for p in c.quantiles]
            for label, c in zip(m.labels, cal.per_class, strict=True)
        },
    )
    info.metrics = m.manifest.metrics.model_dump(mode="json")
    info.created = m.manifest.created.isoformat()
    # The commit only: a "-dirty" suffix says the training tree had uncommitted changes, which is
    # for whoever holds the bundle (its manifest keeps it), not for every caller of /models.
    commit = m.manifest.source_commit
    info.source_commit = commit.removesuffix("-dirty") if commit else commit
    info.description = m.manifest.description or None
    return info


def worker_state(registry: ModelRegistry) -> dict[str, Any]:
    """What this worker publishes on the board: readiness, entries, versions (JSON)."""
    return {
        "ready": registry.ready,
        "entries": {k: asdict(e) for k, e in registry.entries.items()},
        "models": [_model_info(st).model_dump(mode="json") for st in registry.statuses.values()],
    }


def _error_response(exc: ServiceError, retry_after_s: int) -> JSONResponse:
    headers = {"Retry-After": str(retry_after_s)} if isinstance(exc, RETRY_AFTER) else None
    return JSONResponse({"detail": error_detail(exc)}, error_status(exc), headers=headers)


def create_app(settings: Settings | None = None) -> ServiceApp:
    """The service for `settings` (default: from ISOMAX_* environment variables)."""
    settings = settings if settings is not None else Settings()
    metrics = PrometheusMetrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        loop = asyncio.get_running_loop()
        install_loop_handler(loop)  # EMFILE as one log line, not a traceback per accept
        specs = configured(settings.models_dir, settings.models)
        registry = ModelRegistry(specs, settings, metrics)
        board = WorkerBoard(settings.state_dir, settings.workers)
        app.state.registry = registry
        app.state.board = board
        capture = CaptureWriter(settings, metrics) if settings.capture_dir is not None else None
        if capture is not None:
            capture.start()
        app.state.capture = capture

        def publish() -> None:
            board.publish(worker_state(registry))

        publish()
        registry.on_change(publish)
        registry.start(loop)
        hup = _install_sighup(loop, registry)
        watcher = asyncio.ensure_future(_watch_reload(board, registry)) if board.shared else None
        try:
            yield
        finally:
            if hup:
                loop.remove_signal_handler(signal.SIGHUP)
            if watcher is not None:
                watcher.cancel()
            await loop.run_in_executor(None, registry.close)
            if capture is not None:
                await loop.run_in_executor(None, capture.close)
            board.close()
            metrics.close()
            log.info("stopped")

    app = ServiceApp(
        title="isomax-serve",
        summary="Fashion-MNIST-style classification with an IsoMax+ OOD verdict.",
        description=API_DESCRIPTION,
        version="0.1.0",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.board = WorkerBoard(None)
    app.state.capture = None

    # For the routes that FastAPI runs (not the direct POST /classify, which answers its own
    # errors the same way): domain errors and bad parameters get the one JSON error body.
    async def service_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, ServiceError)
        return _error_response(exc, settings.retry_after_s)

    async def validation_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        return JSONResponse({"detail": validation_detail(exc.errors())}, 422)

    app.add_exception_handler(ServiceError, service_error)
    app.add_exception_handler(RequestValidationError, validation_error)

    @app.get("/healthz", response_model=HealthResponse)
    async def healthz() -> HealthResponse:
        """The process is alive (says nothing about the models)."""
        return HealthResponse()

    @app.get("/readyz", response_model=ReadyResponse, responses={503: {"model": ReadyResponse}})
    async def readyz(request: Request) -> Response:
        """200 when every configured model has a working version (in every worker), else 503.

        503 carries Retry-After while something is still loading; a model that failed
        permanently (no version of it loads) gets none: waiting will not fix it.
        """
        states = request.app.state.board.collect()
        entries = merge_entries(states)
        models = {key: ModelState(**e) for key, e in entries.items()}
        workers = settings.workers if settings.workers > 1 else None
        missing = max(0, settings.workers - len(states))
        if states and not missing and all(s.get("ready") for s in states):
            return JSONResponse(
                ReadyResponse(ready=True, models=models, workers=workers).model_dump()
            )
        reasons = [
            f"{key}: {e['detail']}" if e.get("detail") else f"{key}: {e['status']}"
            for key, e in entries.items()
            if e["status"] != "ready"
        ]
        if missing:
            reasons.append(f"{missing} of {settings.workers} workers have not started")
        loading = missing or not states or any(e["status"] == "loading" for e in entries.values())
        body = ReadyResponse(
            ready=False, detail="not ready: " + "; ".join(reasons), models=models, workers=workers
        )
        headers = {"Retry-After": str(settings.retry_after_s)} if loading else None
        return JSONResponse(body.model_dump(), 503, headers=headers)

    @app.get("/models", response_model=ModelsResponse)
    async def list_models(request: Request) -> ModelsResponse:
        """Every loaded or tried version: status, provider, labels, threshold, manifest summary.

        With several workers, a version reads `ready` only when every worker serves it.
        """
        infos = merge_models(request.app.state.board.collect())
        return ModelsResponse(models=[ModelInfo.model_validate(i) for i in infos])

    if settings.admin_token is not None:
        guard = TokenGuard(settings.admin_token.get_secret_value().encode())

        @app.post(
            "/admin/reload",
            response_model=ReadyResponse,
            responses={401: {"model": ErrorResponse}, 403: {"model": ErrorResponse}},
        )
        async def admin_reload(request: Request, registry: RegistryDep) -> Response:
            """Rescan the models directory now (every worker); answers this worker's state.

            Exists only when ISOMAX_ADMIN_TOKEN is set; needs `Authorization: Bearer <token>`.
            """
            peer = f"{request.client.host}" if request.client else "client"
            refused = guard.check(request.headers.get("authorization", ""), peer)
            if refused is not None:  # wrong guesses are bounded and logged (service/auth.py)
                status, detail = refused
                headers = {401: {"WWW-Authenticate": "Bearer"}}.get(status, {})
                if status == 429:
                    headers = {"Retry-After": str(max(1, round(guard.locked_for())))}
                return JSONResponse({"detail": detail}, status, headers=headers)
            request.app.state.board.touch_reload()
            n = registry.request_reload()
            done = await asyncio.get_running_loop().run_in_executor(
                None, registry.wait_reload, n, RELOAD_WAIT_S
            )
            models = {k: ModelState(**asdict(e)) for k, e in registry.entries.items()}
            body = ReadyResponse(
                ready=registry.ready,
                detail=None if done else f"the rescan did not finish within {RELOAD_WAIT_S} s",
                models=models,
            )
            return JSONResponse(body.model_dump(), 200 if done else 202)

    @app.get("/metrics", response_class=Response)
    async def prometheus_metrics(metrics: MetricsDep) -> Response:
        """Prometheus metrics in the text exposition format."""
        body, content_type = metrics.exposition()
        return Response(body, media_type=content_type)

    for route in app.router.routes:
        if isinstance(route, APIRoute):
            # The one-line docstring is the OpenAPI summary (FastAPI would use the function name).
            route.summary = route.summary or (route.description or "").split("\n")[0] or None
    app.router.routes.extend(v2_routes(settings))  # Open Inference Protocol v2 (service/v2)
    endpoint = ClassifyEndpoint(app.state, settings, metrics)
    app.state.body_budget = endpoint.bodies  # in-flight body bytes, shared with service/v2
    if settings.page:
        add_page(app)  # GET / and /static/*: ordinary routes, off the /classify shortcut
    app.add_middleware(RequestMetricsMiddleware, metrics=metrics)
    # Direct: the endpoint counts its requests and answers a request cut by the graceful-shutdown
    # timeout itself. Routed (a path the direct table does not match, e.g. behind an unexpected
    # prefix): the app's middleware counts it already.
    app.add_direct_post("/classify", endpoint, endpoint.routed)
    _document_classify(app, settings.max_images_per_request)
    app.guard(settings.trusted_hosts, settings.cors_origins)
    return app


def _document_classify(app: FastAPI, max_images: int) -> None:
    """Add POST /classify, which FastAPI does not route, to the generated OpenAPI document."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            spec = generate()
            operation, schemas = openapi_operation(max_images)
            spec.setdefault("paths", {})["/classify"] = {"post": operation}
            spec.setdefault("components", {}).setdefault("schemas", {}).update(schemas)
            app.openapi_schema = spec
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


# How long POST /admin/reload waits for the rescan it asked for (loads included).
RELOAD_WAIT_S = 120.0
# How often each worker looks at the board's reload file (a stat; --workers N only).
RELOAD_WATCH_S = 0.5


def _install_sighup(loop: asyncio.AbstractEventLoop, registry: ModelRegistry) -> bool:
    """SIGHUP -> rescan the models directory (where the platform and loop allow it)."""

    def on_hup() -> None:
        log.info("SIGHUP: rescanning the models directory")
        registry.request_reload()

    try:
        loop.add_signal_handler(signal.SIGHUP, on_hup)
    except (AttributeError, NotImplementedError, RuntimeError, ValueError):
        return False  # no SIGHUP (Windows) or not the main thread (TestClient)
    return True


async def _watch_reload(board: WorkerBoard, registry: ModelRegistry) -> None:
    """Rescan when another worker's admin endpoint touched the board's reload file."""
    seen = board.reload_stamp()
    while True:
        await asyncio.sleep(RELOAD_WATCH_S)
        stamp = board.reload_stamp()  # one stat(): cheaper than a hand-off to a thread
        if stamp != seen:
            seen = stamp
            registry.request_reload()


# How long a thread waiting for the GIL lets the holder run before asking it to drop the GIL
# (CPython's default is 5 ms). After each onnxruntime run the batching thread needs the GIL back
# for a moment (outputs, handing results to the event loop) while the event loop holds it; with
# 5 ms it could idle the model that long per batch. 0.5 ms served 8-10% more requests per second
# on the 2-core machine (docs/serving.md); 0.1 ms was no better.
GIL_SWITCH_INTERVAL_S = 0.0005


def configure_process(log_level: str) -> None:
    """Process-wide set-up for serving: logging, the GIL switch interval, the allocator."""
    configure_logging(log_level)
    sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)
    memory.configure_allocator()  # large decodes go back to the OS (service/memory.py)


def configure_logging(level: str) -> None:
    """Log lines for the service's own loggers (uvicorn configures only its own)."""
    logging.basicConfig(
        level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )


def app_from_env() -> ServiceApp:
    """Factory for `uvicorn --factory service.app:app_from_env` (settings from ISOMAX_*).

    `isomax serve --workers N` starts N processes through it.
    """
    settings = Settings()
    configure_process(settings.log_level)
    http_protocol.configure_from(settings)  # this worker's connections
    return create_app(settings)
