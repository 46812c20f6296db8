"""Model registry: every backbone exposes `num_features`; heads come from training.head."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from torch import nn

from training.head import make_head
from training.models.classifier import Classifier
from training.models.densenet import DenseNetBC
from training.models.pretrained import LITE0, build_backbone, is_pretrained_arch
from training.models.resnet import resnet18, resnet34
from training.models.smallcnn import SmallCNN

BACKBONES: dict[str, Callable[[int, int], nn.Module]] = {  # (in_channels, image_size) -> backbone
    "smallcnn": lambda c, size: SmallCNN(c, size),
    "resnet18": lambda c, size: resnet18(c),
    "resnet34": lambda c, size: resnet34(c),
    "densenet100": lambda c, size: DenseNetBC(100, 12, in_channels=c),
}


def build_model(
    arch: str,
    head: str,
    num_classes: int,
    in_channels: int,
    mean: Sequence[float],
    std: Sequence[float],
    image_size: int = 28,
    prototype_init: str = "unit",
    weights: str | None = None,
) -> Classifier:
    """`weights` (pretrained-backbone archs only) are loaded into the backbone."""
    if is_pretrained_arch(arch):
        if in_channels != 3:
            raise ValueError(f"{arch} takes RGB images; these data have {in_channels} channel(s)")
        backbone = build_backbone(arch, image_size, weights)
    elif arch not in BACKBONES:
        raise ValueError(
            f"unknown architecture {arch!r}; choose one of {', '.join(BACKBONES)}, "
            f"tv-<torchvision model> (e.g. tv-resnet18) or {LITE0}"
        )
    else:
        if weights:
            raise ValueError(f"--weights is for tv-* and {LITE0} backbones, not {arch}")
        backbone = BACKBONES[arch](in_channels, image_size)
    num_features = int(backbone.num_features)  # type: ignore[arg-type]
    return Classifier(
        backbone, make_head(head, num_features, num_classes, prototype_init), mean, std
    )


__all__ = ["BACKBONES", "Classifier", "build_model"]
