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
        feats = self.forward_features(x)
        if torch.is_autocast_enabled(x.device.type):
            # Mixed precision stops at the head: normalized distances in fp16 lose the small
            # differences the OOD score is made of.
            with torch.autocast(x.device.type, enabled=False):
                return self.head(feats.float())
        return self.head(feats)

    def outputs(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Inference logits and, for distance heads, the minimum distance: one forward pass."""
        return logits_and_min_distance(self, x)


def logits_and_min_distance(
    model: nn.Module, x: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`(logits, min_distance)` of any model whose last layer is the head, in one forward pass.

    The one way to get both outputs from a torch model (training, evaluation and the exported
    graph use it): a forward hook catches the input of the model's distance head, and the head's
    own distance function gives both. A model without a distance head gives `(logits, None)`.
    """
    logits, min_distance, _ = head_outputs(model, x)
    return logits, min_distance


def head_outputs(
    model: nn.Module, x: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """`(logits, min_distance, features)`: `logits_and_min_distance` plus the head's input
    `(N, d)` (the penultimate features the Mahalanobis score is computed on)."""
    head = _distance_head(model)
    if head is None:
        return model(x), None, None
    features: list[torch.Tensor] = []
    hook = head.register_forward_hook(lambda _m, inp, _out: features.append(inp[0]))
    try:
        model(x)
    finally:
        hook.remove()
    logits, distances = head.logits_and_distances(features[-1])  # type: ignore[operator]
    return logits, distances.min(dim=1).values, features[-1]


def _distance_head(model: nn.Module) -> nn.Module | None:
    heads = [m for m in model.modules() if hasattr(m, "logits_and_distances")]
    if len(heads) > 1:
        raise ValueError(f"the model has {len(heads)} distance heads; expected one")
    return heads[0] if heads else None
