"""Domain errors and the one table that maps them to HTTP status codes.

Routes and the batcher raise these (or the preprocessing errors); `error_status` is the only
place that knows their status codes, and `error_body` the only place that formats them.
"""

from __future__ import annotations

from collections.abc import Sequence
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


def validation_detail(errors: Sequence[Any]) -> str:
    """pydantic / FastAPI validation errors -> one line naming each bad field, for a 422."""
    parts = []
    for err in errors:
        loc = ".".join(str(x) for x in err.get("loc", ()) if x not in ("query", "body"))
        msg = err.get("msg", "invalid")
        parts.append(f"{loc}: {msg}" if loc else msg)
    return "; ".join(parts) or "invalid request"
