"""Image files built to cost a parser much with few bytes (issue 24), for the tests and for
bench/hostile_probe.py: valid files, each made of many tiny pieces."""

from __future__ import annotations

import io
import struct
import zlib

from PIL import Image


def png_chunk(kind: bytes, data: bytes) -> bytes:
    crc = zlib.crc32(kind + data) & 0xFFFFFFFF
    return len(data).to_bytes(4, "big") + kind + data + crc.to_bytes(4, "big")


def tiff_strips(n: int) -> bytes:
    """A 1 x n 8-bit grayscale TIFF stored one row per strip: n strips of one byte."""
    offsets_at = 8 + 2 + 9 * 12 + 4
    counts_at = offsets_at + 4 * n
    data_at = counts_at + 4 * n
    entries = [  # (tag, type, count, value); type 3 SHORT, 4 LONG
        (256, 4, 1, 1), (257, 4, 1, n), (258, 3, 1, 8), (259, 3, 1, 1), (262, 3, 1, 1),
        (273, 4, n, offsets_at), (277, 3, 1, 1), (278, 4, 1, 1), (279, 4, n, counts_at),
    ]  # fmt: skip
    out = bytearray(b"II*\x00" + struct.pack("<IH", 8, len(entries)))
    for entry in entries:
        out += struct.pack("<HHII", *entry)
    out += struct.pack("<I", 0)
    out += struct.pack(f"<{n}I", *range(data_at, data_at + n))
    out += struct.pack(f"<{n}I", *([1] * n))
    out += b"\x80" * n
    return bytes(out)


def tiff_chain(
    n_ifds: int,
    last_strips: int = 1,
    extra_tags: int = 0,
    last_extra_tags: int = 0,
    loop: bool = False,
) -> bytes:
    """An 8-bit grayscale TIFF of `n_ifds` images in one IFD chain: the first 28 x 28 in one
    strip, the others 1 x 1, except the last, 1 x `last_strips` in one strip per row. Each IFD
    also carries `extra_tags` private tags (65000), the last `last_extra_tags` more; `loop`: the
    last IFD points back at the first instead of ending the chain."""
    side, pixels_at = 28, 8
    pixels = b"\x80" * (side * side)
    out = bytearray(b"II*\x00" + struct.pack("<I", pixels_at + len(pixels)) + pixels)
    for i in range(n_ifds):
        last = i == n_ifds - 1
        w, h = (side, side) if i == 0 else (1, last_strips if last else 1)
        entries: list[tuple[int, int, int, int]] = []
        arrays = b""
        extra = extra_tags + (last_extra_tags if last else 0)
        ifd_size = 2 + (9 + extra) * 12 + 4
        if h > 1:  # StripOffsets and StripByteCounts arrays right after this IFD
            offsets_at = len(out) + ifd_size
            arrays = struct.pack(f"<{h}I", *([pixels_at] * h)) + struct.pack(f"<{h}I", *[1] * h)
            strips = [(273, 4, h, offsets_at), (279, 4, h, offsets_at + 4 * h)]
        else:
            strips = [(273, 4, 1, pixels_at), (279, 4, 1, w * h)]
        entries = [
            (256, 4, 1, w), (257, 4, 1, h), (258, 3, 1, 8), (259, 3, 1, 1), (262, 3, 1, 1),
            strips[0], (277, 3, 1, 1), (278, 4, 1, 1 if h > 1 else h), strips[1],
        ] + [(65000, 4, 1, 0)] * extra  # fmt: skip
        next_at = len(out) + ifd_size + len(arrays)
        if last:
            next_at = 8 + len(pixels) if loop else 0
        out += struct.pack("<H", len(entries))
        for entry in entries:
            out += struct.pack("<HHII", *entry)
        out += struct.pack("<I", next_at) + arrays
    return bytes(out)


def png_chunks(n: int, side: int = 28) -> bytes:
    """A side x side grayscale PNG with n empty ancillary chunks before its IDAT."""
    ihdr = side.to_bytes(4, "big") * 2 + bytes([8, 0, 0, 0, 0])
    idat = zlib.compress(b"\x00" * (side + 1) * side)
    return (
        b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"abCd", b"") * n
        + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")
    )  # fmt: skip


def jpeg_segments(n: int, side: int = 28) -> bytes:
    """A side x side JPEG with n empty COM segments after its SOI marker."""
    buf = io.BytesIO()
    Image.new("L", (side, side), 90).save(buf, "JPEG")
    jpeg = buf.getvalue()
    return jpeg[:2] + b"\xff\xfe\x00\x02" * n + jpeg[2:]


def png_rgba(side: int) -> bytes:
    """A side x side RGBA PNG of one colour: a few KB on the wire, side^2 x 4 bytes decoded."""
    ihdr = side.to_bytes(4, "big") * 2 + bytes([8, 6, 0, 0, 0])
    comp = zlib.compressobj(9)
    row = b"\x00" + b"\x50\x60\x70\xff" * side
    idat = b"".join(comp.compress(row) for _ in range(side)) + comp.flush()
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", ihdr)
        + png_chunk(b"IDAT", idat)
        + png_chunk(b"IEND", b"")
    )
