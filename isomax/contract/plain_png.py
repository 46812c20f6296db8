"""The shortcut for plain PNGs: libspng (pyspng) instead of Pillow, for the same array.

Why: for a small PNG, Pillow's own work (plugin sniffing, chunk parsing in Python, the image
object, the EXIF lookup, the array interface) costs several times the pixel decoding itself,
and it was the largest part of a single-image request's CPU on the event loop (bench/results/serving-log.md,
"Measurements behind code choices" and "What each change bought"). libspng decodes the same file in one C call.

Exactness: PNG is lossless, so for the files taken here there is one right answer, the stored
8-bit samples, and Pillow returns exactly those (it applies neither gamma nor ICC profiles). The
shortcut is taken only when Pillow's result would be those samples unchanged by `decode`'s rule:
  - 8-bit grayscale or 8-bit truecolor, already in the manifest's colour mode and size (no
    conversion, no alpha, no palette, no resize);
  - no chunk that could change the pixels or their orientation in Pillow's hands: tRNS, eXIf,
    text chunks holding EXIF or XMP (Pillow reads an orientation from either), APNG frames,
    unknown critical chunks;
  - every chunk's CRC correct and the file complete up to IEND (where Pillow would refuse a
    file, the shortcut declines it and Pillow gives the error).
Anything else returns None and takes Pillow's path. tests/test_plain_png.py compares the two
on generated files of every kind.
"""

from __future__ import annotations

import struct
import zlib

import numpy as np

from isomax.contract.manifest import Preprocess
from isomax.contract.structure import MAX_PNG_CHUNKS

__all__ = ["decoded_bytes", "plain_png_uint8"]

try:  # a base dependency; without it (a platform with no wheel) every PNG takes Pillow's path
    import pyspng
except ImportError:  # pragma: no cover - tests/test_plain_png.py requires it
    pyspng = None

SIGNATURE = b"\x89PNG\r\n\x1a\n"
# (colour type, bit depth) -> Pillow's mode for the file
_MODES = {(0, 8): "L", (2, 8): "RGB"}
# Ancillary chunks that Pillow keeps as metadata and that never change the decoded samples.
_HARMLESS = frozenset(
    (b"gAMA", b"cHRM", b"sRGB", b"iCCP", b"pHYs", b"tIME", b"bKGD", b"hIST", b"sPLT")
)
_TEXT = frozenset((b"tEXt", b"zTXt", b"iTXt"))
# Text keywords Pillow reads an orientation from (EXIF as a raw profile, XMP).
_ORIENTATION_KEYWORDS = (b"exif", b"xml:com.adobe.xmp")


def plain_png_uint8(
    data: bytes,
    spec: Preprocess,
    max_pixels: int | None = None,
    max_decoded_bytes: int | None = None,
) -> np.ndarray | None:
    """uint8 `[C, H, W]` of a plain PNG (see the module doc), else None (use Pillow).

    An image over `max_pixels` or `max_decoded_bytes` (as `decode.decoded_bytes` counts them)
    is declined too, so that Pillow's path refuses it as usual.
    """
    if pyspng is None or len(data) < 45 or not data.startswith(SIGNATURE):
        return None
    if data[12:16] != b"IHDR":
        return None
    width, height, depth, color, _, _, _ = struct.unpack_from(">IIBBBBB", data, 16)
    mode = _MODES.get((color, depth))
    if mode != spec.color_mode or (width, height) != (spec.width, spec.height):
        return None
    if max_pixels is not None and width * height > max_pixels:
        return None
    if max_decoded_bytes is not None and decoded_bytes(width, height, mode) > max_decoded_bytes:
        return None
    if not _chunks_are_plain(data):
        return None
    try:
        arr = pyspng.load(data, mode)
    except Exception:  # let Pillow's path say what is wrong with the file
        return None
    arr = arr[None, :, :] if arr.ndim == 2 else arr.transpose(2, 0, 1)
    return np.ascontiguousarray(arr, dtype=np.uint8)


def decoded_bytes(width: int, height: int, mode: str) -> int:
    """What `decode.decoded_bytes` says for an image of this mode: Pillow keeps L in one byte
    per pixel and RGB in four."""
    return width * height * (1 if mode == "L" else 4)


def _chunks_are_plain(data: bytes) -> bool:
    """Every chunk known, harmless and intact, and IEND reached (within MAX_PNG_CHUNKS chunks:
    more is Pillow's path, which refuses the file, isomax/contract/structure.py)."""
    pos, end, n = 8, len(data), 0
    while pos + 12 <= end:
        n += 1
        if n > MAX_PNG_CHUNKS:
            return False
        length, kind = struct.unpack_from(">I4s", data, pos)
        stop = pos + 12 + length
        if stop > end:
            return False
        (crc,) = struct.unpack_from(">I", data, stop - 4)
        if zlib.crc32(memoryview(data)[pos + 4 : stop - 4]) != crc:
            return False
        if kind == b"IEND":
            return True
        if kind in _TEXT:
            keyword = data[pos + 8 : pos + 8 + min(length, 80)].split(b"\0", 1)[0].lower()
            if any(k in keyword for k in _ORIENTATION_KEYWORDS):
                return False
        elif kind not in (b"IHDR", b"IDAT", b"PLTE") and kind not in _HARMLESS:
            return False  # tRNS, eXIf, acTL/fcTL/fdAT, anything unknown
        pos = stop
    return False
