"""POST /classify: request body -> images -> batcher -> JSON, as one ASGI endpoint.

Why a plain ASGI callable rather than a FastAPI route function: on the 2-core development
machine FastAPI's per-request machinery (request/response wrappers, dependency solving, the
route's exception and exit-stack layers) cost ~100-150 us of CPU per request, more than the
rest of the work for a 28x28 image (docs/serving.md has the measurements). `ServiceApp`
(app.py) sends POST /classify here before FastAPI's middleware and router; the query is
validated by one pydantic declaration (`ClassifyQuery`), from which `openapi_operation` also
documents it. The endpoint catches its own errors (one JSON body per error, service/errors.py).

Multipart bodies are parsed with python-multipart's streaming parser (the library Starlette
uses), collecting parts in memory with our limits, instead of `Request.form()`: that spools
every file into a temporary file object, decodes parts without a filename as text, and reports
"too many files" as a 400.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl

import numpy as np
import orjson
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic.json_schema import models_json_schema
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.types import Message, Receive, Scope, Send

from isomax.contract.decode import (
    ImageDecodeError,
    ImageTooLargeError,
    decoded_bytes,
    image_to_uint8,
    open_header,
)
from isomax.contract.manifest import Preprocess
from isomax.contract.plain_png import decoded_bytes as plain_decoded_bytes
from isomax.contract.plain_png import plain_png_uint8
from service import memory
from service.admission import BodyBudget, DecodeBudget, Reservation
from service.batching import verdict_columns
from service.errors import (
    RETRY_AFTER,
    BadImageError,
    InvalidParameterError,
    PayloadTooLargeError,
    ServiceError,
    UnsupportedMediaTypeError,
    error_body,
    error_detail,
    error_status,
    validation_detail,
)
from service.loading import LoadedBundle
from service.metrics import PrometheusMetrics
from service.registry import ModelRegistry
from service.schemas import ClassifyResponse, ErrorResponse
from service.serving import LoadedModel
from service.settings import Settings
from service.shutdown import SHUTTING_DOWN, answer_cut, cut_headers

log = logging.getLogger(__name__)

FORM_FIELD = "file"
DEFAULT_TOP_K = 3
_JSON = (b"content-type", b"application/json")


@dataclass
class Upload:
    filename: str | None
    data: bytes


# An upload after its header step: a plain PNG's pixels, or an image with only its header read.
Item = np.ndarray | Image.Image


def _is_image_type(ctype: bytes) -> bool:
    return ctype.startswith(b"image/") or ctype == b"application/octet-stream"


class ClassifyQuery(BaseModel):
    """The query of POST /classify: the one declaration that validates it and documents it.

    The endpoint validates the query string with this model, and `openapi_operation` builds the
    OpenAPI parameters from its JSON schema, so the two cannot drift apart. `top_k` has no upper
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


class _MultipartCollector:
    """python-multipart callbacks that keep every part named `file` in memory, within limits."""

    def __init__(self, max_images: int, max_image_bytes: int) -> None:
        self.max_images = max_images
        self.max_image_bytes = max_image_bytes
        self.uploads: list[Upload] = []
        self._chunks: list[bytes] = []
        self._size = 0
        self._headers: dict[bytes, bytes] = {}
        self._field = b""
        self._value = b""
        self._filename: str | None = None

    def callbacks(self) -> dict[str, Any]:
        return {
            "on_part_begin": self.on_part_begin,
            "on_header_field": self.on_header_field,
            "on_header_value": self.on_header_value,
            "on_header_end": self.on_header_end,
            "on_headers_finished": self.on_headers_finished,
            "on_part_data": self.on_part_data,
            "on_part_end": self.on_part_end,
        }

    def on_part_begin(self) -> None:
        self._headers = {}
        self._chunks = []
        self._size = 0

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._field += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._value += data[start:end]

    def on_header_end(self) -> None:
        self._headers[self._field.lower()] = self._value
        self._field, self._value = b"", b""

    def on_headers_finished(self) -> None:
        _, options = parse_options_header(self._headers.get(b"content-disposition", b""))
        name = options.get(b"name", b"").decode("utf-8", "replace")
        filename = options.get(b"filename")
        self._filename = filename.decode("utf-8", "replace") if filename is not None else None
        if name != FORM_FIELD:
            raise InvalidParameterError(
                f"unexpected form field {name!r}: send each image as a part named {FORM_FIELD!r}"
            )
        if len(self.uploads) >= self.max_images:
            raise PayloadTooLargeError(
                f"too many images: the limit is {self.max_images} per request"
            )
        ctype = self._headers.get(b"content-type", b"").split(b";", 1)[0].strip().lower()
        if ctype and not _is_image_type(ctype):
            raise UnsupportedMediaTypeError(
                f"part {len(self.uploads) + 1} ({self._filename!r}) has content type "
                f"{ctype.decode('latin-1')!r}; expected image/* or application/octet-stream"
            )

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        self._size += end - start
        if self._size > self.max_image_bytes:
            raise PayloadTooLargeError(
                f"image {len(self.uploads) + 1} ({self._filename!r}) is larger than "
                f"{self.max_image_bytes} bytes"
            )
        self._chunks.append(data[start:end])

    def on_part_end(self) -> None:
        self.uploads.append(Upload(self._filename, b"".join(self._chunks)))
        self._chunks = []


