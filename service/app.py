"""The FastAPI app: `create_app(settings)` assembles the routes; the lifespan makes the state.

Routes live in their own modules (service/routes/: health and readiness, models, admin;
service/classify.py; service/v2/; service/page.py) and take the one typed `AppState`
(service/state.py) that the lifespan (service/lifespan.py) creates. `ServiceApp` adds one seam
to FastAPI: POST /classify goes straight to its endpoint, before the middleware stack.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.middleware.cors import CORSMiddleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.types import ASGIApp, Receive, Scope, Send

from service import classify, http_limits, memory
from service.auth import TokenGuard
from service.errors import InvalidParameterError, ServiceError, render_error, validation_detail
from service.lifespan import lifespan
from service.metrics import PrometheusMetrics, RequestMetricsMiddleware, route_path
from service.page import add_page
from service.routes import admin, health, models, summarized
from service.settings import Settings
from service.state import AppState
from service.v2.routes import routes as v2_routes

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

    This is the seam of the /classify fast path, and all of it: `direct_posts` maps a path to
    its endpoint, which `_dispatch` calls before the middleware stack and the router. Every other
    request takes the usual way. The stack and the router cost a measurable share of a
    single-image request (docs/serving.md, "Design notes"); a direct endpoint catches its own
    errors and counts its own metrics, so it needs none of it. The same endpoint is also the app
    of a declared router route (OpenAPI documents it; GET answers 405 as on any other route).
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.service: AppState | None = None  # set by the lifespan (service/lifespan.py)
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

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self._entry(scope, receive, send)

    async def _dispatch(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            endpoint = self.direct_posts.get(route_path(scope))
            if endpoint is not None:
                await endpoint(scope, receive, send)
                return
        await super().__call__(scope, receive, send)


def _error_response(exc: Exception, retry_after_s: int) -> Response:
    """A domain error or bad parameters of a FastAPI route, by the one renderer."""
    if isinstance(exc, RequestValidationError):
        exc = InvalidParameterError(validation_detail(exc.errors()))
    error = render_error(exc)
    headers = {"Retry-After": str(retry_after_s)} if error.retry_after else None
    return Response(error.body, error.status, headers, media_type="application/json")


def create_app(settings: Settings | None = None) -> ServiceApp:
    """The service for `settings` (default: from ISOMAX_* environment variables)."""
    settings = settings if settings is not None else Settings()
    metrics = PrometheusMetrics()
    app = ServiceApp(
        title="isomax-serve",
        summary="Fashion-MNIST-style classification with an IsoMax+ OOD verdict.",
        description=API_DESCRIPTION,
        version="0.1.0",
        lifespan=lifespan(settings, metrics),
    )

    # For the routes that FastAPI runs (POST /classify answers its own errors the same way):
    # domain errors and bad parameters get the one JSON error body.
    async def on_error(request: Request, exc: Exception) -> Response:
        return _error_response(exc, settings.retry_after_s)

    app.add_exception_handler(ServiceError, on_error)
    app.add_exception_handler(RequestValidationError, on_error)
    routers = [health.router, models.router]
    if settings.admin_token is not None:
        routers.append(admin.router(TokenGuard(settings.admin_token.get_secret_value().encode())))
    for router in (*routers, health.prometheus):
        app.include_router(summarized(router))
    endpoint = classify.ClassifyEndpoint(app, settings, metrics)
    classify.declare(app, endpoint, settings.max_images_per_request)
    app.router.routes.extend(v2_routes(settings))  # Open Inference Protocol v2 (service/v2)
    if settings.page:
        add_page(app)  # GET / and /static/*: ordinary routes, off the /classify shortcut
    app.add_middleware(RequestMetricsMiddleware, metrics=metrics)
    # Direct: the endpoint counts its requests and answers a request cut by the graceful-shutdown
    # timeout itself. Routed (a path the direct table does not match, e.g. behind an unexpected
    # prefix): the declared route runs the same endpoint, the app's middleware counts it.
    app.direct_posts["/classify"] = endpoint
    app.guard(settings.trusted_hosts, settings.cors_origins)
    return app


# How long a thread waiting for the GIL lets the holder run before asking it to drop the GIL
# (CPython's default is 5 ms). After each onnxruntime run the batching thread needs the GIL back
# for a moment (outputs, handing results to the event loop) while the event loop holds it; with
# 5 ms it could idle the model that long per batch. 0.5 ms served more requests per second than
# the default, and a shorter interval no more (bench/results/serving-log.md, "Design notes": the
# GIL switch interval).
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
    http_limits.configure_from(settings)  # this worker's connections
    return create_app(settings)
