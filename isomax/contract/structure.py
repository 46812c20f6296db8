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
    "MAX_TIFF_ENTRIES",
    "MAX_TIFF_IFDS",
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
# TIFF: tags per IFD (writers use ~10-60), and strips or tiles per image (one row per strip for
# a 25-megapixel image of 5,000 rows: 5,000), in every IFD of the chain, not only the first:
# Pillow reads only the first to open and decode, but anything that counts or seeks the frames
# (`n_frames`, `seek`) walks them all, a Python step per IFD and tag (serving-log.md, Decoding).
# A multi-page scan or an image pyramid has tens of IFDs.
MAX_TIFF_TAGS = 4_096
MAX_TIFF_PARTS = 65_536
MAX_TIFF_IFDS = 1_024
# Tags over all the IFDs: what bounds the walk itself.
MAX_TIFF_ENTRIES = 32_768

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
    """Every IFD of the chain (a repeated offset ends the walk: Pillow reads the first only)."""
    order = "<" if data[:2] == b"II" else ">"
    if data[2:4] in (b"+\x00", b"\x00+"):  # BigTIFF: 8-byte counts and offsets, 20-byte entries
        layout = (order + "Q", order + "HHQ8x", 8, 20)
        first_at, offset_fmt = 8, order + "Q"
    else:
        layout = (order + "H", order + "HHI4x", 2, 12)
        first_at, offset_fmt = 4, order + "I"
    try:
        (ifd,) = struct.unpack_from(offset_fmt, data, first_at)
    except struct.error:
        return  # truncated: Pillow says so
    seen: set[int] = set()
    entries = 0
    while ifd and ifd not in seen:
        if len(seen) == MAX_TIFF_IFDS:
            raise StructureError(f"the TIFF has more than {MAX_TIFF_IFDS} IFDs (images)")
        seen.add(ifd)
        walked = _tiff_ifd(data, ifd, len(seen) - 1, layout, MAX_TIFF_ENTRIES - entries)
        if walked is None:
            return  # runs off the end: damaged, left to Pillow
        tags, next_at = walked
        entries += tags
        try:
            (ifd,) = struct.unpack_from(offset_fmt, data, next_at)
        except struct.error:
            return


def _tiff_ifd(
    data: bytes, ifd: int, index: int, layout: tuple[str, str, int, int], entries_left: int
) -> tuple[int, int] | None:
    """Check the IFD at `ifd` (the `index`-th); (its tag count, where the next IFD's offset is),
    or None if it runs off the end of `data` (the entries present are checked all the same)."""
    count_fmt, entry_fmt, count_size, size = layout
    try:
        (tags,) = struct.unpack_from(count_fmt, data, ifd)
    except struct.error:
        return None
    where = "its first IFD" if index == 0 else f"IFD {index}"
    if tags > MAX_TIFF_TAGS:
        raise StructureError(f"the TIFF has {tags} tags in {where}; at most {MAX_TIFF_TAGS}")
    if tags > entries_left:
        raise StructureError(f"the TIFF has more than {MAX_TIFF_ENTRIES} tags over its IFDs")
    first = ifd + count_size
    present = max(0, min(tags, (len(data) - first) // size))  # Pillow parses those, then fails
    # (tag, type, count) of each entry, its value skipped; iter_unpack: C's loop, not Python's
    for tag, _, count in struct.iter_unpack(
        entry_fmt, memoryview(data)[first : first + present * size]
    ):
        if count > MAX_TIFF_PARTS and tag in _TIFF_PART_TAGS:
            what = _TIFF_PART_TAGS[tag]
            raise StructureError(
                f"the TIFF has {count} {what} in {where}; at most {MAX_TIFF_PARTS}"
            )
    return (tags, first + tags * size) if present == tags else None