def _content_headers(scope: Scope) -> tuple[bytes, int | None]:
    """(Content-Type, Content-Length or None) of the request."""
    ctype, length = b"", None
    for key, value in scope["headers"]:
        if key == b"content-type":
            ctype = value
        elif key == b"content-length":
            try:
                length = int(value)
            except ValueError:
                length = None
    return ctype, length


# RFC 2046 section 5.1.1: a boundary is 1 to 70 characters. python-multipart refuses only
# beyond 256 (and did so outside any error handling: a 500), so the RFC's bound is checked here.
MAX_BOUNDARY_CHARS = 70


def _boundary(options: dict[bytes, bytes]) -> bytes:
    """The multipart boundary of the Content-Type options; BadImageError (400) if unusable."""
    boundary = options.get(b"boundary")
    if not boundary:
        raise BadImageError("multipart/form-data without a boundary")
    if len(boundary) > MAX_BOUNDARY_CHARS:
        raise BadImageError(
            f"the multipart boundary is {len(boundary)} characters; RFC 2046 allows at most "
            f"{MAX_BOUNDARY_CHARS}"
        )
    return boundary


async def read_uploads(
    scope: Scope, receive: Receive, settings: Settings, reservation: Reservation
) -> list[Upload]:
    """The images of a request, raw body or multipart; limits enforced while reading.

    The body's bytes are taken from the process's budget (`reservation`) as they arrive; a
    Content-Length that does not fit in what is free is refused first (service/admission.py).
    """
    raw_ctype, length = _content_headers(scope)
    ctype, options = parse_options_header(raw_ctype)
    if ctype == b"multipart/form-data":
        limit = settings.max_body_bytes
    elif _is_image_type(ctype):
        limit = settings.max_image_bytes
    elif length == 0 or (not ctype and length is None):
        raise BadImageError("the request body is empty: send an image")
    else:
        raise UnsupportedMediaTypeError(
            f"content type {ctype.decode('latin-1') or '(none)'!r} is not an image: send "
            f"multipart/form-data with parts named {FORM_FIELD!r}, or one image as the raw "
            "body with an image/* content type"
        )
    if length is not None and length > limit:
        raise PayloadTooLargeError(f"the request body is {length} bytes; the limit is {limit}")
    if length is not None:
        reservation.check(length)

    if ctype == b"multipart/form-data":
        boundary = _boundary(options)
        collector = _MultipartCollector(settings.max_images_per_request, settings.max_image_bytes)
        size = 0
        try:
            parser = MultipartParser(boundary, collector.callbacks())  # type: ignore[arg-type]
            while True:
                message = await receive()
                chunk = message.get("body", b"")
                size += len(chunk)
                if size > limit:
                    raise PayloadTooLargeError(f"the request body exceeds {limit} bytes")
                if chunk:
                    reservation.take(len(chunk))
                    parser.write(chunk)
                if not message.get("more_body", False):
                    break
            parser.finalize()
        except FormParserError as e:
            raise BadImageError(f"malformed multipart body: {e}") from None
        if not collector.uploads:
            raise InvalidParameterError(
                f"the form has no image: send each image as a part named {FORM_FIELD!r}"
            )
        return collector.uploads

    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        chunk = message.get("body", b"")
        if chunk:
            size += len(chunk)
            if size > limit:
                raise PayloadTooLargeError(f"the image is larger than {limit} bytes")
            reservation.take(len(chunk))
            chunks.append(chunk)
        if not message.get("more_body", False):
            break
    data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
    if not data:
        raise BadImageError("the request body is empty: send an image")
    return [Upload(None, data)]


