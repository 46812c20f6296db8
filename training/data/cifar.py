"""CIFAR-10 / CIFAR-100 from the "python version" archives, the paper's in-distribution sets.

Layouts, as the archives from the CIFAR authors unpack:
- `cifar-10-batches-py/`: `data_batch_1` ... `data_batch_5`, `test_batch`, `batches.meta`
  (`label_names`); each batch holds `data` (10000, 3072) uint8 and `labels`.
- `cifar-100-python/`: `train`, `test`, `meta` (`fine_label_names`); batches hold `data` and
  `fine_labels` (the 100-class task the paper uses; coarse labels are ignored).
A row of `data` is the 1024 red values, then green, then blue, each 32x32 row-major, so a plain
reshape gives `(N, 3, 32, 32)`. The files are Python-2 pickles whose keys are bytes.

Unpickling can run arbitrary code, and these are files users bring: the unpickler here only
resolves the few globals a numpy array needs and refuses anything else.
"""

from __future__ import annotations

import logging
import pickle
import warnings
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

SIDE = 32
ROW = 3 * SIDE * SIDE
CIFAR10_DIR = "cifar-10-batches-py"
CIFAR100_DIR = "cifar-100-python"
HOW_TO_GET = (
    "download the python version from https://www.cs.toronto.edu/~kriz/cifar.html, unpack it, "
    f"and pass the {CIFAR10_DIR} or {CIFAR100_DIR} directory (or the one containing it)"
)

# (module, name) pairs a pickled numpy array refers to; numpy 1.x and Python 2 wrote
# `numpy.core`, numpy 2 writes `numpy._core`; `_codecs.encode` is how Python 3 protocol 2
# pickles bytes.
_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),
}


class CifarFormatError(ValueError):
    """A file exists but is not a CIFAR python-version pickle."""


class _ArrayOnlyUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _ALLOWED_GLOBALS:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}: not a CIFAR batch")
        with warnings.catch_warnings():  # numpy 2 may warn about the numpy.core alias
            warnings.simplefilter("ignore", DeprecationWarning)
            return super().find_class(module, name)


def _unpickle(path: Path) -> dict[bytes, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"CIFAR file {path} is missing; {HOW_TO_GET}")
    try:
        with open(path, "rb") as f:
            obj = _ArrayOnlyUnpickler(f, encoding="bytes").load()
    except Exception as e:  # truncated or foreign files raise many types (EOFError, KeyError, ...)
        raise CifarFormatError(f"{path}: not a readable CIFAR pickle: {e!r}") from e
    if not isinstance(obj, dict):
        raise CifarFormatError(f"{path}: expected a dict, got {type(obj).__name__}")
    return obj


def _field(batch: dict[bytes, Any], key: str, path: Path) -> Any:
    # Real files have bytes keys (Python 2 str); accept str keys from re-pickled copies too.
    for k in (key.encode(), key):
        if k in batch:
            return batch[k]
    raise CifarFormatError(f"{path}: no {key!r} entry (has {sorted(map(repr, batch))})")


def _read_batch(path: Path, label_key: str, n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    batch = _unpickle(path)
    data = np.asarray(_field(batch, "data", path))
    labels = np.asarray(_field(batch, label_key, path))
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != ROW:
        raise CifarFormatError(
            f"{path}: data is {data.dtype} {data.shape}, expected uint8 (N, {ROW})"
        )
    if labels.shape != (len(data),) or not np.issubdtype(labels.dtype, np.integer):
        raise CifarFormatError(
            f"{path}: {label_key} is {labels.dtype} {labels.shape}, expected {len(data)} integers"
        )
    if len(labels) and (labels.min() < 0 or labels.max() >= n_classes):
        raise CifarFormatError(
            f"{path}: {label_key} outside 0..{n_classes - 1} ({labels.min()}..{labels.max()})"
        )
    # Row = R plane, G plane, B plane, each 32x32 row-major: (N, 3072) -> (N, 3, 32, 32).
    return data.reshape(-1, 3, SIDE, SIDE), labels.astype(np.int64)


def _names(path: Path, key: str) -> list[str]:
    names = [
        n.decode() if isinstance(n, bytes) else str(n) for n in _field(_unpickle(path), key, path)
    ]
    if len(names) < 2:
        raise CifarFormatError(f"{path}: {key} has {len(names)} names")
    return names


def _resolve(root: Path) -> tuple[Path, int]:
    """The directory holding the batches and whether it is CIFAR-10 or -100."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"CIFAR directory {root} does not exist; {HOW_TO_GET}")
    if (root / "batches.meta").exists():
        return root, 10
    if (root / "meta").exists():
        return root, 100
    found = [
        (root / d, k) for d, k in ((CIFAR10_DIR, 10), (CIFAR100_DIR, 100)) if (root / d).is_dir()
    ]
    if len(found) == 2:
        raise ValueError(
            f"{root} holds both {CIFAR10_DIR} and {CIFAR100_DIR}; pass the one you mean"
        )
    if found:
        return _resolve(found[0][0])
    raise FileNotFoundError(
        f"{root} is not a CIFAR directory: no batches.meta (CIFAR-10), meta (CIFAR-100), "
        f"{CIFAR10_DIR}/ or {CIFAR100_DIR}/; {HOW_TO_GET}"
    )


def load_cifar(root: Path, train: bool) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """uint8 images `(N, 3, 32, 32)`, int64 labels `(N,)` and class names of one split.

    `root` is the unpacked `cifar-10-batches-py` / `cifar-100-python` directory or the one
    containing it; which of the two is detected from the meta file. All five CIFAR-10 training
    batches are required, so a partial download fails here instead of training on less data.
    """
    folder, n_classes = _resolve(root)
    if n_classes == 10:
        names = _names(folder / "batches.meta", "label_names")
        files = [f"data_batch_{i}" for i in range(1, 6)] if train else ["test_batch"]
        label_key = "labels"
    else:
        names = _names(folder / "meta", "fine_label_names")
        files = ["train" if train else "test"]
        label_key = "fine_labels"
    parts = [_read_batch(folder / f, label_key, len(names)) for f in files]
    images = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
    log.info(
        "CIFAR-%d %s from %s: %d images",
        n_classes,
        "train" if train else "test",
        folder,
        len(images),
    )
    return np.ascontiguousarray(images), labels, names
