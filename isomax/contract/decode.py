"""Image bytes -> model input, driven by the manifest alone.

Training reads users' image files through the same functions (training/data/folders.py), so a
file becomes the same uint8 array on both sides; the float input is that array / 255.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from isomax.contract.manifest import Preprocess
from isomax.contract.plain_png import plain_png_uint8
from isomax.contract.structure import CorruptError, StructureError, check_structure

__all__ = [
    "FORMATS",
    "ImageDecodeError",
    "ImageTooLargeError",
    "decode",
    "decode_uint8",
    "decoded_bytes",
    "graph_input",
    "image_to_uint8",
    "load_file_uint8",
    "load_pixels",
    "open_header",
    "to_float",
    "to_uint8",
]

_FILTERS = {
    "nearest": Image.Resampling.NEAREST,
    "box": Image.Resampling.BOX,
    "bilinear": Image.Resampling.BILINEAR,
    "hamming": Image.Resampling.HAMMING,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}


class ImageDecodeError(ValueError):
    """The bytes are not an image Pillow can read."""


class ImageTooLargeError(ValueError):
    """The image header declares more pixels, or decoded bytes, than allowed."""


# The only decoders untrusted bytes reach: Image.open tries no other plugin (Pillow knows ~40
# formats, some of which hand the data to external programs, e.g. EPS to Ghostscript). JPEG
# includes MPO, the multi-picture JPEG of many cameras (Pillow's JPEG plugin opens it). PPM is
# the netpbm family (.ppm/.pgm/.pbm) that training reads from image folders, so that a model
# trained on such files is served them too; its decoder copies raw pixels, nothing more.
FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "GIF", "TIFF", "PPM")

# Bytes per pixel of Pillow's in-memory image by mode: one byte for 1/L/P, two for 16-bit
# integer modes, four for everything else (multi-band modes such as RGB are stored as 4 bytes
# per pixel, I and F are 32-bit).
_ONE_BYTE = ("1", "L", "P")


def decoded_bytes(img: Image.Image) -> int:
    """Memory the decoded pixels of `img` take, from its header alone (nothing decoded)."""
    w, h = img.size
    mode = img.mode
    bpp = 1 if mode in _ONE_BYTE else 2 if mode.startswith("I;16") else 4
    return w * h * bpp


def open_header(
    data: bytes,
    max_pixels: int | None = None,
    max_decoded_bytes: int | None = None,
    spec: Preprocess | None = None,
) -> Image.Image:
    """Parse only the header of `data`: format and size are known, no pixel is decoded yet.

    Only the decoders of FORMATS are tried. With `max_pixels` the declared size is checked
    against it; without, Pillow's own decompression-bomb limit applies (its warning is turned
    into an error). With `max_decoded_bytes`, so is the decoded size (`decoded_bytes`), of the
    image as it will be decoded for `spec`: a JPEG after its draft scaling (`_draft`), so that a
    12-megapixel photo for a small model counts the ~1/64 of its pixels it will decode.
    A PNG, JPEG or TIFF with more pieces than isomax/contract/structure.py allows is refused
    before Pillow parses it (ImageTooLargeError): their parsers take a Python step per piece.
    """
    if not data:
        raise ImageDecodeError("cannot decode image: it is empty")
    try:
        check_structure(data)
    except StructureError as e:
        raise ImageTooLargeError(f"image too complex: {e}") from e
    except CorruptError as e:
        raise ImageDecodeError(f"cannot decode image: {e}") from e
    try:
        if max_pixels is None:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                img = Image.open(io.BytesIO(data), formats=FORMATS)
        else:
            # No catch_warnings here: it mutates process-global state, which is slow and
            # races between threads; the explicit check below is the limit that applies.
            img = Image.open(io.BytesIO(data), formats=FORMATS)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        limit = f"the limit is {max_pixels} pixels: " if max_pixels is not None else ""
        raise ImageTooLargeError(f"image too large; {limit}{e}") from e
    except UnidentifiedImageError as e:  # its message names a BytesIO object: useless to a user
        raise ImageDecodeError(
            "cannot decode image: not PNG, JPEG, WebP, BMP, GIF, TIFF or PPM"
        ) from e
    except Exception as e:  # Pillow raises many types for bad data (OSError, SyntaxError, ...)
        raise ImageDecodeError(f"cannot decode image: {e}") from e
    w, h = img.size
    if max_pixels is not None and w * h > max_pixels:
        raise ImageTooLargeError(f"image is {w}x{h} = {w * h} pixels; limit is {max_pixels}")
    if spec is not None:
        _draft(img, spec)  # image_to_uint8 drafts again: a no-op once set
    if max_decoded_bytes is not None and decoded_bytes(img) > max_decoded_bytes:
        w, h = img.size
        raise ImageTooLargeError(
            f"image is {w}x{h} in mode {img.mode}: {decoded_bytes(img)} bytes decoded; the limit "
            f"is {max_decoded_bytes}"
        )
    return img


def load_pixels(img: Image.Image) -> Image.Image:
    """Decode the pixels of an image from `open_header` (first frame of animations)."""
    try:
        img.seek(0)  # first frame of GIF/WebP animations
        img.load()
    except Exception as e:  # truncated data and the like
        raise ImageDecodeError(f"cannot decode image: {e}") from e
    return img


def _to_8bit(img: Image.Image) -> Image.Image:
    """Scale 16/32-bit integer and float images to 8 bits; Pillow's convert('L') would clip.

    Integers: x -> rint(x * 255 / top), top = 65535 for 16-bit data (any value above 255),
    else 255; computed in integers (x * 255 / 65535 = x / 257, and 257 being odd there are no
    ties), so no float copy of the image is ever made: at most two integer arrays of the
    decoded image's own width.
    """
    mode = img.mode
    if mode == "F":
        arr = np.asarray(img)  # float32
        unit = bool(arr.max() <= 1.0)
        arr8 = np.clip(arr, 0.0, 1.0 if unit else 255.0)
        if unit:
            arr8 *= np.float32(255.0)
        np.rint(arr8, out=arr8)
        return Image.fromarray(arr8.astype(np.uint8), mode="L")
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        arr = np.asarray(img)
        if arr.max() > 255 or mode.startswith("I;16"):
            if mode == "I":
                arr = np.clip(arr, 0, 65535)  # beyond, rint(x / 257) clips to 0 or 255 anyway
            q = arr // 257
            r = q * 257
            np.subtract(arr, r, out=r)  # the remainder, in place
            q += r >= 129  # rounds up past 128.5
            return Image.fromarray(q.astype(np.uint8), mode="L")
        return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), mode="L")
    return img


def _flatten_alpha(img: Image.Image, background: int) -> Image.Image:
    if img.mode == "P":
        img = img.convert("RGBA") if "transparency" in img.info else img.convert("RGB")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (background, background, background, 255))
        return Image.alpha_composite(bg, rgba).convert("RGB")
    return img


def to_uint8(img: Image.Image, spec: Preprocess) -> np.ndarray:
    """Decoded image -> uint8 array `[C, H, W]` exactly as the model was trained on."""
    if spec.exif_transpose:
        img = ImageOps.exif_transpose(img) or img
    return _converted(img, spec)


def _converted(img: Image.Image, spec: Preprocess) -> np.ndarray:
    """`to_uint8` after the EXIF step."""
    img = _to_8bit(img)
    img = _flatten_alpha(img, spec.alpha_background)
    if img.mode != spec.color_mode:
        img = img.convert(spec.color_mode)
    size = (spec.width, spec.height)
    if img.size != size:
        resample = _FILTERS[spec.resize_filter]
        if spec.resize_mode == "center_crop":
            img = ImageOps.fit(img, size, method=resample)
        else:
            img = img.resize(size, resample=resample)
    arr = np.asarray(img, dtype=np.uint8)
    # (H, W) -> (1, H, W); (H, W, C) -> (C, H, W)
    arr = arr[None, :, :] if arr.ndim == 2 else arr.transpose(2, 0, 1)
    return np.ascontiguousarray(arr)


def image_to_uint8(img: Image.Image, spec: Preprocess) -> np.ndarray:
    """An image from `open_header` -> uint8 `[C, H, W]`; every failure is an ImageDecodeError."""
    _draft(img, spec)
    load_pixels(img)
    try:
        if spec.exif_transpose:
            # The image is ours: transpose in place, sparing the copy exif_transpose makes of
            # every image (same pixels as to_uint8).
            ImageOps.exif_transpose(img, in_place=True)
        return _converted(img, spec)
    except Exception as e:  # e.g. a mode Pillow cannot convert, a corrupt EXIF block
        raise ImageDecodeError(f"cannot convert {img.mode} image: {e}") from e


def _draft(img: Image.Image, spec: Preprocess) -> None:
    """JPEG only: let the decoder scale by 1/2, 1/4 or 1/8 (DCT scaling) before the resize.

    A 12-megapixel photo served to a 224-px model then decodes at about 1/8 of its pixels.
    The request is a square of the input's longer side, so both sides stay at least that large
    whatever the EXIF rotation or resize mode; other formats ignore it. Training reads files
    through this same function, so both sides see the same pixels.
    """
    side = max(spec.width, spec.height)
    img.draft(img.mode, (side, side))


def decode_uint8(data: bytes, spec: Preprocess, max_pixels: int | None = None) -> np.ndarray:
    """Bytes -> uint8 `[C, H, W]`: a plain PNG through libspng (the same array, in a fraction
    of the time: isomax/contract/plain_png.py), everything else through Pillow."""
    arr = plain_png_uint8(data, spec, max_pixels)
    return arr if arr is not None else image_to_uint8(open_header(data, max_pixels), spec)


def to_float(pixels: np.ndarray) -> np.ndarray:
    """uint8 pixels (any shape) -> the graph's float32 input in [0, 1]: pixels / 255.

    Elementwise, so converting a batch at once gives the same values as converting its images
    one by one (the service converts whole batches: service/batching.py).
    """
    return pixels.astype(np.float32) / np.float32(255.0)


def graph_input(images: np.ndarray) -> np.ndarray:
    """Images as the graph's float32 input: uint8 pixels through `to_float`, anything else
    (already the float input) as float32."""
    if images.dtype == np.uint8:
        return to_float(images)
    return images.astype(np.float32, copy=False)


def decode(data: bytes, spec: Preprocess, max_pixels: int | None = None) -> np.ndarray:
    """Bytes -> float32 `[C, H, W]` in [0, 1], the graph's input for one image."""
    return to_float(decode_uint8(data, spec, max_pixels))


def load_file_uint8(path: Path, spec: Preprocess) -> np.ndarray:
    """The training side's reader for image files: the same bytes -> array path as serving."""
    return decode_uint8(Path(path).read_bytes(), spec)
