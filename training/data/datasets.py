"""Turns a TrainConfig into train/val/test uint8 arrays plus labels and input geometry."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from training.config import TrainConfig
from training.data import fmnist

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

    @property
    def shape(self) -> tuple[int, int, int]:
        c, h, w = self.train_x.shape[1:]
        return int(c), int(h), int(w)


def validation_split(n: int, val_size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded permutation of range(n) -> (train indices, validation indices)."""
    if not 0 < val_size < n:
        raise ValueError(f"val_size must be in (0, {n}), got {val_size}")
    perm = np.random.default_rng(seed).permutation(n)
    return np.sort(perm[val_size:]), np.sort(perm[:val_size])


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
    if cfg.dataset == "folder":
        return _folder(cfg)
    raise ValueError(f"unknown dataset {cfg.dataset!r}; choose one of {', '.join(DATASETS)}")


def _folder(cfg: TrainConfig):
    """`root/<class>/<img>`, or `root/train/<class>/...` with an optional `root/test/...`."""
    from training.data.folders import load_image_folder

    if not cfg.data_dir:
        raise ValueError("dataset 'folder' needs --data-dir (root/<class>/<image>)")
    root = Path(cfg.data_dir)
    spec = folder_preprocess(root)
    train_root = root / "train" if (root / "train").is_dir() else root
    tx, ty, names = load_image_folder(train_root, spec)
    if (root / "test").is_dir():
        vx, vy, test_names = load_image_folder(root / "test", spec)
        if test_names != names:
            raise ValueError(f"test classes {test_names} differ from train classes {names}")
        return tx, ty, vx, vy, names, spec.color_mode
    return tx, ty, None, None, names, spec.color_mode


def folder_preprocess(root: Path):
    """Geometry for an image folder: `preprocess.json` beside the classes, else 32x32 RGB."""
    from isomax.contract.manifest import Preprocess

    p = root / "preprocess.json"
    if p.is_file():
        return Preprocess.model_validate_json(p.read_text())
    return Preprocess(height=32, width=32, channels=3, color_mode="RGB")


def load_dataset(cfg: TrainConfig) -> Splits:
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
