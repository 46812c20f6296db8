"""Bounds on an image file's structure, checked before Pillow parses its header.

Why: Pillow parses container structure in Python, one step per piece, while `Image.open` runs
(and, for PNG, again when the pixels load). A file made of many tiny pieces costs seconds of
CPU and a large strip list with no pixel in it (issue 24; the files and their cost:
bench/results/serving-log.md, "Hardening findings", Decoding). The walk here reads only the pieces' headers (a few
struct reads each) and stops at the first count over its bound, so refusing such a file costs
almost nothing, and a file within the bounds costs Pillow at most the bound's worth of steps.

The bounds are far above what image writers produce (below each constant); GIF and WebP need
none: `Image.open` reads the first GIF frame's header only, and WebP's demuxer is C (fast even
on thousands of frames), and only the first frame is ever decoded.
"""

from __future__ import annotations

import struct
import zlib

__all__ = [
    "MAX_JPEG_SEGMENTS",
    "MAX_PNG_CHUNKS",
    "MAX_TIFF_PARTS",
    "CorruptError",
    "StructureError",
    "check_structure",
]

# PNG chunks in a file. A 10 MiB PNG written in libpng's 8 KiB IDAT chunks has ~1,300.
MAX_PNG_CHUNKS = 16_384
# JPEG marker segments before the first scan. Writers put ~10-30 there (APPn, DQT, DHT, SOF),
# an ICC profile split into APP2 segments at most 255 more.
MAX_JPEG_SEGMENTS = 4_096
# TIFF: tags in the first IFD (writers use ~10-60), and strips or tiles of the first image
# (one row per strip for a 25-megapixel image of 5,000 rows: 5,000).
MAX_TIFF_TAGS = 4_096
MAX_TIFF_PARTS = 65_536

_TIFF_PART_TAGS = {273: "strips", 279: "strips", 324: "tiles", 325: "tiles"}


class StructureError(ValueError):
    """The file has more pieces (chunks, segments, strips, tags) than a bound allows."""


class CorruptError(ValueError):
    """A checksum the format carries does not match (PNG chunk CRCs)."""


def check_structure(data: bytes) -> None:
    """Raise StructureError when `data` is a PNG, JPEG or TIFF with more pieces than the
    bounds above; anything else (or a file too damaged to walk) is left to Pillow."""
    head = data[:4]
    if head == b"\x89PNG":
        _png(data)
    elif head[:2] == b"\xff\xd8":
        _jpeg(data)
    elif head in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        _tiff(data)


def _png(data: bytes) -> None:
    """Chunk count, and every complete chunk's CRC: Pillow checks none of the IDAT CRCs (a
    corrupt one was served) and reports a bad IHDR CRC as "not PNG"."""
    pos, end, n = 8, len(data), 0
    view = memoryview(data)
    while pos + 8 <= end:
        n += 1
        if n > MAX_PNG_CHUNKS:
            raise StructureError(f"the PNG has more than {MAX_PNG_CHUNKS} chunks")
        length, kind = struct.unpack_from(">I4s", data, pos)
        stop = pos + 12 + length
        if stop > end:
            return  # truncated: Pillow says so
        (crc,) = struct.unpack_from(">I", data, stop - 4)
        if zlib.crc32(view[pos + 4 : stop - 4]) != crc:
            name = kind.decode("latin-1", "replace")
            raise CorruptError(f"the PNG's {name} chunk fails its CRC check (damaged file)")
        if kind == b"IEND":
            return
        pos = stop


def _jpeg(data: bytes) -> None:
    pos, end, n = 2, len(data), 0
    while pos + 4 <= end:
        if data[pos] != 0xFF:
            return  # not a marker: Pillow says what is wrong
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        n += 1
        if n > MAX_JPEG_SEGMENTS:
            raise StructureError(f"the JPEG has more than {MAX_JPEG_SEGMENTS} segments")
        if marker in (0xDA, 0xD9):  # start of scan, end of image: the header is over
            return
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:  # no length field
            pos += 2
            continue
        (length,) = struct.unpack_from(">H", data, pos + 2)
        pos += 2 + length


def _tiff(data: bytes) -> None:
    order = "<" if data[:2] == b"II" else ">"
    big = data[2:4] in (b"+\x00", b"\x00+")
    try:
        if big:  # BigTIFF: 8-byte counts and offsets, 20-byte entries
            (ifd,) = struct.unpack_from(order + "Q", data, 8)
            (tags,) = struct.unpack_from(order + "Q", data, ifd)
            first, size, fmt = ifd + 8, 20, order + "HHQ"
        else:
            (ifd,) = struct.unpack_from(order + "I", data, 4)
            (tags,) = struct.unpack_from(order + "H", data, ifd)
            first, size, fmt = ifd + 2, 12, order + "HHI"
    except struct.error:
        return  # truncated: Pillow says so
    if tags > MAX_TIFF_TAGS:
        raise StructureError(f"the TIFF has {tags} tags in its first IFD; at most {MAX_TIFF_TAGS}")
    for i in range(min(tags, (len(data) - first) // size)):
        tag, _, count = struct.unpack_from(fmt, data, first + i * size)
        what = _TIFF_PART_TAGS.get(tag)
        if what is not None and count > MAX_TIFF_PARTS:
            raise StructureError(f"the TIFF has {count} {what}; at most {MAX_TIFF_PARTS}")
