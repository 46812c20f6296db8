"""The served scores as torch ops, so that each is an output of the exported graph.

Every score comes from the same forward pass as the logits: `min_distance` is the head's, the
entropic score and MMLES are a few ops on the logits, and the Mahalanobis score is one matmul on
the head's input features (`training.mahalanobis`). Their numpy twins in `training.scores`
(`entropic`, `mmles`) and `training.mahalanobis.MahalanobisFit.score` are the references the
tests hold the graph to. Which way each is in-distribution is the contract's
(`isomax.contract.verdict.SERVED_SCORES`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from isomax.contract.verdict import SERVED_SCORES
from training.mahalanobis import MahalanobisFit, MahalanobisScore


def negative_entropy(logits: torch.Tensor) -> torch.Tensor:
    """`Σ_j p_j log p_j` with `p = softmax(z)` `(N,)`; from log-softmax, so no `0 · log 0`."""
    logp = F.log_softmax(logits, dim=1)
    return (logp.exp() * logp).sum(dim=1)


def mmles(logits: torch.Tensor) -> torch.Tensor:
    """DisMax's max-mean logit entropy score `(N,)`: higher = more in-distribution."""
    return logits.max(dim=1).values + logits.mean(dim=1) + negative_entropy(logits)


class ServedScore(nn.Module):
    """(logits, min_distance, features) -> the served score `(N,)` named `name`."""

    def __init__(self, name: str, mahalanobis: MahalanobisFit | None = None) -> None:
        super().__init__()
        if name not in SERVED_SCORES:
            raise ValueError(f"unknown score {name!r}; choose one of {', '.join(SERVED_SCORES)}")
        if (name == "mahalanobis") != (mahalanobis is not None):
            raise ValueError("the mahalanobis score needs its fit (and no other score takes one)")
        self.name = name
        self.mahalanobis = MahalanobisScore(mahalanobis) if mahalanobis is not None else None

    def forward(
        self, logits: torch.Tensor, min_distance: torch.Tensor, features: torch.Tensor
    ) -> torch.Tensor:
        if self.name == "min_distance":
            return min_distance
        if self.name == "entropic":
            return negative_entropy(logits)
        if self.name == "mmles":
            return mmles(logits)
        assert self.mahalanobis is not None  # __init__ checked
        return self.mahalanobis(features)
