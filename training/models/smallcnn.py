"""The CPU default: five 3x3 convs (32 | 32-64 | 64-64) and a 128-unit feature layer, ~0.5M params.

A flattened 7x7 map into a linear feature layer matched global average pooling over six convs
in MDS AUROC against MNIST, with higher accuracy, in less training time (docs/training.md, "Measurements behind the small defaults"): keeping the
spatial layout helps tell thin-stroke digits from clothes. Pooling right after the first conv
keeps only one cheap layer at full 28x28 resolution.
"""

from __future__ import annotations

from torch import nn


def _block(cin: int, cout: int) -> list[nn.Module]:
    return [
        nn.Conv2d(cin, cout, 3, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    ]


class SmallCNN(nn.Module):
    def __init__(self, in_channels: int = 1, image_size: int = 28, num_features: int = 128) -> None:
        super().__init__()
        side = image_size // 4  # two 2x2 max-pools
        self.features = nn.Sequential(
            *_block(in_channels, 32), nn.MaxPool2d(2),  # 28 -> 14
            *_block(32, 32), *_block(32, 64), nn.MaxPool2d(2),  # 14 -> 7
            *_block(64, 64), *_block(64, 64),
            nn.Flatten(),
            nn.Linear(64 * side * side, num_features, bias=False),
            nn.BatchNorm1d(num_features),
            nn.ReLU(inplace=True),
        )  # fmt: skip
        self.num_features = num_features

    def forward(self, x):  # (N, C, H, W) -> (N, 128)
        return self.features(x)
