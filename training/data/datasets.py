"""Turns a TrainConfig into train/val/test uint8 arrays plus labels and input geometry."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from isomax.contract.manifest import Preprocess
from training.config import TrainConfig
from training.data import fmnist

log = logging.getLogger(__name__)

DATASETS = ("fashion-mnist", "cifar", "folder")


@dataclass
class Splits:
    train_x: np.ndarray  # uint8 (N, C, H, W)
    train_y: np.ndarray  # int64 (N,)
    val_x: np.ndarray
    val_y: np.ndarray
    test_x: np.ndarray | None
    test_y: np.ndarray | None
    labels: list[str]
    held_out_x: np.ndarray | None = None  # open-set: test images of the classes not trained on
    color_mode: str = "L"
    # Image folders: training images stay files, decoded batch by batch (training/data/image_files).
    train_files: list[Path] | None = None
    preprocess: Preprocess | None = None  # image folders: the evaluation (= serving) preprocessing
    train_mean: list[float] | None = None  # image folders: channel statistics of the train files
    train_std: list[float] | None = None

    @property
    def shape(self) -> tuple[int, int, int]:
        c, h, w = self.val_x.shape[1:]
        return int(c), int(h), int(w)


def validation_split(n: int, val_size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded permutation of range(n) -> (train indices, validation indices)."""
    if not 0 < val_size < n:
        raise ValueError(f"val_size must be in (0, {n}), got {val_size}")
    perm = np.random.default_rng(seed).permutation(n)
    return np.sort(perm[val_size:]), np.sort(perm[:val_size])


