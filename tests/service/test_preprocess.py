"""Preprocessing from the manifest alone: every format Pillow reads gives the array Pillow says.

Training reads image folders through `load_file_uint8`, the service through `decode`; both go
through `to_uint8`, so these expectations hold on both sides.
"""

from __future__ import annotations

import io
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps

from isomax.contract.decode import (
    ImageDecodeError,
    ImageTooLargeError,
    decode,
    decode_uint8,
    load_file_uint8,
    to_uint8,
)
from isomax.contract.manifest import Preprocess

L28 = Preprocess(height=28, width=28, channels=1, color_mode="L")
RGB28 = Preprocess(height=28, width=28, channels=3, color_mode="RGB")
RNG = np.random.default_rng(0)


def encode(img: Image.Image, fmt: str, **kw: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def gray(h: int = 28, w: int = 28) -> np.ndarray:
    return RNG.integers(0, 256, (h, w), dtype=np.uint8)


def rgb(h: int = 28, w: int = 28) -> np.ndarray:
    return RNG.integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_png_gray_is_the_pixels() -> None:
    a = gray()
    out = decode_uint8(encode(Image.fromarray(a), "PNG"), L28)
    assert out.dtype == np.uint8 and out.shape == (1, 28, 28)
    np.testing.assert_array_equal(out[0], a)


def test_png_rgb_for_an_rgb_model_is_channels_first() -> None:
    a = rgb()
    out = decode_uint8(encode(Image.fromarray(a), "PNG"), RGB28)
    np.testing.assert_array_equal(out, a.transpose(2, 0, 1))


def test_png_rgb_for_a_gray_model_uses_pillows_luma() -> None:
    img = Image.fromarray(rgb())
    out = decode_uint8(encode(img, "PNG"), L28)
    np.testing.assert_array_equal(out[0], np.asarray(img.convert("L")))


def test_png_16bit_is_scaled_not_clipped() -> None:
    a16 = RNG.integers(0, 65536, (28, 28), dtype=np.uint16)
    img = Image.fromarray(a16)
    assert img.mode.startswith("I;16")
    out = decode_uint8(encode(img, "PNG"), L28)
    want = np.rint(a16.astype(np.float64) * 255.0 / 65535.0).astype(np.uint8)
    np.testing.assert_array_equal(out[0], want)
    assert out.max() > 200  # convert("L") would have clipped everything to 255 or scaled wrong


def test_png_palette_goes_through_rgb() -> None:
    img = Image.fromarray(rgb()).quantize(16)
    assert img.mode == "P"
    out = decode_uint8(encode(img, "PNG"), L28)
    np.testing.assert_array_equal(out[0], np.asarray(img.convert("RGB").convert("L")))


def test_png_palette_with_transparency_uses_the_background() -> None:
    img = Image.fromarray(rgb()).quantize(16)
    data = encode(img, "PNG", transparency=0)  # palette entry 0 is transparent
    idx = np.asarray(img)
    out = decode_uint8(data, L28.model_copy(update={"alpha_background": 77}))
    want = np.asarray(img.convert("RGB").convert("L")).copy()
    want[idx == 0] = 77
    np.testing.assert_array_equal(out[0], want)


def test_rgba_is_composited_on_the_manifest_background() -> None:
    color = rgb()
    alpha = np.where(RNG.random((28, 28)) < 0.5, 0, 255).astype(np.uint8)
    img = Image.fromarray(np.dstack([color, alpha]), "RGBA")
    out = decode_uint8(encode(img, "PNG"), RGB28.model_copy(update={"alpha_background": 200}))
    want = np.where(alpha[..., None] == 255, color, 200).transpose(2, 0, 1)
    np.testing.assert_array_equal(out, want)


def test_jpeg_exif_orientation_is_applied() -> None:
    """Orientation 6 = the camera was turned: the stored 20x10 pixels display as 10x20."""
    stored = Image.fromarray(gray(10, 20))  # 10 high, 20 wide
    exif = Image.Exif()
    exif[0x0112] = 6
    data = encode(stored, "JPEG", exif=exif.tobytes(), quality=95)
    decoded = np.asarray(Image.open(io.BytesIO(data)).convert("L"))  # pixels as stored
    spec = Preprocess(height=20, width=10, channels=1, color_mode="L")
    out = decode_uint8(data, spec)
    np.testing.assert_array_equal(out[0], np.rot90(decoded, k=-1))  # 90 degrees clockwise
    off = decode_uint8(data, spec.model_copy(update={"exif_transpose": False}))
    assert not np.array_equal(off, out)


def test_jpeg_matches_pillow_with_resize() -> None:
    data = encode(Image.fromarray(rgb(40, 30)), "JPEG", quality=90)
    out = decode_uint8(data, L28)
    img = ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("L")
    want = np.asarray(img.resize((28, 28), Image.Resampling.BILINEAR))
    np.testing.assert_array_equal(out[0], want)


@pytest.mark.parametrize("fmt, kw", [("WEBP", {"lossless": True}), ("BMP", {}), ("TIFF", {})])
def test_lossless_formats_round_trip(fmt: str, kw: dict) -> None:
    a = rgb()
    out = decode_uint8(encode(Image.fromarray(a), fmt, **kw), RGB28)
    np.testing.assert_array_equal(out, a.transpose(2, 0, 1))


def test_gif_first_frame() -> None:
    first, second = np.zeros((28, 28), np.uint8), np.full((28, 28), 255, np.uint8)
    first[5:20, 5:20] = 255
    frames = [Image.fromarray(first).convert("P"), Image.fromarray(second).convert("P")]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:], duration=50)
    out = decode_uint8(buf.getvalue(), L28)
    np.testing.assert_array_equal(out[0], first)


