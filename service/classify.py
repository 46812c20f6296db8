"""POST /classify: the query, the answer's rows, and the endpoint (a plain ASGI app).

The request itself goes through the admitted-request pipeline (service/pipeline.py): this
module supplies the two steps that are /classify's own, reading and decoding the images
(`take`, service/uploads.py) and writing the JSON answer (`answer_rows`, `response_body`).

Why a plain ASGI endpoint rather than a FastAPI route function: FastAPI's per-request machinery
(request/response wrappers, dependency solving, the route's exception and exit-stack layers, the
middleware stack) costs more CPU than the rest of the work for a 28x28 image; docs/serving.md
("Design notes") has the measurement. `ServiceApp` (app.py) sends POST /classify to
`ClassifyEndpoint` before FastAPI's middleware and router: that is the whole seam. The route
is still declared in FastAPI (`declare`), with the same query model (`ClassifyQuery`), response
models and errors, so OpenAPI is generated from it as for every other route; the declared
route's ASGI app is the same endpoint (it answers when the direct table does not match, e.g.
behind an unexpected path prefix). The endpoint answers its own errors with the one renderer
(`service.errors.render_error`).
"""

from __future__ import annotations

import asyncio
import math
import time
from typing import Any
from urllib.parse import parse_qsl

import numpy as np
import orjson
from fastapi import FastAPI
from fastapi.routing import APIRoute
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.types import Receive, Scope, Send

from service.batching import verdict_columns
from service.errors import InvalidParameterError, error_body, render_error, validation_detail
from service.loading import LoadedBundle
from service.metrics import PrometheusMetrics
from service.pipeline import Body, Judged, Taken, judge, serve
from service.schemas import ClassifyResponse, ErrorResponse
from service.serving import LoadedModel
from service.settings import Settings
from service.shutdown import SHUTTING_DOWN, answer_cut, cut_headers
from service.state import AppState, HasState, current
from service.uploads import FORM_FIELD, Upload, decode_uploads, read_uploads

__all__ = ["ClassifyEndpoint", "ClassifyQuery", "Upload", "decode_uploads", "result_rows"]

DEFAULT_TOP_K = 3
_JSON = (b"content-type", b"application/json")


class ClassifyQuery(BaseModel):
    """The query of POST /classify: the one declaration that validates it and documents it.

    The endpoint validates the query string with this model, and `declare` builds the OpenAPI
    parameters from its JSON schema, so the two cannot drift apart. `top_k` has no upper
    bound: above the model's number of labels, all of them are listed.
    """

    model_config = ConfigDict(extra="ignore", frozen=True)

    model: str | None = Field(
        default=None,
        max_length=80,  # name (64) + ":" + version: a longer value names nothing served
        description="`name` (its default version: the highest that loaded) or `name:version`; "
        "optional when one model is served.",
        examples=["fmnist-isomaxplus"],
    )
    version: str | None = Field(
        default=None,
        pattern=r"^[0-9]+$",
        max_length=20,
        description="Pin one loaded version of the model (the same as `model=name:version`).",
        examples=["2"],
    )
    top_k: int = Field(
        default=DEFAULT_TOP_K,
        ge=1,
        description="How many classes to list per image (all of them when it exceeds the "
        "model's number of labels).",
        examples=[3],
    )

    @classmethod
    def parse(cls, query_string: bytes) -> ClassifyQuery:
        """Validate a raw query string (the last value of a repeated key wins)."""
        if not query_string:
            return _DEFAULT_QUERY
        raw = dict(parse_qsl(query_string.decode("latin-1"), keep_blank_values=True))
        if raw.get("model") == "":  # `model=`: none named (`version=` must be a number)
            raw.pop("model")
        try:
            return cls.model_validate(raw)
        except ValidationError as e:
            raise InvalidParameterError(validation_detail(e.errors())) from None


_DEFAULT_QUERY = ClassifyQuery()


def response_body(model: LoadedBundle, results: list[dict[str, Any]]) -> bytes:
    body = {"model": model.name, "version": model.version, "results": results}
    # orjson: the same bytes as json.dumps(separators=(",", ":")), at a fraction of its cost
    # (bench/results/serving-log.md, "Design notes": results in plain Python).
    return orjson.dumps(body)