# Uploads larger than this have their header parsed in the decode pool, not on the event loop:
# Pillow parses a file's structure in Python, one step per chunk, segment or strip, so even
# within isomax/contract/structure.py's bounds a large file can cost the loop a few hundred ms,
# and a thread hand-off (~50-100 us) is nothing next to decoding such a file. A 28x28 PNG is
# ~400 bytes, a 224x224 JPEG ~20 KB: the usual request stays on the loop.
INLINE_OPEN_MAX_BYTES = 64 * 1024


def _open_upload(up: Upload, spec: Preprocess, settings: Settings) -> tuple[Item, int]:
    """(plain PNG pixels or a header-parsed image, its decoded bytes); nothing else decoded."""
    arr = plain_png_uint8(
        up.data, spec, settings.max_image_pixels, settings.max_image_decoded_bytes
    )
    if arr is not None:
        return arr, plain_decoded_bytes(spec.width, spec.height, spec.color_mode)
    img = open_header(up.data, settings.max_image_pixels, settings.max_image_decoded_bytes, spec)
    return img, decoded_bytes(img)


async def decode_uploads(
    uploads: list[Upload], model: LoadedModel, settings: Settings
) -> np.ndarray:
    """Images -> uint8 [n, C, H, W], exactly `decode_uint8` of each (the batcher turns them
    into the float input, as `decode` does).

    Small images are decoded on the event loop (a 28x28 PNG takes ~0.1 ms, less than a thread
    hand-off); larger ones in the default thread pool so that they never stall other requests,
    and so are the headers of large files (INLINE_OPEN_MAX_BYTES).
    """
    spec = model.manifest.preprocess
    arrays: list[np.ndarray] = []
    loop = asyncio.get_running_loop()

    def failed(i: int, up: Upload, e: Exception) -> ServiceError:
        what = f"image {i} ({up.filename!r}): " if len(uploads) > 1 or up.filename else ""
        cls = PayloadTooLargeError if isinstance(e, ImageTooLargeError) else BadImageError
        return cls(what + str(e))

    # Plain PNGs at the model's size decode at once (libspng, isomax/contract/plain_png.py:
    # the same array as Pillow's, ~8x cheaper). For the others, every header first (no pixel
    # decoded yet): the request's decoded size is known before any of them costs memory or CPU.
    items: list[Item] = []
    total = 0
    for i, up in enumerate(uploads, 1):
        try:
            if len(up.data) <= INLINE_OPEN_MAX_BYTES:
                item, size = _open_upload(up, spec, settings)
            else:
                item, size = await loop.run_in_executor(None, _open_upload, up, spec, settings)
        except (ImageDecodeError, ImageTooLargeError) as e:
            raise failed(i, up, e) from e
        total += size
        items.append(item)
    if total > settings.max_request_decoded_bytes:
        raise PayloadTooLargeError(
            f"the {len(uploads)} images decode to {total} bytes; the limit is "
            f"{settings.max_request_decoded_bytes} per request"
        )
    for i, (up, item) in enumerate(zip(uploads, items, strict=True), 1):
        if isinstance(item, np.ndarray):
            arrays.append(item)
            continue
        try:
            if item.width * item.height <= settings.inline_decode_max_pixels:
                arr = image_to_uint8(item, spec)
            else:
                arr = await _decode_in_pool(item, spec, settings)
        except (ImageDecodeError, ImageTooLargeError) as e:
            raise failed(i, up, e) from e
        arrays.append(arr)
    # uint8: the batcher converts whole batches to the float input (isomax.contract.to_float).
    return arrays[0][None] if len(arrays) == 1 else np.stack(arrays)


_decode_budgets: dict[int, DecodeBudget] = {}  # by limit: one per process and setting


def _decoded_then_trimmed(img: Image.Image, spec: Preprocess) -> np.ndarray:
    """`image_to_uint8` in a pool thread; the decoded image's memory then goes back to the OS
    (service/memory.py), once the image is no longer referenced."""
    try:
        return image_to_uint8(img, spec)
    finally:
        img.close()  # the pixels are freed here, not when the request's items are dropped
        memory.trim()


