"""One file -> the graph's uint8 input, as the service decodes an upload (decode processes).

The steps are those of `service.classify.decode_uploads` for one image, on the contract's
functions: the size of the file against `max_image_bytes`, a plain PNG through libspng, any
other file through `open_header` (the format allow-list, `max_image_pixels` and
`max_image_decoded_bytes` checked from the header, before any pixel is decoded) and then
`image_to_uint8`. A file that fails any of them becomes an error, never an exception: the
message is the one the service's 4xx answer carries.

This module imports the contract and Pillow only, so that the decode processes start fast.
"""

from __future__ import annotations

import io
import os
import stat
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
from PIL import Image

from isomax.contract.decode import (
    FORMATS,
    ImageDecodeError,
    ImageTooLargeError,
    image_to_uint8,
    open_header,
)
from isomax.contract.manifest import Preprocess
from isomax.contract.plain_png import plain_png_uint8


@dataclass(frozen=True)
class Limits:
    """The service's per-image input limits (service/settings.py), in bytes and pixels."""

    max_image_bytes: int
    max_image_pixels: int
    max_image_decoded_bytes: int


@dataclass(frozen=True)
class Meta:
    """What is known about one file besides its pixels; `error` set when it has none."""

    path: str
    width: int | None = None
    height: int | None = None
    format: str | None = None
    error: str | None = None


def check_file(path: str, limits: Limits) -> str | None:
    """The error that keeps a file from being read, if any: missing, not a readable regular
    file, or over `max_image_bytes` (then it is never read)."""
    found = _size(path, limits)
    return found if isinstance(found, str) else None


def _size(path: str, limits: Limits) -> int | str:
    """The file's size, or the error `check_file` gives."""
    try:
        st = os.stat(path)
    except OSError as e:
        return _unreadable(e)
    if not stat.S_ISREG(st.st_mode):
        return "cannot read the file: not a regular file"
    if not os.access(path, os.R_OK):
        return "cannot read the file: Permission denied"
    if st.st_size > limits.max_image_bytes:
        return too_big(st.st_size, limits)
    return st.st_size


def read_file(path: str, limits: Limits) -> bytes | str:
    """The file's bytes, or the error (`check_file`)."""
    size = _size(path, limits)
    if isinstance(size, str):
        return size
    try:
        with open(path, "rb", buffering=0) as f:
            # Its size and one byte (one that grew past the limit since the stat is refused
            # by decode_bytes); not read(max_image_bytes + 1), which allocates the whole
            # limit first, costing more than the small file itself (bench/results/serving-log.md, "Measurements behind code choices").
            return f.read(size + 1)
    except OSError as e:
        return _unreadable(e)


def _unreadable(e: OSError) -> str:
    return f"cannot read the file: {e.strerror or type(e).__name__}"


def too_big(size: int, limits: Limits) -> str:
    return f"the image is {size} bytes; the limit is {limits.max_image_bytes} (max_image_bytes)"


def decode_bytes(
    path: str, data: bytes, spec: Preprocess, limits: Limits
) -> tuple[Meta, np.ndarray | None]:
    """(meta, uint8 [C, H, W]) of one file's bytes; the array is None when meta.error is set."""
    if len(data) > limits.max_image_bytes:
        return Meta(path, error=too_big(len(data), limits)), None
    arr = plain_png_uint8(data, spec, limits.max_image_pixels, limits.max_image_decoded_bytes)
    if arr is not None:  # a plain PNG is at the model's size already (plain_png.py)
        return Meta(path, spec.width, spec.height, "PNG"), arr
    try:
        img = open_header(data, limits.max_image_pixels, limits.max_image_decoded_bytes, spec)
        width, height = _stored_size(img, data)
        fmt = img.format
        arr = image_to_uint8(img, spec)
    except (ImageDecodeError, ImageTooLargeError) as e:
        return Meta(path, error=str(e)), None
    return Meta(path, width, height, fmt), arr


def _stored_size(img: Image.Image, data: bytes) -> tuple[int, int]:
    """The image's size as stored: a JPEG that `open_header` drafted reports its scaled size,
    so its header is read again (no pixel decoded)."""
    config = getattr(img, "decoderconfig", ())  # JPEG: (draft scale, 0) once drafted
    if config and config[0] > 1:
        return Image.open(io.BytesIO(data), formats=FORMATS).size
    return img.size


def decode_paths(
    paths: list[str], spec: Preprocess, limits: Limits
) -> tuple[list[Meta], np.ndarray | None]:
    """A chunk of files -> (one meta per file, the decoded ones stacked [n_ok, C, H, W] in
    order): one task of the decode pool, so that a 28x28 PNG does not pay a hand-off each."""
    return stack([read_file(p, limits) for p in paths], paths, spec, limits)


def stack(
    datas: Iterable[bytes | str], paths: Iterable[str], spec: Preprocess, limits: Limits
) -> tuple[list[Meta], np.ndarray | None]:
    """Files' bytes (or the error reading them) -> (metas, the decoded ones stacked)."""
    metas: list[Meta] = []
    arrays: list[np.ndarray] = []
    for path, data in zip(paths, datas, strict=True):
        if isinstance(data, str):
            metas.append(Meta(path, error=data))
            continue
        meta, arr = decode_bytes(path, data, spec, limits)
        metas.append(meta)
        if arr is not None:
            arrays.append(arr)
    return metas, (np.stack(arrays) if arrays else None)
