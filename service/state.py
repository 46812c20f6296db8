"""The application's state: one typed object, made in the lifespan, and the dependency that
hands it to a route.

`AppState` holds everything a request may need that lives as long as the process: settings,
metrics, the model registry, the worker board, the capture writer and the in-flight body budget.
The lifespan (service/lifespan.py) creates it before the first request and sets it on the app
(`ServiceApp.service`); nothing is added to it later. Routes take it as `StateDep` (FastAPI) or
through `current(app)` (the plain ASGI endpoints: POST /classify, v2).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Protocol

from fastapi import Depends, Request

from service.admission import BodyBudget
from service.capture import CaptureWriter
from service.errors import NotReadyError
from service.metrics import PrometheusMetrics
from service.registry import ModelRegistry
from service.settings import Settings
from service.workers import WorkerBoard


@dataclass(frozen=True, slots=True)
class AppState:
    settings: Settings
    metrics: PrometheusMetrics  # the app's own Prometheus registry (made with the app)
    registry: ModelRegistry  # the models being served; loads and reloads in its own thread
    board: WorkerBoard  # model state of every worker process, for /readyz and /models
    capture: CaptureWriter | None  # the capture of flagged inputs, when ISOMAX_CAPTURE_DIR is set
    bodies: BodyBudget  # request-body bytes held by every request in flight (one per process)


class HasState(Protocol):
    """The app (`ServiceApp`): its state once the lifespan has started, else None."""

    service: AppState | None


def current(app: HasState) -> AppState:
    """The app's state; NotReadyError (503) when the lifespan has not started it (a test client
    used without `with`: uvicorn starts the lifespan before it accepts a connection)."""
    state = app.service
    if state is None:
        raise NotReadyError("the service is starting")
    return state


def get_state(request: Request) -> AppState:
    return current(request.app)


StateDep = Annotated[AppState, Depends(get_state)]
