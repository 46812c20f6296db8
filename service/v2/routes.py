"""The v2 HTTP routes: server and model health and metadata, and infer.

Errors are v2's: a JSON body `{"error": "<what was wrong>"}`, 400 for a bad request (whatever
/classify would answer 400, 415 or 422), 404 for an unknown model or version, 413 past a size
limit, 503 (+ Retry-After) when not ready, overloaded, or cut by a shutdown. Health answers carry no body: 200 for
true, 400 for false (as the protocol says), 404 for a model or version that is not served.
"""

from __future__ import annotations

import logging
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route, request_response

from service.admission import BodyBudget, Reservation
from service.errors import (
    RETRY_AFTER,
    NotReadyError,
    PayloadTooLargeError,
    ServiceError,
    UnknownModelError,
    error_detail,
    error_status,
)
from service.registry import ModelRegistry
from service.serving import LoadedModel
from service.settings import Settings
from service.shutdown import SHUTTING_DOWN, AnswerWhenCut
from service.v2.infer import model_input, model_metadata, run
from service.v2.tensors import HEADER_LENGTH, TensorError, parse_request, response_body

log = logging.getLogger(__name__)

SERVER_NAME = "isomax-serve"
EXTENSIONS = ["binary_tensor_data"]
_JSON = "application/json"


def _error(exc: Exception, settings: Settings) -> Response:
    status = error_status(exc)
    if status in (415, 422):
        status = 400  # v2: every malformed request is a 400
    if status == 500 and not isinstance(exc, ServiceError):
        log.exception("v2 request failed")
        detail = f"internal error ({type(exc).__name__})"
    else:
        detail = error_detail(exc)
    headers = {"Retry-After": str(settings.retry_after_s)} if isinstance(exc, RETRY_AFTER) else None
    return Response(orjson.dumps({"error": detail}), status, headers, media_type=_JSON)


def _json(body: dict[str, Any]) -> Response:
    return Response(orjson.dumps(body), media_type=_JSON)


def _registry(request: Request) -> ModelRegistry:
    registry: ModelRegistry | None = getattr(request.app.state, "registry", None)
    if registry is None:
        raise NotReadyError("the service is starting")
    return registry


def _resolve(request: Request) -> LoadedModel:
    """The model of `/v2/models/{model_name}[/versions/{model_version}]`."""
    name: str = request.path_params["model_name"]
    version: str | None = request.path_params.get("model_version")
    if version is not None and not version.isdigit():
        raise UnknownModelError(f"unknown version {version[:40]!r} of model {name[:64]!r}")
    return _registry(request).resolve(name, version)


def _versions(registry: ModelRegistry, name: str) -> list[str]:
    ready = [st.ref.version for st in registry.statuses.values() if st.ref.name == name]
    ready = [v for v in ready if registry.statuses[f"{name}:{v}"].status == "ready"]
    return sorted(ready, key=int, reverse=True)


async def server_metadata(request: Request) -> Response:
    return _json({"name": SERVER_NAME, "version": request.app.version, "extensions": EXTENSIONS})


async def server_live(request: Request) -> Response:
    return Response(status_code=200)


async def server_ready(request: Request) -> Response:
    registry = getattr(request.app.state, "registry", None)
    return Response(status_code=200 if registry is not None and registry.ready else 400)


async def model_ready(request: Request) -> Response:
    try:
        _resolve(request)
    except UnknownModelError as e:
        return _error(e, request.app.state.settings)
    except ServiceError:  # loading, failed, or the service is starting: not ready
        return Response(status_code=400)
    return Response(status_code=200)


async def model_meta(request: Request) -> Response:
    settings: Settings = request.app.state.settings
    try:
        model = _resolve(request)
        return _json(model_metadata(model, _versions(_registry(request), model.name)))
    except Exception as e:
        return _error(e, settings)


async def _read_body(request: Request, limit: int, reservation: Reservation) -> bytes:
    """The body, within `limit`; its bytes taken from the process's in-flight budget as they
    arrive, a Content-Length that does not fit refused first, as /classify does."""
    header = request.headers.get("content-length")
    length = int(header) if header is not None and header.isdigit() else None
    if length is not None:
        if length > limit:
            raise PayloadTooLargeError(f"the request body is {length} bytes; the limit is {limit}")
        reservation.check(length)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLargeError(f"the request body exceeds {limit} bytes")
        reservation.take(len(chunk))
        chunks.append(chunk)
    return b"".join(chunks)


def _body_budget(request: Request, settings: Settings) -> BodyBudget:
    """The in-flight body budget shared with /classify (one per process)."""
    budget: BodyBudget | None = getattr(request.app.state, "body_budget", None)
    if budget is None:  # an app without /classify's endpoint: a budget of its own
        budget = request.app.state.body_budget = BodyBudget(settings.max_inflight_body_bytes)
    return budget


async def model_infer(request: Request) -> Response:
    settings: Settings = request.app.state.settings
    try:
        model = _resolve(request)
        with model.lease():  # a hot swap retires this version only after the answer
            encoding = request.headers.get("content-encoding", "identity").lower()
            if encoding != "identity":
                raise TensorError(f"Content-Encoding {encoding!r} is not supported")
            # As /classify: a full queue or body budget refuses before the body is read.
            model.batcher.admit()
            reservation = Reservation(_body_budget(request, settings))
            try:
                body = await _read_body(request, settings.max_body_bytes, reservation)
                parsed = parse_request(body, request.headers.get(HEADER_LENGTH))
                x, wanted, files = await model_input(parsed, model, settings)
            finally:
                model.batcher.release()
                reservation.release()
            state = request.app.state
            answer = await run(parsed, model, x, wanted, state.metrics, state.capture, files)
            content, json_length = response_body(*answer)
    except Exception as e:
        return _error(e, settings)
    if json_length is None:
        return Response(content, media_type=_JSON)
    return Response(
        content,
        media_type="application/octet-stream",
        headers={"Inference-Header-Content-Length": str(json_length)},
    )


def routes(settings: Settings) -> list[BaseRoute]:
    """Every v2 route, with and without a version in the path.

    Infer, cut by the graceful-shutdown timeout, answers a v2 error 503 (service/shutdown.py).
    """
    cut = orjson.dumps({"error": SHUTTING_DOWN})
    infer = AnswerWhenCut(request_response(model_infer), cut, settings.retry_after_s)
    out: list[BaseRoute] = [
        Route("/v2", server_metadata, methods=["GET"]),
        Route("/v2/health/live", server_live, methods=["GET"]),
        Route("/v2/health/ready", server_ready, methods=["GET"]),
    ]
    for prefix in ("/v2/models/{model_name}", "/v2/models/{model_name}/versions/{model_version}"):
        out += [
            Route(prefix, model_meta, methods=["GET"]),
            Route(prefix + "/ready", model_ready, methods=["GET"]),
            Route(prefix + "/infer", infer, methods=["POST"]),
        ]
    return out