@pytest.mark.parametrize("name", ["nearest", "bilinear", "bicubic", "lanczos", "box", "hamming"])
def test_resize_filter_comes_from_the_manifest(name: str) -> None:
    img = Image.fromarray(gray(61, 47))
    out = decode_uint8(encode(img, "PNG"), L28.model_copy(update={"resize_filter": name}))
    want = np.asarray(img.resize((28, 28), getattr(Image.Resampling, name.upper())))
    np.testing.assert_array_equal(out[0], want)


def test_center_crop_mode() -> None:
    img = Image.fromarray(gray(40, 80))
    spec = L28.model_copy(update={"resize_mode": "center_crop"})
    out = decode_uint8(encode(img, "PNG"), spec)
    want = np.asarray(ImageOps.fit(img, (28, 28), method=Image.Resampling.BILINEAR))
    np.testing.assert_array_equal(out[0], want)


def test_decode_is_uint8_over_255() -> None:
    data = encode(Image.fromarray(gray()), "PNG")
    x = decode(data, L28)
    assert x.dtype == np.float32 and x.min() >= 0.0 and x.max() <= 1.0
    np.testing.assert_array_equal(x, decode_uint8(data, L28).astype(np.float32) / np.float32(255))


def test_load_file_uint8_reads_the_same_bytes(tmp_path: Path) -> None:
    data = encode(Image.fromarray(rgb()), "PNG")
    (tmp_path / "x.png").write_bytes(data)
    np.testing.assert_array_equal(load_file_uint8(tmp_path / "x.png", L28), decode_uint8(data, L28))


@pytest.mark.parametrize(
    "data",
    [b"", b"hello, this is text", encode(Image.fromarray(gray()), "PNG")[:60]],
    ids=["empty", "text", "truncated-png"],
)
def test_undecodable_bytes_raise_decode_error(data: bytes) -> None:
    with pytest.raises(ImageDecodeError):
        decode(data, L28, max_pixels=1_000_000)


def test_pixel_limit_is_checked_before_decoding(bomb: bytes) -> None:
    t0 = time.perf_counter()
    with pytest.raises(ImageTooLargeError, match="limit is 25000000 pixels"):
        decode(bomb, L28, max_pixels=25_000_000)
    small = encode(Image.fromarray(gray(100, 100)), "PNG")
    with pytest.raises(ImageTooLargeError, match="100x100 = 10000 pixels; limit is 9999"):
        decode(small, L28, max_pixels=9999)
    assert time.perf_counter() - t0 < 0.5  # the 400 MB of pixels were never decoded


def test_pillow_bomb_guard_applies_without_a_limit(bomb: bytes) -> None:
    with pytest.raises(ImageTooLargeError):
        decode(bomb, L28)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_exif_orientation_decodes_like_pillows_exif_transpose(orientation: int) -> None:
    """decode_uint8 transposes in place; to_uint8 on an opened image uses Pillow's copy."""
    stored = gray(20, 10) if orientation < 5 else gray(10, 20)
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = encode(Image.fromarray(stored), "PNG", exif=exif.tobytes())
    spec = Preprocess(height=20, width=10, channels=1, color_mode="L")
    want = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(data))))
    assert want.shape == (20, 10)
    np.testing.assert_array_equal(decode_uint8(data, spec)[0], want)
    np.testing.assert_array_equal(to_uint8(Image.open(io.BytesIO(data)), spec)[0], want)
