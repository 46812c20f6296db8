"""Fashion-MNIST from its original idx files (plain or .gz), as the dataset's authors publish them.

Default location is where Debian's `dataset-fashion-mnist` package installs them; anyone who
downloaded the four files themselves passes `--data-dir`.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np

DEFAULT_DIR = Path("/usr/share/datasets/fashion-mnist")
LABELS = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip
FILES = {
    ("train", "images"): "train-images-idx3-ubyte",
    ("train", "labels"): "train-labels-idx1-ubyte",
    ("test", "images"): "t10k-images-idx3-ubyte",
    ("test", "labels"): "t10k-labels-idx1-ubyte",
}
HOW_TO_GET = (
    "Install them with `apt-get install dataset-fashion-mnist` (Debian/Ubuntu), or download the "
    "four idx files from the Fashion-MNIST authors and pass --data-dir DIR."
)


class DataMissingError(FileNotFoundError):
    pass


class DataCorruptError(ValueError):
    pass


def _find(data_dir: Path, stem: str) -> Path:
    for name in (stem + ".gz", stem):
        if (data_dir / name).is_file():
            return data_dir / name
    raise DataMissingError(f"Fashion-MNIST file {stem}(.gz) not found in {data_dir}. {HOW_TO_GET}")


def read_idx(path: Path) -> np.ndarray:
    """Parse an idx file (big-endian header: magic, dims) into a uint8 array."""
    try:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:
        raise DataCorruptError(f"{path}: cannot read ({e})") from e
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise DataCorruptError(f"{path}: not an unsigned-byte idx file (bad magic number)")
    ndim = raw[3]
    header = 4 + 4 * ndim
    dims = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected = header + int(np.prod(dims))
    if len(raw) != expected:
        raise DataCorruptError(f"{path}: {len(raw)} bytes, header {dims} says {expected}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def load_split(split: str, data_dir: Path | None = None) -> tuple[np.ndarray, np.ndarray]:
    """`split` in {train, test} -> images uint8 `(N, 1, 28, 28)`, labels int64 `(N,)`."""
    d = Path(data_dir) if data_dir else DEFAULT_DIR
    if not d.is_dir():
        raise DataMissingError(f"Fashion-MNIST directory {d} does not exist. {HOW_TO_GET}")
    images = read_idx(_find(d, FILES[(split, "images")]))
    labels = read_idx(_find(d, FILES[(split, "labels")]))
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise DataCorruptError(
            f"{d}: {split} images {images.shape} do not match labels {labels.shape}"
        )
    if labels.max(initial=0) >= len(LABELS):
        raise DataCorruptError(f"{d}: {split} labels out of range 0..{len(LABELS) - 1}")
    return images[:, None, :, :].copy(), labels.astype(np.int64)
