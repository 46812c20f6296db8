"""The decode path's safety rules: format allow-list, decoded bytes known from the header, and a
16/32-bit conversion that never makes float64 copies of the image."""

from __future__ import annotations

import io
import tracemalloc

import numpy as np
import pytest
from PIL import Image

from isomax.contract.decode import (
    FORMATS,
    ImageDecodeError,
    ImageTooLargeError,
    decoded_bytes,
    image_to_uint8,
    open_header,
)
from isomax.contract.manifest import Preprocess

L28 = Preprocess(height=28, width=28, channels=1, color_mode="L")


def encode(img: Image.Image, fmt: str, **kw: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


@pytest.mark.parametrize("fmt", ["TGA", "ICO", "PCX", "SGI", "IM", "DDS"])
def test_formats_outside_the_allow_list_are_refused(fmt: str) -> None:
    data = encode(Image.new("RGB", (16, 16), (10, 20, 30)), fmt)
    assert Image.open(io.BytesIO(data)).format == fmt  # Pillow itself would read it
    with pytest.raises(ImageDecodeError, match="not PNG, JPEG, WebP, BMP, GIF, TIFF or PPM"):
        open_header(data)


def test_eps_never_reaches_ghostscript() -> None:
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n%%EOF\n"
    with pytest.raises(ImageDecodeError) as e:
        open_header(eps)
    assert "Ghostscript" not in str(e.value) and "not PNG" in str(e.value)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "BMP", "GIF", "TIFF", "PPM"])
def test_allowed_formats_open(fmt: str) -> None:
    data = encode(Image.new("L", (16, 16), 7), fmt)
    assert open_header(data).format in (*FORMATS, "MPO")


@pytest.mark.parametrize(
    "mode, bpp", [("1", 1), ("L", 1), ("P", 1), ("I;16", 2), ("I", 4), ("F", 4), ("RGB", 4)]
)
def test_decoded_bytes_by_mode(mode: str, bpp: int) -> None:
    img = Image.new(mode, (30, 20))
    assert decoded_bytes(img) == 30 * 20 * bpp


def test_the_decoded_size_is_refused_from_the_header() -> None:
    img = Image.fromarray(np.zeros((300, 400), np.uint16))
    data = encode(img, "PNG")
    opened = open_header(data, max_decoded_bytes=300 * 400 * 2)
    assert opened.mode.startswith("I;16")
    with pytest.raises(ImageTooLargeError, match="240000 bytes decoded; the limit is 239999"):
        open_header(data, max_decoded_bytes=300 * 400 * 2 - 1)


def test_16bit_conversion_is_exact_for_every_value() -> None:
    """x -> rint(x * 255 / 65535) for all 65536 values, as the float formula gives it."""
    values = np.arange(65536, dtype=np.uint16).reshape(256, 256)
    img = Image.fromarray(values)
    spec = Preprocess(height=256, width=256, channels=1, color_mode="L")
    got = image_to_uint8(img, spec)[0]
    want = np.rint(values.astype(np.float64) * 255.0 / 65535.0).astype(np.uint8)
    assert np.array_equal(got, want)


def test_32bit_conversion_clips_like_the_float_formula() -> None:
    values = np.array([[-70000, -1, 0, 128, 129, 385, 65535, 65536, 10**9]], dtype=np.int32)
    img = Image.fromarray(values)
    assert img.mode == "I"
    spec = Preprocess(height=1, width=values.shape[1], channels=1, color_mode="L")
    got = image_to_uint8(img, spec)[0]
    want = np.clip(np.rint(values.astype(np.float64) * 255.0 / 65535.0), 0, 255)
    assert np.array_equal(got, want.astype(np.uint8))


@pytest.mark.parametrize("dtype, mode", [(np.uint16, "I;16"), (np.int32, "I")])
def test_wide_integer_images_convert_without_float_copies(dtype: type, mode: str) -> None:
    """Peak Python-side allocation while converting a 2000x2000 image stays within a few times
    its decoded size; one float64 copy alone would be 8 bytes per pixel (the old path made
    several: ~13x the decoded size for 16-bit)."""
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(256, 65536, (2000, 2000)).astype(dtype))
    assert img.mode == mode
    img.load()
    size = decoded_bytes(img)
    tracemalloc.start()
    try:
        image_to_uint8(img, L28)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 5 * size, f"peak {peak} bytes for {size} decoded"


def test_a_photo_counts_the_pixels_its_jpeg_draft_decodes() -> None:
    """A 12-megapixel JPEG (48 MB as Pillow's RGB) for a small model: the decoder scales it by
    1/8 (draft), so its decoded size is within the limit; without a spec it is not."""
    data = encode(Image.new("RGB", (4032, 3024), (120, 30, 200)), "JPEG", quality=90)
    limit = 40 * 1024 * 1024
    img = open_header(data, max_decoded_bytes=limit, spec=L28)
    assert img.size == (504, 378) and decoded_bytes(img) < limit
    assert image_to_uint8(img, L28).shape == (1, 28, 28)
    with pytest.raises(ImageTooLargeError, match="4032x3024 in mode RGB"):
        open_header(data, max_decoded_bytes=limit)
