"""IsoMax(+) loss: cross-entropy of the entropic-scaled logits (the head's "second part").

The paper's footnotes compute softmax and log in two steps; in float32 that underflows to
`log(0) = -inf` once `|d_s|` grows past ~5 and a sample is badly wrong, and the loss becomes
infinite. We use the fused log-softmax of `F.cross_entropy`, which equals the two-step form in
exact arithmetic (tests/training/test_head_loss.py checks both agree on ordinary inputs) and stays
finite everywhere.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

ENTROPIC_SCALE = 10.0


class IsoMaxPlusLoss(nn.Module):
    """Drop-in replacement for `nn.CrossEntropyLoss` after an `IsoMaxPlusHead` (or `IsoMaxHead`).

    `L = −mean_i log softmax(E_s · z_i)[y_i]` with `E_s = 10`, a constant of the method (never
    tuned). Inference drops `E_s` (the entropy maximization trick): use `softmax(z)`.
    """

    def __init__(self, entropic_scale: float = ENTROPIC_SCALE) -> None:
        super().__init__()
        self.entropic_scale = entropic_scale

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if logits.ndim != 2 or targets.shape != logits.shape[:1]:
            raise ValueError(
                f"wrong size: logits {tuple(logits.shape)} vs targets {tuple(targets.shape)}"
            )
        return F.cross_entropy(self.entropic_scale * logits, targets)


def make_loss(head: str) -> nn.Module:
    return nn.CrossEntropyLoss() if head == "softmax" else IsoMaxPlusLoss()