def stratified_split(labels: np.ndarray, val_size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """-> (train indices, validation indices), each class keeping its share in both.

    A seeded permutation of a small folder can leave a class short (23/28/26 training images
    from three folders of 32): scikit-learn's `train_test_split(stratify=...)` gives every class
    its share, to one image. Where it cannot (a class with a single image, or fewer validation
    images than classes) the split falls back to `validation_split`, with a warning.
    """
    from sklearn.model_selection import train_test_split

    n = len(labels)
    if not 0 < val_size < n:
        raise ValueError(f"val_size must be in (0, {n}), got {val_size}")
    try:
        tr, va = train_test_split(
            np.arange(n), test_size=val_size, random_state=seed, stratify=labels
        )
    except ValueError as e:
        log.warning("validation split not stratified (%s); split at random instead", e)
        return validation_split(n, val_size, seed)
    return np.sort(tr), np.sort(va)


def _raw(cfg: TrainConfig):
    """-> (train_x, train_y, test_x | None, test_y | None, labels, color_mode)."""
    if cfg.dataset == "fashion-mnist":
        d = Path(cfg.data_dir) if cfg.data_dir else None
        tx, ty = fmnist.load_split("train", d)
        vx, vy = fmnist.load_split("test", d)
        return tx, ty, vx, vy, list(fmnist.LABELS), "L"
    if cfg.dataset == "cifar":
        from training.data.cifar import load_cifar

        if not cfg.data_dir:
            raise ValueError("dataset 'cifar' needs --data-dir (the CIFAR python-pickle folder)")
        tx, ty, names = load_cifar(Path(cfg.data_dir), train=True)
        vx, vy, _ = load_cifar(Path(cfg.data_dir), train=False)
        return tx, ty, vx, vy, names, "RGB"
    raise ValueError(f"unknown dataset {cfg.dataset!r}; choose one of {', '.join(DATASETS)}")


def _random_split(labels: np.ndarray, val_size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    return validation_split(len(labels), val_size, seed)


def folder_preprocess(root: Path, cfg: TrainConfig | None = None) -> Preprocess:
    """The evaluation (and serving) preprocessing of an image folder.

    `ROOT/preprocess.json` if present; else for pretrained-backbone archs an ImageNet-style
    RGB input of `image_size` (224) pixels, scaled and center-cropped; else 32x32 RGB stretched.
    """
    from training.models.pretrained import DEFAULT_IMAGE_SIZE, is_pretrained_arch

    p = root / "preprocess.json"
    if p.is_file():
        spec = Preprocess.model_validate_json(p.read_text())
        if cfg is not None and cfg.image_size:
            spec = spec.model_copy(update={"height": cfg.image_size, "width": cfg.image_size})
        return spec
    if cfg is not None and is_pretrained_arch(cfg.arch):
        size = cfg.image_size or DEFAULT_IMAGE_SIZE
        return Preprocess(
            height=size, width=size, channels=3, color_mode="RGB", resize_mode="center_crop"
        )
    size = (cfg.image_size if cfg is not None else None) or 32
    return Preprocess(height=size, width=size, channels=3, color_mode="RGB")


def folder_val_size(n: int, val_size: int) -> int:
    """Validation images held out of an `n`-image folder: `val_size`, at most a fifth."""
    if n < 2:
        raise ValueError(f"an image folder needs at least 2 training images, found {n}")
    return max(1, min(val_size, n // 5))


def _folder_split(
    folder: Path, spec: Preprocess, cfg: TrainConfig, names: list[str]
) -> tuple[np.ndarray, np.ndarray] | None:
    """The images of `ROOT/val/` or `ROOT/test/` decoded, or None without that folder; its
    classes must be the training classes."""
    from training.data.folders import load_image_folder

    if not folder.is_dir():
        return None
    x, y, split_names = load_image_folder(folder, spec, cfg.bad_images)
    if split_names != names:
        raise ValueError(f"{folder.name} classes {split_names} differ from train classes {names}")
    return x, y


def _hold_out_validation(
    cfg: TrainConfig,
    spec: Preprocess,
    train_root: Path,
    paths: list[Path],
    labels: np.ndarray,
    names: list[str],
) -> tuple[list[Path], np.ndarray, tuple[np.ndarray, np.ndarray]]:
    """A folder without `val/`: (training paths, their labels, decoded validation images and
    labels) split by `cfg.val_split` and `cfg.split_seed`."""
    from training.data.folders import class_balance, decode_files

    split_fn = stratified_split if cfg.val_split == "stratified" else _random_split
    tr, va = split_fn(labels, folder_val_size(len(paths), cfg.val_size), cfg.split_seed)
    val_paths, val_labels = [paths[i] for i in va], labels[va]
    vx, kept = decode_files(val_paths, spec, cfg.bad_images)
    val = (vx, val_labels[kept])
    log.info(
        "validation: %d images split from %s (%s, seed %d): %s",
        len(kept), train_root, cfg.val_split, cfg.split_seed,
        class_balance(val[1], names),
    )  # fmt: skip
    return [paths[i] for i in tr], labels[tr], val


def _load_folder(cfg: TrainConfig) -> Splits:
    """`ROOT/train/<class>/...` (or `ROOT/<class>/...`), optional `ROOT/val/...`, `ROOT/test/...`.

    Validation and test images are decoded into arrays (evaluation, calibration and export
    score them); training images stay files, read by DataLoader workers every epoch.
    """
    from training.data.folders import class_balance, find_images
    from training.data.image_files import check_files

    if not cfg.data_dir:
        raise ValueError("dataset 'folder' needs --data-dir (ROOT/train/<class>/<image>)")
    if cfg.classes is not None:
        raise ValueError(
            "--classes is for the built-in data sets; an image folder's classes are its subfolders"
        )
    root = Path(cfg.data_dir)
    spec = folder_preprocess(root, cfg)
    train_root = root / "train" if (root / "train").is_dir() else root
    paths, labels, names = find_images(train_root)
    for split in ("val", "test"):
        if train_root == root and split in names:
            raise ValueError(
                f"{root} has a {split}/ folder but no train/: use ROOT/train/<class>/... beside it"
            )
    if cfg.val_split not in ("stratified", "random"):
        raise ValueError(f"val_split must be stratified or random, got {cfg.val_split!r}")
    has_splits = train_root != root
    val = _folder_split(root / "val", spec, cfg, names) if has_splits else None
    if val is None:
        paths, labels, val = _hold_out_validation(cfg, spec, train_root, paths, labels, names)
    test = _folder_split(root / "test", spec, cfg, names) if has_splits else None
    if cfg.limit_train:
        paths, labels = paths[: cfg.limit_train], labels[: cfg.limit_train]
    kept, mean, std = check_files(paths, spec, cfg.bad_images, cfg.workers)
    paths, labels = [paths[i] for i in kept], labels[kept]
    missing = [
        c for c, n in zip(names, np.bincount(labels, minlength=len(names)), strict=True) if n == 0
    ]
    if missing:
        raise ValueError(f"no readable training images left for class(es) {', '.join(missing)}")
    log.info("training images: %d (%s)", len(paths), class_balance(labels, names))
    return Splits(
        train_x=np.empty((0, *val[0].shape[1:]), dtype=np.uint8),
        train_y=labels,
        val_x=val[0],
        val_y=val[1],
        test_x=None if test is None else test[0],
        test_y=None if test is None else test[1],
        labels=names,
        color_mode=spec.color_mode,
        train_files=paths,
        preprocess=spec,
        train_mean=mean,
        train_std=std,
    )


def load_dataset(cfg: TrainConfig) -> Splits:
    if cfg.dataset == "folder":
        return _load_folder(cfg)
    tx, ty, sx, sy, labels, color_mode = _raw(cfg)
    held_out = None
    if cfg.classes is not None:
        keep = sorted(set(cfg.classes))
        if not keep or min(keep) < 0 or max(keep) >= len(labels) or len(keep) == len(labels):
            raise ValueError(
                f"classes must be a proper subset of 0..{len(labels) - 1}, got {cfg.classes}"
            )
        remap = np.full(len(labels), -1, dtype=np.int64)
        remap[keep] = np.arange(len(keep))
        m = np.isin(ty, keep)
        tx, ty = tx[m], remap[ty[m]]
        if sx is not None and sy is not None:
            ms = np.isin(sy, keep)
            held_out = sx[~ms]
            sx, sy = sx[ms], remap[sy[ms]]
        labels = [labels[i] for i in keep]
    tr, va = validation_split(
        len(tx),
        min(cfg.val_size, len(tx) // 5) if cfg.limit_train else cfg.val_size,
        cfg.split_seed,
    )
    if cfg.limit_train:
        tr = tr[: cfg.limit_train]
    return Splits(tx[tr], ty[tr], tx[va], ty[va], sx, sy, labels, held_out, color_mode)
