"""The images of a POST /classify request: its body (raw or multipart) -> uploads -> pixels.

`read_uploads` reads the body (through the pipeline's `Body`, service/pipeline.py: size limits
and the in-flight budget); `decode_uploads` turns the uploads into the model's uint8 input with
the manifest-driven decode of isomax/contract/decode.py, which v2's encoded images use too.

Multipart bodies are parsed with python-multipart's streaming parser (the library Starlette
uses), collecting parts in memory with our limits, instead of `Request.form()`: that spools
every file into a temporary file object, decodes parts without a filename as text, and reports
"too many files" as a 400.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.types import Scope

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
from service.admission import DecodeBudget
from service.errors import (
    BadImageError,
    InvalidParameterError,
    PayloadTooLargeError,
    ServiceError,
    UnsupportedMediaTypeError,
)
from service.pipeline import Body, content_headers
from service.serving import LoadedModel
from service.settings import Settings

FORM_FIELD = "file"


@dataclass
class Upload:
    filename: str | None
    data: bytes


# An upload after its header step: a plain PNG's pixels, or an image with only its header read.
Item = np.ndarray | Image.Image


def _is_image_type(ctype: bytes) -> bool:
    return ctype.startswith(b"image/") or ctype == b"application/octet-stream"


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


async def read_uploads(scope: Scope, body: Body, settings: Settings) -> list[Upload]:
    """The images of a request, raw body or multipart; limits enforced while reading.

    The body's bytes are taken from the process's budget as they arrive; a Content-Length that
    does not fit in what is free is refused first (service/admission.py).
    """
    raw_ctype, length = content_headers(scope)
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
    body.expect(length, limit)
    if ctype == b"multipart/form-data":
        return await _read_multipart(body, _boundary(options), limit, settings)
    chunks = await body.read(limit, f"the image is larger than {limit} bytes")
    data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
    if not data:
        raise BadImageError("the request body is empty: send an image")
    return [Upload(None, data)]


async def _read_multipart(
    body: Body, boundary: bytes, limit: int, settings: Settings
) -> list[Upload]:
    collector = _MultipartCollector(settings.max_images_per_request, settings.max_image_bytes)
    try:
        parser = MultipartParser(boundary, collector.callbacks())  # type: ignore[arg-type]
        await body.read(limit, f"the request body exceeds {limit} bytes", parser.write)
        parser.finalize()
    except FormParserError as e:
        raise BadImageError(f"malformed multipart body: {e}") from None
    if not collector.uploads:
        raise InvalidParameterError(
            f"the form has no image: send each image as a part named {FORM_FIELD!r}"
        )
    return collector.uploads


# Uploads larger than this have their header parsed in the decode pool, not on the event loop:
# Pillow parses a file's structure in Python, one step per chunk, segment or strip, so even
# within isomax/contract/structure.py's bounds a large file can hold the loop far longer than a
# thread hand-off costs, and the hand-off is nothing next to decoding such a file (the figures:
# bench/results/serving-log.md, "Measurements behind code choices"). A 28x28 PNG is a few
# hundred bytes, a 224x224 JPEG some tens of KB: the usual request stays on the loop.
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

    Small images are decoded on the event loop (a 28x28 PNG takes less than a thread hand-off:
    bench/results/serving-log.md, "Design notes"); larger ones in the default thread pool so
    that they never stall other requests, and so are the headers of large files
    (INLINE_OPEN_MAX_BYTES).
    """
    spec = model.manifest.preprocess
    arrays: list[np.ndarray] = []
    loop = asyncio.get_running_loop()

    def failed(i: int, up: Upload, e: Exception) -> ServiceError:
        what = f"image {i} ({up.filename!r}): " if len(uploads) > 1 or up.filename else ""
        cls = PayloadTooLargeError if isinstance(e, ImageTooLargeError) else BadImageError
        return cls(what + str(e))

    # Plain PNGs at the model's size decode at once (libspng, isomax/contract/plain_png.py:
    # the same array as Pillow's at a fraction of its cost; bench/results/serving-log.md,
    # "Measurements behind code choices"). For the others, every header first (no pixel
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
