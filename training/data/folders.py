"""Users' own images in the image-folder layout `root/<class>/<image>`, as one uint8 array.

Every file is decoded by `isomax.contract.decode.load_file_uint8`, the function the service applies
to uploads, so a picture becomes the same array when training reads it and when it is served;
a second decoder here (or torchvision's) would drift in resize, EXIF, alpha or color handling.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Literal

import numpy as np

from isomax.contract.decode import ImageDecodeError, load_file_uint8
from isomax.contract.manifest import Preprocess

log = logging.getLogger(__name__)

# Formats Pillow reads out of the box; the suffix test is case-insensitive.
IMAGE_EXTENSIONS = frozenset(
    {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm"}
)


def default_preprocess(
    height: int, width: int, color_mode: Literal["L", "RGB"] = "L", **overrides: object
) -> Preprocess:
    """A `Preprocess` for `height` x `width` images with the schema's defaults for the rest.

    Channels follow from the color mode, the one field people otherwise get inconsistent.
    """
    channels = 1 if color_mode == "L" else 3
    return Preprocess.model_validate(
        {"height": height, "width": width, "channels": channels, "color_mode": color_mode}
        | overrides
    )


def _image_files(root: Path) -> list[Path]:
    """Image files anywhere under `root`, sorted, skipping hidden files and folders."""
    return sorted(
        p
        for p in root.rglob("*")
        if p.is_file()
        and p.suffix.lower() in IMAGE_EXTENSIONS
        and not any(part.startswith(".") for part in p.relative_to(root).parts)
    )


def find_images(root: Path) -> tuple[list[Path], np.ndarray, list[str]]:
    """File paths, their int64 labels and the class names, without decoding anything.

    Classes are the visible subdirectories of `root` sorted by name (so label indices do not
    depend on file-system order); images are searched recursively inside each class directory,
    skipping hidden files and directories (`.DS_Store`, `.ipynb_checkpoints`) and files whose
    extension is not an image's. Files directly in `root` are ignored.
    """
    root = Path(root)
    if not root.exists():
        raise FileNotFoundError(f"image folder {root} does not exist")
    if not root.is_dir():
        raise NotADirectoryError(f"image folder {root} is not a directory")
    class_dirs = sorted(
        (p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")),
        key=lambda p: p.name,
    )
    if not class_dirs:
        raise FileNotFoundError(
            f"no class directories in {root}: expected the layout {root}/<class>/<image>"
        )
    paths: list[Path] = []
    labels: list[int] = []
    for label, class_dir in enumerate(class_dirs):
        files = _image_files(class_dir)
        if not files:
            raise FileNotFoundError(
                f"class directory {class_dir} has no images "
                f"(accepted extensions: {' '.join(sorted(IMAGE_EXTENSIONS))})"
            )
        paths += files
        labels += [label] * len(files)
    return paths, np.asarray(labels, dtype=np.int64), [p.name for p in class_dirs]


BAD_IMAGE_POLICIES = ("fail", "skip")


def decode_files(
    paths: list[Path], spec: Preprocess, bad_images: str = "fail"
) -> tuple[np.ndarray, np.ndarray]:
    """Decode `paths` into uint8 `(N, C, H, W)`; -> (images, indices of the files kept).

    `bad_images="fail"` stops at the first unreadable file with its path in the error;
    `"skip"` leaves such files out and logs how many and which first, so the data set never
    changes without a line saying so.
    """
    if bad_images not in BAD_IMAGE_POLICIES:
        raise ValueError(f"bad_images must be fail or skip, got {bad_images!r}")
    images = np.empty((len(paths), spec.channels, spec.height, spec.width), dtype=np.uint8)
    kept: list[int] = []
    bad: list[str] = []
    for i, path in enumerate(paths):
        try:
            images[len(kept)] = load_file_uint8(path, spec)  # (C, H, W)
            kept.append(i)
        except (ImageDecodeError, OSError) as e:
            what = (
                f"{path}: {e}" if isinstance(e, ImageDecodeError) else f"{path}: cannot read: {e}"
            )
            if bad_images == "fail":
                raise type(e)(what) from e
            bad.append(what)
    report_skipped(bad)
    return images[: len(kept)], np.asarray(kept, dtype=np.int64)


def report_skipped(bad: list[str]) -> None:
    """One log line for the unreadable files a `skip` policy left out."""
    if bad:
        log.warning("skipped %d unreadable image file(s); first: %s", len(bad), bad[0])


def class_balance(labels: np.ndarray, classes: list[str]) -> str:
    """`cat=120, dog=80`: the per-class counts for the log."""
    counts = np.bincount(labels, minlength=len(classes))
    return ", ".join(f"{c}={n}" for c, n in zip(classes, counts, strict=True))


def load_image_folder(
    root: Path, spec: Preprocess, bad_images: str = "fail"
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Decode every image under `root/<class>/` into uint8 `(N, C, H, W)`, labels `(N,)`, names.

    Unreadable files stop the load with their path in the error (`bad_images="fail"`), or are
    skipped and counted in the log (`"skip"`): never silently.
    """
    paths, labels, classes = find_images(root)
    images, kept = decode_files(paths, spec, bad_images)
    labels = labels[kept]
    log.info(
        "image folder %s: %d images, %d classes (%s)",
        root,
        len(labels),
        len(classes),
        class_balance(labels, classes),
    )
    return images, labels, classes


def load_ood_folder(root: Path, spec: Preprocess) -> np.ndarray:
    """Every image anywhere under `root` (no class folders needed), as uint8 `(N, C, H, W)`.

    For users' own OOD sets, e.g. the paper's resized SVHN / TinyImageNet / LSUN images,
    decoded with the model's own preprocessing.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"OOD image folder {root} does not exist")
    paths = _image_files(root)
    if not paths:
        raise FileNotFoundError(
            f"no images in {root} (accepted extensions: {' '.join(sorted(IMAGE_EXTENSIONS))})"
        )
    images = np.empty((len(paths), spec.channels, spec.height, spec.width), dtype=np.uint8)
    for i, path in enumerate(paths):
        try:
            images[i] = load_file_uint8(path, spec)
        except ImageDecodeError as e:
            raise ImageDecodeError(f"{path}: {e}") from e
    return images