def answer_rows(
    model: LoadedBundle, uploads: list[Upload], judged: Judged, scored: bool, top_k: int
) -> list[dict[str, Any]]:
    """One result per image: top-k classes with their probabilities, then the verdict.

    probability = softmax(logits / temperature) in float64, softmax(logits) for a bundle without
    a temperature; ties keep the lower class index first (as argmax). A bundle serving a score
    other than min_distance adds it as `score` (docs/api.md).
    """
    labels = model.labels
    temperature = model.temperature
    results = []
    columns = (judged.logits, judged.distances, judged.scores, judged.thresholds, judged.flags)
    for up, row, d, s, t, is_ood in zip(uploads, *columns, strict=True):
        top = max(row)
        if temperature is None:
            e = [math.exp(v - top) for v in row]
        else:  # temperature scaling (the manifest's calibration): the same order, other values
            e = [math.exp((v - top) / temperature) for v in row]
        total = sum(e)
        best = sorted(range(len(e)), key=e.__getitem__, reverse=True)[:top_k]
        result = {
            "filename": up.filename,
            "class_index": best[0],
            "label": labels[best[0]],
            "probability": e[best[0]] / total,
            "top_k": [{"label": labels[j], "probability": e[j] / total} for j in best],
            "min_distance": d,
        }
        if scored:
            result["score"] = s
        result["threshold"] = t
        result["is_ood"] = is_ood
        results.append(result)
    return results


def result_rows(
    model: LoadedBundle, uploads: list[Upload], logits: np.ndarray, distance: np.ndarray, top_k: int
) -> tuple[list[dict[str, Any]], int]:
    """/classify's results for a run's outputs and the number of OOD images (`isomax score`
    writes its rows from these, so a corpus gets the service's answers)."""
    min_distance, score = verdict_columns(distance)
    judged = judge(model, logits, min_distance, score)
    return answer_rows(model, uploads, judged, distance.ndim == 2, top_k), judged.n_ood


async def classify(state: AppState, scope: Scope, body: Body) -> bytes:
    """One request through the pipeline: query -> model -> images -> the JSON answer."""
    query = ClassifyQuery.parse(scope["query_string"])
    model = state.registry.resolve(query.model, query.version)
    settings = state.settings

    async def take(body: Body, model: LoadedModel) -> Taken[list[Upload]]:
        uploads = await read_uploads(scope, body, settings)
        x = await decode_uploads(uploads, model, settings)
        return Taken(x, [u.data for u in uploads], uploads)

    served = await serve(state, model, body, take)
    # top_k above the model's number of labels lists them all: any top_k >= 1 that the OpenAPI
    # document allows is served (one document for models of any size).
    rows = answer_rows(model, served.taken.request, served.judged, served.scored, query.top_k)
    return response_body(model, rows)


class ClassifyEndpoint:
    """The ASGI app of POST /classify, called directly by `ServiceApp` (the seam).

    Called directly, it also does what middleware does for the routed endpoints, without their
    extra coroutine and `send` wrapper per request: it counts its requests in
    `isomax_requests_total` and the latency histogram, and answers a request cut by the
    graceful-shutdown timeout with the JSON 503 of service/shutdown.py. `routed` is the same
    endpoint for the router, whose middleware counts the request already.
    """

    def __init__(self, app: HasState, settings: Settings, metrics: PrometheusMetrics) -> None:
        self.app = app
        self.metrics = metrics
        self._retry_after = str(settings.retry_after_s).encode()
        self._cut_body = error_body(SHUTTING_DOWN)
        self._cut_headers = cut_headers(self._cut_body, settings.retry_after_s)
        self.routed = _Uncounted(self)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        start = time.perf_counter()
        status = 500
        try:
            status = await self.answer(scope, receive, send)
        except asyncio.CancelledError:
            status = 503  # answered by answer_cut (below), as the shutdown middleware would
            raise
        finally:
            self.metrics.observe_request("/classify", status, time.perf_counter() - start)

    async def answer(self, scope: Scope, receive: Receive, send: Send) -> int:
        """Answer one request; the status sent."""
        body: Body | None = None
        try:
            state = current(self.app)
            body = Body(receive, state.bodies)
            content = await classify(state, scope, body)
        except asyncio.CancelledError:
            # Cut by the graceful-shutdown timeout before an answer (service/shutdown.py).
            await answer_cut(send, self._cut_body, self._cut_headers)
            raise
        except Exception as e:
            error = render_error(e)
            headers = [_JSON]
            if error.retry_after:
                headers.append((b"retry-after", self._retry_after))
            if body is None or not body.done:  # refused before the body was read: not read
                headers.append((b"connection", b"close"))
            await _respond(send, error.status, error.body, headers)
            return error.status
        await _respond(send, 200, content, [_JSON])
        return 200


