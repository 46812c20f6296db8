"""The plain-PNG shortcut (libspng) gives Pillow's array, and declines every file it cannot vouch for.

Each case is a PNG written here (Pillow's encoder at several compression settings, and files
assembled chunk by chunk for what Pillow does not write), decoded both ways: the contract's
`decode_uint8` (shortcut first) and Pillow's path alone (`image_to_uint8(open_header(...))`).
The arrays must be equal byte for byte, and the shortcut must have been taken exactly where
the case says so: a shortcut that declined everything would pass the equality for nothing.
"""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from isomax.contract import plain_png
from isomax.contract.decode import (
    ImageDecodeError,
    ImageTooLargeError,
    decode_uint8,
    image_to_uint8,
    open_header,
)
from isomax.contract.manifest import Preprocess
from isomax.contract.plain_png import plain_png_uint8

GRAY = Preprocess(height=28, width=28, channels=1, color_mode="L", mean=(0.5,), std=(0.25,))
RGB = Preprocess(
    height=32, width=32, channels=3, color_mode="RGB", mean=(0.5,) * 3, std=(0.25,) * 3
)
RNG = np.random.default_rng(0)


def pil_png(arr: np.ndarray, mode: str, **save: object) -> bytes:
    buf = io.BytesIO()
    img = Image.fromarray(arr)
    assert img.mode == mode, (img.mode, mode)
    img.save(buf, "PNG", **save)
    return buf.getvalue()


def chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def raw_png(arr: np.ndarray, color: int, extra: list[bytes], filt: int = 0) -> bytes:
    """A PNG by hand: IHDR, `extra` chunks, one IDAT (every row with filter `filt`), IEND."""
    h, w = arr.shape[:2]
    rows = arr.reshape(h, -1)
    raw = b"".join(bytes([filt]) + _filtered(rows, y, filt) for y in range(h))
    ihdr = struct.pack(">IIBBBBB", w, h, 8, color, 0, 0, 0)
    body = [chunk(b"IHDR", ihdr), *extra, chunk(b"IDAT", zlib.compress(raw)), chunk(b"IEND", b"")]
    return b"\x89PNG\r\n\x1a\n" + b"".join(body)


def _filtered(rows: np.ndarray, y: int, filt: int) -> bytes:
    row = rows[y].astype(np.int16)
    up = rows[y - 1].astype(np.int16) if y else np.zeros_like(row)
    if filt == 0:
        return bytes(row.astype(np.uint8))
    if filt == 2:  # Up
        return bytes(((row - up) % 256).astype(np.uint8))
    raise ValueError(filt)


def gray(size: int = 28) -> np.ndarray:
    return RNG.integers(0, 256, (size, size), dtype=np.uint8)


def rgb(size: int = 32) -> np.ndarray:
    return RNG.integers(0, 256, (size, size, 3), dtype=np.uint8)


def exif_rotated() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90
    return pil_png(gray(), "L", exif=exif.tobytes())


def with_text(keyword: str) -> bytes:
    info = PngInfo()
    info.add_text(keyword, 'tiff:Orientation="6"' if "xmp" in keyword else "hello")
    return pil_png(gray(), "L", pnginfo=info)


def palette_png() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(gray()).convert("P").save(buf, "PNG")
    return buf.getvalue()


def bad_crc(png: bytes, kind: bytes) -> bytes:
    at = png.index(kind)
    length = struct.unpack(">I", png[at - 4 : at])[0]
    crc_at = at + 4 + length
    return png[:crc_at] + bytes([png[crc_at] ^ 1]) + png[crc_at + 1 :]


