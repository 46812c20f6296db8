"""DenseNet-BC (Huang et al. 2017) for 32x32 inputs; depth 100, growth 12 is the paper's (0.8M)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Bottleneck(nn.Module):
    def __init__(self, cin: int, growth: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, 4 * growth, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(4 * growth)
        self.conv2 = nn.Conv2d(4 * growth, growth, 3, padding=1, bias=False)

    def forward(self, x):
        out = self.conv1(F.relu(self.bn1(x)))
        out = self.conv2(F.relu(self.bn2(out)))
        return torch.cat([x, out], dim=1)


class Transition(nn.Module):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(cin)
        self.conv = nn.Conv2d(cin, cout, 1, bias=False)

    def forward(self, x):
        return F.avg_pool2d(self.conv(F.relu(self.bn(x))), 2)


class DenseNetBC(nn.Module):
    def __init__(
        self, depth: int = 100, growth: int = 12, reduction: float = 0.5, in_channels: int = 3
    ) -> None:
        super().__init__()
        n = (depth - 4) // 6  # bottleneck layers per dense block
        c = 2 * growth
        layers: list[nn.Module] = [nn.Conv2d(in_channels, c, 3, padding=1, bias=False)]
        for stage in range(3):
            for _ in range(n):
                layers.append(Bottleneck(c, growth))
                c += growth
            if stage < 2:
                cout = int(c * reduction)
                layers.append(Transition(c, cout))
                c = cout
        layers += [nn.BatchNorm2d(c), nn.ReLU(inplace=True), nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        self.features = nn.Sequential(*layers)
        self.num_features = c

    def forward(self, x):  # (N, C, H, W) -> (N, 342) for depth 100, k 12
        return self.features(x)