async def _decode_in_pool(img: Image.Image, spec: Preprocess, settings: Settings) -> np.ndarray:
    """Decode in the default pool within the process's decoded-bytes budget (DecodeBudget)."""
    limit = settings.max_inflight_decoded_bytes
    budget = _decode_budgets.get(limit) or _decode_budgets.setdefault(limit, DecodeBudget(limit))
    held = await budget.acquire(decoded_bytes(img))
    try:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(None, _decoded_then_trimmed, img, spec)
    finally:
        budget.release(held)


def response_body(model: LoadedModel, results: list[dict[str, Any]]) -> bytes:
    body = {"model": model.name, "version": model.version, "results": results}
    # orjson: the same bytes as json.dumps(separators=(",", ":")), 13 us -> 0.8 us here.
    return orjson.dumps(body)


def result_rows(
    model: LoadedBundle, uploads: list[Upload], logits: np.ndarray, distance: np.ndarray, top_k: int
) -> tuple[list[dict[str, Any]], int]:
    """One result per image and the number of OOD images.

    Plain Python over `.tolist()` rows: for the usual handful of images per request it is ~2x
    cheaper than vectorised numpy, whose per-call overhead dominates on [1, 10] arrays.
    probability = softmax(logits / temperature) in float64, softmax(logits) for a bundle without a
    temperature; ties keep the lower class index first (as argmax).
    The verdict is `Thresholds.judge` on the served score, the rule training's evaluation uses
    too; a bundle serving a score other than min_distance adds it as `score` (docs/api.md).
    """
    labels = model.labels
    temperature = model.temperature
    rows_of_logits = logits.tolist()
    scored = distance.ndim == 2  # the bundle serves another score: a `score` field per image
    min_distance, score = verdict_columns(distance)
    distances, scores = min_distance.tolist(), score.tolist()
    predicted = [row.index(max(row)) for row in rows_of_logits]  # argmax: first of ties
    thresholds, flags = model.thresholds.judge(predicted, scores)
    n_ood = sum(flags)
    results = []
    rows = zip(uploads, rows_of_logits, distances, scores, thresholds, flags, strict=True)
    for up, row, d, s, t, is_ood in rows:
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
    return results, n_ood


class ClassifyEndpoint:
    """The ASGI app of POST /classify. `state` is the app's state (registry set at start-up).

    Called directly (service/app.py `add_direct_post`), it also does what middleware does for
    the routed endpoints, without their extra coroutine and `send` wrapper per request (~15 us
    of the event loop's ~170 per request in-process, docs/serving.md): it counts its requests
    in `isomax_requests_total` and the latency histogram, and answers a request cut by the
    graceful-shutdown timeout with the JSON 503 of service/shutdown.py. `routed` is the same
    endpoint for the router, whose middleware counts the request already.
    """

    def __init__(self, state: Any, settings: Settings, metrics: PrometheusMetrics) -> None:
        self.state = state
        self.settings = settings
        self.metrics = metrics
        self.bodies = BodyBudget(settings.max_inflight_body_bytes)
        self._cut_body = error_body(SHUTTING_DOWN)
        self._cut_headers = cut_headers(self._cut_body, settings.retry_after_s)
        self.routed = _Uncounted(self)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        start = time.perf_counter()
        status = 500
        try:
            status = await self._answer(scope, receive, send)
        except asyncio.CancelledError:
            status = 503  # answered by answer_cut (below), as the shutdown middleware would
            raise
        finally:
            self.metrics.observe_request("/classify", status, time.perf_counter() - start)

    async def _answer(self, scope: Scope, receive: Receive, send: Send) -> int:
        """Answer one request; the status sent."""
        body_done = False

        async def receive_body() -> Message:
            nonlocal body_done
            message = await receive()
            body_done = not message.get("more_body", False)
            return message

        try:
            body = await self.classify(scope, receive_body)
        except asyncio.CancelledError:
            # Cut by the graceful-shutdown timeout before an answer (service/shutdown.py).
            await answer_cut(send, self._cut_body, self._cut_headers)
            raise
        except Exception as e:
            status = error_status(e)
            if status == 500 and not isinstance(e, ServiceError):
                log.exception("POST /classify failed")
                detail = f"internal error ({type(e).__name__})"
            else:
                detail = error_detail(e)
            headers = [_JSON]
            if isinstance(e, RETRY_AFTER):
                headers.append((b"retry-after", str(self.settings.retry_after_s).encode()))
            if not body_done:  # refused before the body was read: do not read the rest of it
                headers.append((b"connection", b"close"))
            await _respond(send, status, error_body(detail), headers)
            return status
        await _respond(send, 200, body, [_JSON])
        return 200

    async def classify(self, scope: Scope, receive: Receive) -> bytes:
        registry: ModelRegistry = self.state.registry
        query = ClassifyQuery.parse(scope["query_string"])
        model, top_k = registry.resolve(query.model, query.version), query.top_k
        with model.lease():  # a hot swap retires this version only after the answer
            # top_k above the model's number of labels lists them all: any top_k >= 1 that
            # the OpenAPI document allows is served (one document for models of any size).
            batcher = model.batcher
            batcher.admit()  # a full queue refuses here, before the body is read
            reservation = Reservation(self.bodies)
            try:
                uploads = await read_uploads(scope, receive, self.settings, reservation)
                x = await decode_uploads(uploads, model, self.settings)
            finally:
                batcher.release()
                reservation.release()
            logits, distance = await batcher.submit(x)
        results, n_ood = result_rows(model, uploads, logits, distance, top_k)
        self.metrics.observe_images(
            model.name, verdict_columns(distance)[0].tolist(), n_ood, len(uploads)
        )
        capture = self.state.capture
        if capture is not None:
            capture.offer(model.name, model.version, [u.data for u in uploads], results)
        return response_body(model, results)