# (id, PNG bytes, spec, is the shortcut taken)
CASES = [
    ("gray", pil_png(gray(), "L"), GRAY, True),
    ("gray-optimized", pil_png(gray(), "L", optimize=True), GRAY, True),
    ("gray-level0", pil_png(gray(), "L", compress_level=0), GRAY, True),
    ("gray-smooth", pil_png(np.tile(np.arange(28, dtype=np.uint8) * 9, (28, 1)), "L"), GRAY, True),
    ("gray-up-filter", raw_png(gray(), 0, [], filt=2), GRAY, True),
    (
        "gray-gamma-phys",
        raw_png(
            gray(),
            0,
            [
                chunk(b"gAMA", struct.pack(">I", 45455)),
                chunk(b"pHYs", struct.pack(">IIB", 1, 1, 0)),
            ],
        ),
        GRAY,
        True,
    ),
    ("gray-text", with_text("Software"), GRAY, True),
    ("rgb", pil_png(rgb(), "RGB"), RGB, True),
    ("rgb-optimized", pil_png(rgb(), "RGB", optimize=True), RGB, True),
    # declined: Pillow's path decides (and gives the same array, or the same error)
    ("gray-other-size", pil_png(gray(30), "L"), GRAY, False),
    ("rgb-for-gray-model", pil_png(rgb(28), "RGB"), GRAY, False),
    ("gray-for-rgb-model", pil_png(gray(32), "L"), RGB, False),
    ("gray-alpha", pil_png(np.dstack([gray(), gray()]), "LA"), GRAY, False),
    ("palette", palette_png(), GRAY, False),
    (
        "gray-16bit",
        pil_png(RNG.integers(0, 65536, (28, 28), dtype=np.uint16), "I;16"),
        GRAY,
        False,
    ),
    ("gray-trns", raw_png(gray(), 0, [chunk(b"tRNS", b"\x00\x07")]), GRAY, False),
    ("gray-exif-rotated", exif_rotated(), GRAY, False),
    ("gray-exif-text", with_text("Raw profile type exif"), GRAY, False),
    ("gray-xmp", with_text("XML:com.adobe.xmp"), GRAY, False),
    ("gray-unknown-chunk", raw_png(gray(), 0, [chunk(b"zzZz", b"x")]), GRAY, False),
    (
        "gray-bad-ancillary-crc",
        bad_crc(raw_png(gray(), 0, [chunk(b"gAMA", b"\0\0\xb1\x8f")]), b"gAMA"),
        GRAY,
        False,
    ),
]


@pytest.mark.parametrize(
    ("png", "spec", "shortcut"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_the_shortcut_gives_pillows_array_or_declines(
    png: bytes, spec: Preprocess, shortcut: bool
) -> None:
    fast = plain_png_uint8(png, spec)
    assert (fast is not None) == shortcut
    try:
        want = image_to_uint8(open_header(png), spec)
    except ImageDecodeError as e:
        with pytest.raises(ImageDecodeError, match=str(e)[:30]):
            decode_uint8(png, spec)
        assert fast is None
        return
    got = decode_uint8(png, spec)
    assert got.dtype == want.dtype == np.uint8
    assert got.shape == want.shape == (spec.channels, spec.height, spec.width)
    assert got.flags.c_contiguous
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("cut", [20, 40, 100, -20, -5])
def test_a_truncated_png_is_declined_and_pillow_decides(cut: int) -> None:
    """Cut in the header or the image data Pillow refuses; cut in the trailing IEND it reads
    (its choice, kept): either way the answer is Pillow's."""
    png = pil_png(gray(), "L")[:cut]
    assert plain_png_uint8(png, GRAY) is None
    try:
        want = image_to_uint8(open_header(png), GRAY)
    except ImageDecodeError:
        with pytest.raises(ImageDecodeError):
            decode_uint8(png, GRAY)
        return
    np.testing.assert_array_equal(decode_uint8(png, GRAY), want)


def test_a_corrupt_image_stream_is_declined_and_pillow_reports_it() -> None:
    png = bytearray(raw_png(gray(), 0, []))
    at = png.index(b"IDAT") + 6
    png[at : at + 8] = b"\xff" * 8
    idat = png.index(b"IDAT")
    length = struct.unpack(">I", png[idat - 4 : idat])[0]
    png[idat + 4 + length : idat + 8 + length] = struct.pack(
        ">I", zlib.crc32(bytes(png[idat : idat + 4 + length]))
    )  # a valid CRC over broken zlib data: only decoding finds it
    assert plain_png_uint8(bytes(png), GRAY) is None
    with pytest.raises(ImageDecodeError):
        decode_uint8(bytes(png), GRAY)


def test_the_pixel_and_memory_limits_still_apply() -> None:
    png = pil_png(gray(), "L")
    assert plain_png_uint8(png, GRAY, max_pixels=28 * 28) is not None
    assert plain_png_uint8(png, GRAY, max_pixels=28 * 28 - 1) is None
    assert plain_png_uint8(png, GRAY, max_decoded_bytes=28 * 28 - 1) is None
    with pytest.raises(ImageTooLargeError):
        decode_uint8(png, GRAY, max_pixels=100)


def test_libspng_is_installed() -> None:
    """pyspng is a base dependency: without it the shortcut silently never runs."""
    assert plain_png.pyspng is not None
