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
