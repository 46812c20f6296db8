"""Model registry: every backbone exposes `num_features`; heads come from training.head."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from torch import nn

from training.head import make_head
from training.models.classifier import Classifier
from training.models.densenet import DenseNetBC
from training.models.resnet import resnet18, resnet34
from training.models.smallcnn import SmallCNN

BACKBONES: dict[str, Callable[[int], nn.Module]] = {
    "smallcnn": lambda c: SmallCNN(c),
    "resnet18": resnet18,
    "resnet34": resnet34,
    "densenet100": lambda c: DenseNetBC(100, 12, in_channels=c),
}


def build_model(
    arch: str,
    head: str,
    num_classes: int,
    in_channels: int,
    mean: Sequence[float],
    std: Sequence[float],
) -> Classifier:
    if arch not in BACKBONES:
        raise ValueError(f"unknown architecture {arch!r}; choose one of {', '.join(BACKBONES)}")
    backbone = BACKBONES[arch](in_channels)
    return Classifier(backbone, make_head(head, backbone.num_features, num_classes), mean, std)  # type: ignore[arg-type]


__all__ = ["BACKBONES", "Classifier", "build_model"]