class _Uncounted:
    """The endpoint without its own request count, for the router (whose middleware counts).
    An object, not a bound method: starlette's Route treats functions as request handlers."""

    def __init__(self, endpoint: ClassifyEndpoint) -> None:
        self.endpoint = endpoint

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.endpoint._answer(scope, receive, send)


async def _respond(
    send: Send, status: int, body: bytes, headers: list[tuple[bytes, bytes]]
) -> None:
    headers.append((b"content-length", str(len(body)).encode()))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


# -- OpenAPI -----------------------------------------------------------------------------------

_ERROR_RESPONSES = {
    400: "An image could not be decoded.",
    404: "Unknown model.",
    413: "Too many bytes, pixels or images.",
    415: "The body is not an image type.",
    422: "Bad parameters or form fields.",
    503: "Not ready, or the queue is full; see the Retry-After header.",
}


def openapi_operation(max_images: int | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the OpenAPI operation of POST /classify, the component schemas it refers to).

    `max_images`: the server's ISOMAX_MAX_IMAGES_PER_REQUEST, documented as maxItems.

    Built from the same declarations the endpoint runs on: `ClassifyQuery` for the parameters,
    the response models of service/schemas.py for the answers.
    """
    _, top = models_json_schema(
        [(ClassifyResponse, "serialization"), (ErrorResponse, "serialization")],
        ref_template="#/components/schemas/{model}",
    )
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

    def ref(model: type[BaseModel]) -> dict[str, Any]:
        return {"application/json": {"schema": {"$ref": f"#/components/schemas/{model.__name__}"}}}

    responses: dict[str, Any] = {
        "200": {
            "description": "One result per image, in request order.",
            "content": ref(ClassifyResponse),
        }
    }
    for status, description in _ERROR_RESPONSES.items():
        responses[str(status)] = {"description": description, "content": ref(ErrorResponse)}
    operation = {
        "summary": "Classify images and say whether each is out of distribution.",
        "operationId": "classify",
        "parameters": parameters,
        "requestBody": {
            "required": True,
            "content": {
                "multipart/form-data": {
                    "schema": {
                        "type": "object",
                        "required": [FORM_FIELD],
                        # any other field is refused (422): say so, so that clients and
                        # schema-driven tests know
                        "additionalProperties": False,
                        "properties": {
                            FORM_FIELD: {
                                "type": "array",
                                "minItems": 1,
                                **({"maxItems": max_images} if max_images else {}),
                                "items": {"type": "string", "format": "binary"},
                                "description": "One part per image, all named `file`; results "
                                "come back in the same order.",
                            }
                        },
                    }
                },
                "image/*": {
                    "schema": {"type": "string", "format": "binary"},
                    "description": "One image as the raw body (PNG, JPEG, WebP, BMP, GIF, ...).",
                },
            },
        },
        "responses": responses,
    }
    return operation, top["$defs"]
