"""Feature-space Mahalanobis score: class means and one shared covariance, folded into the graph.

Lee et al., "A Simple Unified Framework for Detecting Out-of-Distribution Samples and Adversarial
Attacks" (NeurIPS 2018), on the L2-normalized penultimate features `f̂ = f/‖f‖` (the features the
IsoMax+ head compares with its prototypes):

    D_k(f) = (f̂ − μ_k)ᵀ P (f̂ − μ_k),      score = min_k D_k,    larger = more OOD

with `μ_k` the mean of class `k`'s normalized training features and `P` the precision (inverse)
of their one shared within-class covariance. The covariance comes from scikit-learn's estimators:
the empirical one when it has full rank, else Ledoit-Wolf shrinkage (a feature that ReLU keeps at
0 on every training image makes the empirical covariance singular).

In the exported graph the score is one matrix product and a few element-wise ops: with
`P = W Wᵀ`, `D_k = ‖f̂ W − μ_k W‖²`, so `f̂ @ W` (`d × d`) is the one matmul, and the squared
distances to the `K` projected means `μ_k W` (precomputed) follow by broadcasting
(`MahalanobisScore`). The expanded form `‖f̂ W‖² − 2 f̂ P μ_k + μ_kᵀ P μ_k` would fold the cross
terms into the same matmul, but in float32 it subtracts numbers ~1000x larger than the result
(the precision's large eigenvalues): measured, it missed the torch graph by 4e-4 relative where
the difference form agrees to 1e-6. It works for any model
with `forward_features` (every `training.models.Classifier`: smallcnn and pretrained backbones).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch
from sklearn.covariance import EmpiricalCovariance, LedoitWolf
from torch import nn

from isomax.contract.decode import graph_input
from training.data.datasets import Splits

log = logging.getLogger(__name__)

ESTIMATORS = ("auto", "empirical", "ledoit-wolf")


def normalize(features: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm, in float64 (a zero row stays zero, as `F.normalize`)."""
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2 or f.shape[0] == 0:
        raise ValueError(f"features must be (N, d) with N >= 1, got shape {f.shape}")
    norms = np.linalg.norm(f, axis=1, keepdims=True)
    return f / np.maximum(norms, 1e-12)


@dataclass(frozen=True)
class MahalanobisFit:
    """Class means `(K, d)` and shared precision `(d, d)` of normalized training features."""

    means: np.ndarray
    precision: np.ndarray
    estimator: str  # the estimator actually used: "empirical" or "ledoit-wolf"
    shrinkage: float = 0.0  # Ledoit-Wolf's shrinkage coefficient (0 for the empirical one)

    def distances(self, features: np.ndarray) -> np.ndarray:
        """Squared Mahalanobis distance of each normalized feature to each class mean `(N, K)`.

        The direct form `(f̂ − μ_k)ᵀ P (f̂ − μ_k)`, in float64: the reference the graph's
        expanded form is tested against.
        """
        f = normalize(features)
        if f.shape[1] != self.means.shape[1]:
            raise ValueError(f"features have {f.shape[1]} dims, the fit {self.means.shape[1]}")
        diff = f[:, None, :] - self.means[None, :, :]  # (N, K, d)
        return np.einsum("nkd,de,nke->nk", diff, self.precision, diff)

    def score(self, features: np.ndarray) -> np.ndarray:
        """`min_k D_k` `(N,)`: larger = more out of distribution."""
        return self.distances(features).min(axis=1)


def fit_mahalanobis(
    features: np.ndarray, labels: np.ndarray, num_classes: int, estimator: str = "auto"
) -> MahalanobisFit:
    """Fit on the training split's penultimate features (raw; they are normalized here).

    `estimator`: "empirical" (maximum likelihood), "ledoit-wolf" (shrunk toward a scaled
    identity), or "auto": empirical when its covariance has full rank, else Ledoit-Wolf.
    Every class needs at least one image.
    """
    if estimator not in ESTIMATORS:
        raise ValueError(f"unknown estimator {estimator!r}; choose one of {', '.join(ESTIMATORS)}")
    f = normalize(features)
    y = np.asarray(labels)
    if y.shape != (len(f),):
        raise ValueError(f"labels have shape {y.shape}, features {f.shape}: expected ({len(f)},)")
    counts = np.bincount(y, minlength=num_classes) if len(y) else np.zeros(num_classes)
    if len(counts) != num_classes or (counts == 0).any():
        raise ValueError(
            f"every one of {num_classes} classes needs training features; counts {counts.tolist()}"
        )
    means = np.stack([f[y == k].mean(axis=0) for k in range(num_classes)])
    centered = f - means[y]  # within-class deviations: one covariance shared by all classes
    used, shrinkage = estimator, 0.0
    if estimator in ("auto", "empirical"):
        cov = EmpiricalCovariance(assume_centered=True).fit(centered).covariance_
        rank = int(np.linalg.matrix_rank(cov, hermitian=True))
        if rank < f.shape[1] and estimator == "auto":
            log.info("empirical covariance has rank %d < %d: Ledoit-Wolf", rank, f.shape[1])
            used = "ledoit-wolf"
        elif rank < f.shape[1]:
            raise ValueError(
                f"the empirical covariance has rank {rank} < {f.shape[1]}: use 'ledoit-wolf'"
            )
        else:
            used = "empirical"
    if used == "ledoit-wolf":
        lw = LedoitWolf(assume_centered=True).fit(centered)
        cov, shrinkage = lw.covariance_, float(lw.shrinkage_)
    precision = np.linalg.inv(cov)
    precision = (precision + precision.T) / 2  # exactly symmetric, for the factorization
    return MahalanobisFit(means=means, precision=precision, estimator=used, shrinkage=shrinkage)


