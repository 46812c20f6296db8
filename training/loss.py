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


def mosaic(images: torch.Tensor) -> torch.Tensor:
    """4-image mosaics: image `i` keeps its top-left quadrant and takes the other three from
    images `i−1`, `i−2`, `i−3` (cyclically): bottom-left, top-right, bottom-right. `(N, C, H, W)`.

    DisMax's fractional probability regularization trains on these; the choosing rule's
    pseudo-OOD mosaics (`training.pseudo_ood.neighbour_mosaic`) are these, of validation images.
    """
    if images.ndim != 4:
        raise ValueError(f"mosaic needs images (N, C, H, W), got shape {tuple(images.shape)}")
    h, w = images.shape[2] // 2, images.shape[3] // 2
    out = images.clone()
    out[:, :, h:, :w] = torch.roll(images[:, :, h:, :w], 1, dims=0)
    out[:, :, :h, w:] = torch.roll(images[:, :, :h, w:], 2, dims=0)
    out[:, :, h:, w:] = torch.roll(images[:, :, h:, w:], 3, dims=0)
    return out


def mosaic_targets(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """The target distribution of `mosaic(images)` `(N, K)`: 0.25 on each source image's class
    (0.5, 0.75 or 1 where sources share a class)."""
    one_hot = F.one_hot(labels, num_classes).float()
    return 0.25 * sum((torch.roll(one_hot, r, dims=0) for r in range(4)), torch.zeros_like(one_hot))


class DisMaxLoss(nn.Module):
    """DisMax's loss (Macêdo et al., "Distinction Maximization Loss") after a `DisMaxHead`.

    Probabilities are `softmax(E_s · z)` with `E_s = 10`. With the fractional probability
    regularization (`regularization=True`, the paper's default), `prepare` turns the second
    half of each batch into 4-image mosaics and the loss is

        L = (CE(first half) + α · KL(target ‖ p)(second half)) / 2,    α = 1,

    each term a mean over its half; the mosaic targets put 0.25 on each quadrant's class.
    Called with integer labels (no `prepare`, or `regularization=False`) it is the plain
    cross-entropy. The log-softmax is fused, as in `IsoMaxPlusLoss` and for the same reason.
    `prepare` does not shuffle again (the reference does): our loader already shuffles.
    """

    def __init__(
        self,
        entropic_scale: float = ENTROPIC_SCALE,
        alpha: float = 1.0,
        regularization: bool = True,
    ) -> None:
        super().__init__()
        self.entropic_scale = entropic_scale
        self.alpha = alpha
        self.regularization = regularization

    def prepare(
        self, images: torch.Tensor, labels: torch.Tensor, num_classes: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(images, targets) to train on: the second half mosaics, targets `(N, K)` with the
        first half one-hot. Without regularization, the batch as it is."""
        if not self.regularization:
            return images, labels
        half = len(images) // 2
        x = torch.cat([images[:half], mosaic(images[half:])])
        first = F.one_hot(labels[:half], num_classes).float()
        return x, torch.cat([first, mosaic_targets(labels[half:], num_classes)])

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if logits.ndim != 2 or targets.shape[:1] != logits.shape[:1]:
            raise ValueError(
                f"wrong size: logits {tuple(logits.shape)} vs targets {tuple(targets.shape)}"
            )
        z = self.entropic_scale * logits
        if targets.ndim == 1:
            return F.cross_entropy(z, targets)
        if targets.shape != logits.shape:
            raise ValueError(f"wrong size: logits {tuple(logits.shape)} vs {tuple(targets.shape)}")
        half = len(z) // 2
        logp = F.log_softmax(z, dim=1)
        ce = -(targets[:half] * logp[:half]).sum(dim=1).mean()  # one-hot: -log p_y
        kl = F.kl_div(logp[half:], targets[half:], reduction="batchmean")
        return (ce + self.alpha * kl) / 2


class LogitNormLoss(nn.Module):
    """LogitNorm (Wei et al. 2022, "Mitigating Neural Network Overconfidence with Logit
    Normalization"): cross-entropy of the logits divided by `tau * ||logits||`, so training can
    no longer lower the loss by growing the logits' norm, the cause of overconfidence on inputs
    far from the data. `tau = 0.04` is the paper's value for CIFAR-10, not tuned here. The head
    is an ordinary `nn.Linear`; at inference the raw logits are used (max probability, energy).
    """

    def __init__(self, temperature: float = 0.04, eps: float = 1e-7) -> None:
        super().__init__()
        self.temperature = temperature
        self.eps = eps

    def normalized(self, logits: torch.Tensor) -> torch.Tensor:
        """`logits / (tau * ||logits||)`: what the cross-entropy sees."""
        norms = logits.norm(p=2, dim=-1, keepdim=True) + self.eps
        return logits / (norms * self.temperature)

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self.normalized(logits), targets)


def make_loss(head: str) -> nn.Module:
    if head == "softmax":
        return nn.CrossEntropyLoss()
    if head == "logitnorm":
        return LogitNormLoss()
    return DisMaxLoss() if head == "dismax" else IsoMaxPlusLoss()
