"""GET /healthz, /readyz and /metrics: what an orchestrator and Prometheus poll."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response

from service.schemas import HealthResponse, ModelState, ReadyResponse
from service.state import StateDep
from service.workers import merge_entries

router = APIRouter()
prometheus = APIRouter()  # its own router: OpenAPI lists it after /models and /admin/reload


@router.get("/healthz", response_model=HealthResponse)
async def healthz() -> HealthResponse:
    """The process is alive (says nothing about the models)."""
    return HealthResponse()


@router.get("/readyz", response_model=ReadyResponse, responses={503: {"model": ReadyResponse}})
async def readyz(state: StateDep) -> Response:
    """200 when every configured model has a working version (in every worker), else 503.

    503 carries Retry-After while something is still loading; a model that failed
    permanently (no version of it loads) gets none: waiting will not fix it.
    """
    settings = state.settings
    states = state.board.collect()
    entries = merge_entries(states)
    models = {key: ModelState(**e) for key, e in entries.items()}
    workers = settings.workers if settings.workers > 1 else None
    missing = max(0, settings.workers - len(states))
    if states and not missing and all(s.get("ready") for s in states):
        return JSONResponse(ReadyResponse(ready=True, models=models, workers=workers).model_dump())
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


@prometheus.get("/metrics", response_class=Response)
async def prometheus_metrics(state: StateDep) -> Response:
    """Prometheus metrics in the text exposition format."""
    body, content_type = state.metrics.exposition()
    return Response(body, media_type=content_type)