def folded_weights(fit: MahalanobisFit) -> tuple[np.ndarray, np.ndarray]:
    """`(W (d, d), μW (K, d))` with `W Wᵀ = P`: `D_k = ‖f̂ W − μ_k W‖²`.

    `W` is a square root of the precision from its eigendecomposition (`P = V Λ Vᵀ`,
    `W = V Λ^½`): it exists for any symmetric positive semi-definite `P`, where a Cholesky
    factor would fail on round-off negative eigenvalues.
    """
    evals, evecs = np.linalg.eigh(fit.precision)
    w = evecs * np.sqrt(np.clip(evals, 0.0, None))[None, :]  # (d, d)
    return w, fit.means @ w


class MahalanobisScore(nn.Module):
    """Features `(N, d)` -> `min_k (f̂ − μ_k)ᵀ P (f̂ − μ_k)` `(N,)`: one matmul, in the graph."""

    weight: torch.Tensor
    projected_means: torch.Tensor

    def __init__(self, fit: MahalanobisFit) -> None:
        super().__init__()
        w, mw = folded_weights(fit)
        self.register_buffer("weight", torch.from_numpy(w).float())
        self.register_buffer("projected_means", torch.from_numpy(mw).float())

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        f = torch.nn.functional.normalize(features.float(), dim=1)
        a = f @ self.weight  # (N, d)
        diff = a[:, None, :] - self.projected_means[None, :, :]  # (N, K, d)
        return (diff * diff).sum(dim=2).min(dim=1).values


@torch.no_grad()
def extract_features(model: nn.Module, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """Penultimate features `(N, d)` of uint8 (or `[0, 1]` float) images, in eval mode on CPU.

    `model.forward_features` takes `[0, 1]` pixels (our `Classifier` normalizes inside).
    """
    forward_features = getattr(model, "forward_features", None)
    if forward_features is None:
        raise TypeError(f"{type(model).__name__} has no forward_features(x) -> (N, d)")
    model.eval()
    device = next(model.parameters()).device
    out = []
    for i in range(0, len(images), batch_size):
        x = torch.from_numpy(graph_input(images[i : i + batch_size])).to(device)
        out.append(forward_features(x).float().cpu().numpy())
    return np.concatenate(out)


def training_features(model: nn.Module, splits: Splits, batch_size: int = 256) -> np.ndarray:
    """Features of the training split: arrays as they are, image folders decoded in chunks
    (without augmentation, exactly as serving would decode them)."""
    if splits.train_files is None:
        return extract_features(model, splits.train_x, batch_size)
    from training.data.image_files import ImageFiles

    assert splits.preprocess is not None  # image folders carry their preprocessing
    files = ImageFiles(splits.train_files, splits.train_y, splits.preprocess, augment=False)
    out = []
    for i in range(0, len(files), batch_size):
        chunk = np.stack([files[j][0].numpy() for j in range(i, min(i + batch_size, len(files)))])
        out.append(extract_features(model, chunk, batch_size))
    return np.concatenate(out)


def fit_on_training_split(
    model: nn.Module, splits: Splits, estimator: str = "auto"
) -> MahalanobisFit:
    """The Mahalanobis fit of `model`'s normalized features on its training split."""
    fit = fit_mahalanobis(
        training_features(model, splits), splits.train_y, len(splits.labels), estimator
    )
    log.info(
        "Mahalanobis fit on %d training images: %s covariance (shrinkage %.3g)",
        len(splits.train_y),
        fit.estimator,
        fit.shrinkage,
    )
    return fit
