"""The v2 HTTP routes: server and model health and metadata, and infer.

Errors are v2's: a JSON body `{"error": "<what was wrong>"}`, 400 for a bad request (whatever
/classify would answer 400, 415 or 422), 404 for an unknown model or version, 413 past a size
limit, 503 (+ Retry-After) when not ready, overloaded, or cut by a shutdown. Health answers carry no body: 200 for
true, 400 for false (as the protocol says), 404 for a model or version that is not served.
"""

from __future__ import annotations

from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route, request_response

from service.errors import V2_ERRORS, ServiceError, UnknownModelError, render_error
from service.pipeline import Body, Taken, content_headers, serve
from service.registry import ModelRegistry
from service.serving import LoadedModel
from service.settings import Settings
from service.shutdown import SHUTTING_DOWN, AnswerWhenCut
from service.state import AppState, current
from service.v2.infer import Wanted, model_input, model_metadata, outputs
from service.v2.tensors import (
    HEADER_LENGTH,
    InferRequest,
    TensorError,
    parse_request,
    response_body,
)

SERVER_NAME = "isomax-serve"
EXTENSIONS = ["binary_tensor_data"]
_JSON = "application/json"


def _json(body: dict[str, Any]) -> Response:
    return Response(orjson.dumps(body), media_type=_JSON)


def _resolve(request: Request, state: AppState) -> LoadedModel:
    """The model of `/v2/models/{model_name}[/versions/{model_version}]`."""
    name: str = request.path_params["model_name"]
    version: str | None = request.path_params.get("model_version")
    if version is not None and not version.isdigit():
        raise UnknownModelError(f"unknown version {version[:40]!r} of model {name[:64]!r}")
    return state.registry.resolve(name, version)


def _versions(registry: ModelRegistry, name: str) -> list[str]:
    ready = [st.ref.version for st in registry.statuses.values() if st.ref.name == name]
    ready = [v for v in ready if registry.statuses[f"{name}:{v}"].status == "ready"]
    return sorted(ready, key=int, reverse=True)


class V2Routes:
    """The v2 endpoints (Starlette request handlers: bound methods); `settings` say how long a
    refused client should wait (Retry-After)."""

    def __init__(self, settings: Settings) -> None:
        self.retry_after = str(settings.retry_after_s)

    def error(self, exc: Exception) -> Response:
        """v2's error answer, by the one renderer (service/errors.py) in v2's shape."""
        error = render_error(exc, V2_ERRORS)
        headers = {"Retry-After": self.retry_after} if error.retry_after else None
        return Response(error.body, error.status, headers, media_type=_JSON)

    async def server_metadata(self, request: Request) -> Response:
        return _json(
            {"name": SERVER_NAME, "version": request.app.version, "extensions": EXTENSIONS}
        )

    async def server_live(self, request: Request) -> Response:
        return Response(status_code=200)

    async def server_ready(self, request: Request) -> Response:
        state = request.app.service
        return Response(status_code=200 if state is not None and state.registry.ready else 400)

    async def model_ready(self, request: Request) -> Response:
        try:
            _resolve(request, current(request.app))
        except UnknownModelError as e:
            return self.error(e)
        except ServiceError:  # loading, failed, or the service is starting: not ready
            return Response(status_code=400)
        return Response(status_code=200)

    async def model_meta(self, request: Request) -> Response:
        try:
            state = current(request.app)
            model = _resolve(request, state)
            return _json(model_metadata(model, _versions(state.registry, model.name)))
        except Exception as e:
            return self.error(e)

    async def model_infer(self, request: Request) -> Response:
        try:
            state = current(request.app)
            model = _resolve(request, state)
            encoding = request.headers.get("content-encoding", "identity").lower()
            if encoding != "identity":
                raise TensorError(f"Content-Encoding {encoding!r} is not supported")
            settings = state.settings

            async def take(body: Body, model: LoadedModel) -> Taken[tuple[InferRequest, Wanted]]:
                limit = settings.max_body_bytes
                body.expect(content_headers(request.scope)[1], limit)
                chunks = await body.read(limit, f"the request body exceeds {limit} bytes")
                parsed = parse_request(b"".join(chunks), request.headers.get(HEADER_LENGTH))
                x, wanted, files = await model_input(parsed, model, settings)
                return Taken(x, files, (parsed, wanted))

            served = await serve(state, model, Body(request.receive, state.bodies), take)
            (parsed, wanted) = served.taken.request
            content, json_length = response_body(*outputs(parsed, model, wanted, served))
        except Exception as e:
            return self.error(e)
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
    v2 = V2Routes(settings)
    cut = orjson.dumps({"error": SHUTTING_DOWN})
    infer = AnswerWhenCut(request_response(v2.model_infer), cut, settings.retry_after_s)
    out: list[BaseRoute] = [
        Route("/v2", v2.server_metadata, methods=["GET"]),
        Route("/v2/health/live", v2.server_live, methods=["GET"]),
        Route("/v2/health/ready", v2.server_ready, methods=["GET"]),
    ]
    for prefix in ("/v2/models/{model_name}", "/v2/models/{model_name}/versions/{model_version}"):
        out += [
            Route(prefix, v2.model_meta, methods=["GET"]),
            Route(prefix + "/ready", v2.model_ready, methods=["GET"]),
            Route(prefix + "/infer", infer, methods=["POST"]),
        ]
    return out
