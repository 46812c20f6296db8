"""A backbone plus a head, with the input normalization inside the model.

Keeping mean/std inside means the exported graph takes plain `[0, 1]` pixels, so the service
needs no knowledge of them and training and serving cannot normalize differently.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class Classifier(nn.Module):
    mean: torch.Tensor  # (1, C, 1, 1) buffers
    std: torch.Tensor

    def __init__(
        self,
        backbone: nn.Module,
        head: nn.Module,
        mean: Sequence[float],
        std: Sequence[float],
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.register_buffer(
            "mean", torch.tensor(list(mean), dtype=torch.float32).view(1, -1, 1, 1)
        )
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32).view(1, -1, 1, 1))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """`(N, C, H, W)` pixels in [0, 1] -> features `(N, d)`."""
        return self.backbone((x - self.mean) / self.std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(x))

    def outputs(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Inference logits and, for distance heads, the minimum distance: one forward pass."""
        feats = self.forward_features(x)
        if hasattr(self.head, "logits_and_distances"):
            logits, dist = self.head.logits_and_distances(feats)  # type: ignore[operator]
            return logits, dist.min(dim=1).values
        return self.head(feats), None
