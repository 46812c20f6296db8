"""Training configuration: one dataclass, saved inside every checkpoint and bundle manifest."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


@dataclass
class TrainConfig:
    arch: str = "smallcnn"  # smallcnn | resnet18 | resnet34 | densenet100
    head: str = "isomaxplus"  # softmax | isomax | isomaxplus
    prototype_init: str = "unit"  # IsoMax+ only: unit | paper (training/head.py says why)
    dataset: str = "fashion-mnist"  # fashion-mnist | cifar | folder
    data_dir: str | None = None  # None: the dataset's default location
    classes: list[int] | None = None  # open-set: train on these class indices only
    val_size: int = 5000  # held out of the training images for selection and calibration
    split_seed: int = 0  # fixed across runs so every model sees the same validation split
    limit_train: int | None = None  # use only the first N training images (smoke tests)
    epochs: int = 10
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 1e-4
    # lr / 10 at these fractions of training: the paper's 150/200/250 of 300 epochs.
    lr_milestones: list[float] = field(default_factory=lambda: [0.5, 0.667, 0.833])
    # Random crop (pad 2) + horizontal flip. Off by default: on Fashion-MNIST in short CPU runs it
    # cost accuracy and MDS AUROC vs MNIST (3 epochs on 15k images: 85.3% / 0.67 with it,
    # 87.7% / 0.89 without); worth trying for long runs and natural images.
    augment: bool = False
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    threads: int | None = None  # torch intra-op threads on CPU; None: torch's default
    channels_last: bool = True  # ~1.5x faster convs on CPU

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown config keys: {sorted(unknown)}")
        return cls(**d)
