"""Domain errors, the one table that maps them to HTTP status codes, and the one renderer.

Routes and the batcher raise these (or the preprocessing errors); `error_status` is the only
place that knows their status codes, and `render_error` the only place that turns an error into
an answer: for POST /classify, for v2 (its own body shape, `V2_ERRORS`) and for the FastAPI
routes' exception handlers alike.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson

from isomax.contract.decode import ImageDecodeError, ImageTooLargeError


class ServiceError(Exception):
    """Base class; `detail` is what the client reads, so it names the value that was wrong."""

    default_detail = "request failed"

    def __init__(self, detail: str | None = None) -> None:
        self.detail = detail or self.default_detail
        super().__init__(self.detail)


class BadImageError(ServiceError):
    default_detail = "the image could not be decoded"


class PayloadTooLargeError(ServiceError):
    default_detail = "the request is too large"


class UnsupportedMediaTypeError(ServiceError):
    default_detail = (
        "send images as multipart/form-data parts named 'file', or one image as the raw body "
        "with an image/* content type"
    )


class InvalidParameterError(ServiceError):
    default_detail = "invalid parameter"


class UnknownModelError(ServiceError):
    default_detail = "unknown model"


class NotReadyError(ServiceError):
    default_detail = "the service is not ready"


class ModelUnavailableError(ServiceError):
    """The model (or version) failed to load and nothing will change that until its files do.

    503 like NotReadyError, but without Retry-After: retrying the same request will not help.
    """

    default_detail = "the model failed permanently"


class OverloadedError(ServiceError):
    default_detail = "the queue is full; retry later"


class InferenceError(ServiceError):
    default_detail = "inference failed"


STATUS: dict[type[Exception], int] = {
    ImageDecodeError: 400,
    BadImageError: 400,
    UnknownModelError: 404,
    ImageTooLargeError: 413,
    PayloadTooLargeError: 413,
    UnsupportedMediaTypeError: 415,
    InvalidParameterError: 422,
    NotReadyError: 503,
    ModelUnavailableError: 503,
    OverloadedError: 503,
    InferenceError: 500,
}
# 503s tell the client when to come back.
RETRY_AFTER = (NotReadyError, OverloadedError)


def error_status(exc: Exception) -> int:
    for cls in type(exc).__mro__:
        if cls in STATUS:
            return STATUS[cls]
    return 500


def error_detail(exc: Exception) -> str:
    if isinstance(exc, ServiceError):
        return exc.detail
    return str(exc) or type(exc).__name__


def error_body(detail: str) -> bytes:
    return orjson.dumps({"detail": detail})


log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ErrorShape:
    """How one API writes its errors: the JSON key of the message and the statuses it folds.

    `name` goes into the log line of an unexpected exception (whose answer is a generic 500).
    """

    name: str
    key: str = "detail"
    folded: Mapping[int, int] = field(default_factory=dict)


# POST /classify and the FastAPI routes: `{"detail": ...}` with the table's status.
DETAIL_ERRORS = ErrorShape("POST /classify")
# Open Inference Protocol v2: `{"error": ...}`, and every malformed request is a 400.
V2_ERRORS = ErrorShape("v2 request", key="error", folded={415: 400, 422: 400})


@dataclass(frozen=True, slots=True)
class ErrorAnswer:
    """An error as an answer: status, JSON body, and whether it carries Retry-After."""

    status: int
    body: bytes
    retry_after: bool


def render_error(exc: Exception, shape: ErrorShape = DETAIL_ERRORS) -> ErrorAnswer:
    """The answer to `exc` in `shape`; an exception that is no domain error is logged with its
    traceback and answered as a 500 naming only its type (its message may hold internals)."""
    status = error_status(exc)
    status = shape.folded.get(status, status)
    if status == 500 and not isinstance(exc, ServiceError):
        log.error("%s failed", shape.name, exc_info=exc)
        detail = f"internal error ({type(exc).__name__})"
    else:
        detail = error_detail(exc)
    return ErrorAnswer(status, orjson.dumps({shape.key: detail}), isinstance(exc, RETRY_AFTER))


def validation_detail(errors: Sequence[Any]) -> str:
    """pydantic / FastAPI validation errors -> one line naming each bad field, for a 422."""
    parts = []
    for err in errors:
        loc = ".".join(str(x) for x in err.get("loc", ()) if x not in ("query", "body"))
        msg = err.get("msg", "invalid")
        parts.append(f"{loc}: {msg}" if loc else msg)
    return "; ".join(parts) or "invalid request"