class _Uncounted:
    """The endpoint without its own request count, for the router (whose middleware counts).
    An object, not a bound method: starlette's Route treats functions as request handlers."""

    def __init__(self, endpoint: ClassifyEndpoint) -> None:
        self.endpoint = endpoint

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.endpoint.answer(scope, receive, send)


async def _respond(
    send: Send, status: int, body: bytes, headers: list[tuple[bytes, bytes]]
) -> None:
    headers.append((b"content-length", str(len(body)).encode()))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


# -- The declaration: what OpenAPI documents ----------------------------------------------------

_ERROR_RESPONSES = {
    400: "An image could not be decoded.",
    404: "Unknown model.",
    413: "Too many bytes, pixels or images.",
    415: "The body is not an image type.",
    422: "Bad parameters or form fields.",
    503: "Not ready, or the queue is full; see the Retry-After header.",
}


def _request_body(max_images: int | None) -> dict[str, Any]:
    """The two body forms (FastAPI cannot declare a raw image body, so it is written here)."""
    files = {
        "type": "array",
        "minItems": 1,
        **({"maxItems": max_images} if max_images else {}),
        "items": {"type": "string", "format": "binary"},
        "description": "One part per image, all named `file`; results come back in the same order.",
    }
    # Any other field is refused (422): said, so that clients and schema-driven tests know.
    form = {"type": "object", "required": [FORM_FIELD], "additionalProperties": False}
    return {
        "required": True,
        "content": {
            "multipart/form-data": {"schema": {**form, "properties": {FORM_FIELD: files}}},
            "image/*": {
                "schema": {"type": "string", "format": "binary"},
                "description": "One image as the raw body (PNG, JPEG, WebP, BMP, GIF, ...).",
            },
        },
    }


def _parameters() -> list[dict[str, Any]]:
    """The query parameters, from `ClassifyQuery`'s JSON schema (the model that validates them)."""
    query = ClassifyQuery.model_json_schema()
    parameters = []
    for name, prop in query["properties"].items():
        prop = dict(prop)
        description = prop.pop("description", "")
        examples = prop.pop("examples", None)
        prop.pop("title", None)
        param: dict[str, Any] = {
            "name": name,
            "in": "query",
            "required": name in query.get("required", ()),
            "description": description,
            "schema": prop,
        }
        if examples:
            param["example"] = examples[0]
        parameters.append(param)
    return parameters


async def _declared() -> ClassifyResponse:
    # Never called (the route's ASGI app is the endpoint): FastAPI documents its return type.
    raise NotImplementedError


def declare(app: FastAPI, endpoint: ClassifyEndpoint, max_images: int | None) -> None:
    """Declare POST /classify on `app`'s router, answered by `endpoint` (its routed form)."""
    app.router.add_api_route(
        "/classify",
        _declared,
        methods=["POST"],
        summary="Classify images and say whether each is out of distribution.",
        operation_id="classify",
        response_model=ClassifyResponse,
        responses={
            200: {"description": "One result per image, in request order."},
            **{s: {"model": ErrorResponse, "description": d} for s, d in _ERROR_RESPONSES.items()},
        },
        openapi_extra={"parameters": _parameters(), "requestBody": _request_body(max_images)},
    )
    route = app.router.routes[-1]
    assert isinstance(route, APIRoute) and route.path == "/classify"
    route.app = endpoint.routed
