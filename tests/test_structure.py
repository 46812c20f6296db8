"""isomax/contract/structure.py: files as writers make them pass; files of too many pieces are
refused, by `check_structure` and by `open_header` (which training's reader goes through too)."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from isomax.contract import structure
from isomax.contract.decode import ImageTooLargeError, open_header
from tests.service.hostile_files import jpeg_segments, png_chunks, tiff_chain, tiff_strips


def saved(fmt: str, **kw: object) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (300, 200), (10, 200, 30)).save(buf, fmt, **kw)
    return buf.getvalue()


@pytest.mark.parametrize(
    "data",
    [
        saved("PNG"),
        saved("JPEG", icc_profile=b"\0" * 200_000, exif=Image.Exif().tobytes()),
        saved("JPEG", progressive=True),
        saved("TIFF"),
        saved("TIFF", compression="tiff_lzw"),
        saved("TIFF", big_tiff=True),
        tiff_strips(structure.MAX_TIFF_PARTS),
        tiff_chain(structure.MAX_TIFF_IFDS, last_strips=structure.MAX_TIFF_PARTS),
        tiff_chain(3, loop=True),
        png_chunks(structure.MAX_PNG_CHUNKS - 3),
        jpeg_segments(structure.MAX_JPEG_SEGMENTS - 20),
    ],
    ids=[
        "png",
        "jpeg-icc-exif",
        "jpeg-progressive",
        "tiff",
        "tiff-lzw",
        "bigtiff",
        "tiff-at-bound",
        "tiff-ifds-at-bound",
        "tiff-ifd-loop",
        "png-at-bound",
        "jpeg-near-bound",
    ],
)
def test_files_within_the_bounds_pass(data: bytes) -> None:
    structure.check_structure(data)
    open_header(data)


@pytest.mark.parametrize(
    ("data", "what"),
    [
        (tiff_strips(structure.MAX_TIFF_PARTS + 1), "strips"),
        # every IFD of the chain is checked, not only the first
        (tiff_chain(2, last_strips=structure.MAX_TIFF_PARTS + 1), "strips in IFD 1"),
        (tiff_chain(3, last_extra_tags=structure.MAX_TIFF_TAGS), "tags in IFD 2"),
        (tiff_chain(structure.MAX_TIFF_IFDS + 1), "IFDs"),
        (tiff_chain(9, extra_tags=structure.MAX_TIFF_TAGS - 9), "tags over its IFDs"),
        (png_chunks(structure.MAX_PNG_CHUNKS), "chunks"),
        (jpeg_segments(structure.MAX_JPEG_SEGMENTS), "segments"),
    ],
)
def test_files_over_the_bounds_are_refused(data: bytes, what: str) -> None:
    with pytest.raises(structure.StructureError, match=what):
        structure.check_structure(data)
    with pytest.raises(ImageTooLargeError, match="too complex"):
        open_header(data)


def test_damaged_files_are_left_to_pillow() -> None:
    """A walk that runs off the end or finds no marker decides nothing (Pillow says why)."""
    for data in (saved("PNG")[:30], saved("JPEG")[:10] + b"\x00" * 10, b"II*\x00\xff\xff\xff\xff"):
        structure.check_structure(data)


def test_a_multi_image_tiff_within_the_bounds_decodes_its_first_image() -> None:
    """The crafted chains are real TIFFs: Pillow counts their images and decodes the first."""
    data = tiff_chain(4, last_strips=5)
    structure.check_structure(data)
    img = open_header(data)
    assert img.size == (28, 28) and getattr(img, "n_frames", 1) == 4
    img.seek(3)
    assert img.size == (1, 5)
