"""Bad requests and their documented answers, shared by the in-process and real-server tests."""

from __future__ import annotations

import functools
import zlib
from dataclasses import dataclass, field
from typing import Any

from tests.service.bundles import sample_images

PNG = sample_images(1, 0)[0][1]
MiB = 1024 * 1024

# Small limits so that tests reach every one of them cheaply.
TEST_LIMITS = dict(
    max_images_per_request=12,
    max_image_bytes=1024 * 1024,
    max_body_bytes=4 * 1024 * 1024,
    max_image_pixels=4_000_000,
)


@functools.lru_cache(maxsize=2)
def bomb_png(side: int = 20000) -> bytes:
    """A valid side x side 8-bit gray PNG of zeros: ~0.4 MB on the wire, side^2 bytes decoded."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return len(data).to_bytes(4, "big") + kind + data + crc.to_bytes(4, "big")

    ihdr = side.to_bytes(4, "big") * 2 + bytes([8, 0, 0, 0, 0])  # 8-bit, grayscale
    comp = zlib.compressobj(9)
    row = b"\x00" * (side + 1)  # filter byte + pixels
    idat = b"".join(comp.compress(row) for _ in range(side)) + comp.flush()
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


@dataclass
class Bad:
    id: str
    status: int
    detail: str  # a substring of the JSON detail
    params: dict[str, Any] = field(default_factory=dict)
    content: bytes | None = None
    headers: dict[str, str] = field(default_factory=dict)
    files: list[tuple[str, tuple[str, bytes, str]]] | None = None

    def request(self) -> dict[str, Any]:
        kw: dict[str, Any] = {"params": self.params, "headers": self.headers}
        if self.files is not None:
            kw["files"] = self.files
        if self.content is not None:
            kw["content"] = self.content
        return kw


def _multipart(body: bytes, boundary: str | None = "b0undary") -> dict[str, str]:
    ctype = "multipart/form-data" + (f"; boundary={boundary}" if boundary else "")
    return {"content-type": ctype}


def bad_requests() -> list[Bad]:
    n_max = int(TEST_LIMITS["max_images_per_request"])
    max_image = int(TEST_LIMITS["max_image_bytes"])
    max_body = int(TEST_LIMITS["max_body_bytes"])
    png = ("file", ("a.png", PNG, "image/png"))
    return [
        Bad("empty-body", 400, "empty", content=b"", headers={"content-type": "image/png"}),
        Bad("empty-body-no-type", 400, "empty", content=b""),
        Bad(
            "text-as-png",
            400,
            "cannot decode",
            content=b"hello, I am text",
            headers={"content-type": "image/png"},
        ),
        Bad(
            "truncated-png",
            400,
            "cannot decode",
            content=PNG[: len(PNG) // 2],
            headers={"content-type": "image/png"},
        ),
        Bad(
            "bomb-20000x20000",
            413,
            "pixels",
            content=bomb_png(),
            headers={"content-type": "image/png"},
        ),
        Bad(
            "wrong-form-field",
            422,
            "unexpected form field 'image'",
            files=[("image", ("a.png", PNG, "image/png"))],
        ),
        Bad("too-many-files", 413, f"limit is {n_max}", files=[png] * (n_max + 1)),
        Bad(
            "unknown-model",
            404,
            "unknown model 'nope'",
            params={"model": "nope"},
            content=PNG,
            headers={"content-type": "image/png"},
        ),
        Bad(
            "unknown-version",
            404,
            "unknown model 'tiny:9'",
            params={"model": "tiny:9"},
            content=PNG,
            headers={"content-type": "image/png"},
        ),
        Bad("top_k-0", 422, "top_k", params={"top_k": 0}, files=[png]),
        Bad("top_k-minus-1", 422, "top_k", params={"top_k": -1}, files=[png]),
        Bad(
            "top_k-text",
            422,
            "top_k: Input should be a valid integer",
            params={"top_k": "abc"},
            files=[png],
        ),
        Bad(
            "text-plain",
            415,
            "not an image",
            content=b"hello",
            headers={"content-type": "text/plain"},
        ),
        Bad(
            "json",
            415,
            "not an image",
            content=b'{"image": 1}',
            headers={"content-type": "application/json"},
        ),
        Bad("part-text-plain", 415, "text/plain", files=[("file", ("a.txt", b"hi", "text/plain"))]),
        Bad(
            "image-too-many-bytes",
            413,
            "bytes",
            content=b"\0" * (max_image + 1),
            headers={"content-type": "image/png"},
        ),
        Bad(
            "part-too-many-bytes",
            413,
            "bytes",
            files=[("file", ("big.png", b"\0" * (max_image + 1), "image/png"))],
        ),
        Bad(
            "body-too-large", 413, "bytes", content=b"\0" * (max_body + 1), headers=_multipart(b"")
        ),
        Bad(
            "malformed-multipart",
            400,
            "multipart",
            content=b"this is not multipart",
            headers=_multipart(b""),
        ),
        Bad(
            "multipart-no-boundary",
            400,
            "boundary",
            content=b"--x--\r\n",
            headers=_multipart(b"", None),
        ),
        Bad(
            "multipart-no-parts",
            422,
            "no image",
            content=b"--b0undary--\r\n",
            headers=_multipart(b""),
        ),
        Bad(
            "undecodable-part",
            400,
            "image 1 ('x.png')",
            files=[("file", ("x.png", b"not an image", "image/png"))],
        ),
    ]


BAD = bad_requests()
