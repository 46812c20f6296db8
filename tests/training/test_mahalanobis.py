"""Mahalanobis score: the fit against a direct numpy computation, the in-graph fold against it."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn

from isomax.contract.decode import graph_input
from training.export import export_onnx
from training.mahalanobis import (
    MahalanobisFit,
    MahalanobisScore,
    extract_features,
    fit_mahalanobis,
    normalize,
)
from training.models import build_model


def _blobs(n: int = 600, d: int = 8, k: int = 3, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = np.arange(n) % k
    centers = rng.normal(0, 3, (k, d))
    return centers[y] + rng.normal(0, 1, (n, d)) * rng.uniform(0.3, 2.0, d), y


def test_fit_is_class_means_and_inverse_pooled_covariance():
    x, y = _blobs()
    fit = fit_mahalanobis(x, y, 3)
    f = x / np.linalg.norm(x, axis=1, keepdims=True)
    means = np.stack([f[y == k].mean(0) for k in range(3)])
    dev = f - means[y]
    cov = dev.T @ dev / len(f)  # maximum likelihood, one covariance for all classes
    assert fit.estimator == "empirical" and fit.shrinkage == 0.0
    np.testing.assert_allclose(fit.means, means, atol=1e-12)
    np.testing.assert_allclose(fit.precision, np.linalg.inv(cov), rtol=1e-8)
    # A training image is nearest (in Mahalanobis distance) to its own, well-separated class.
    assert (fit.distances(x).argmin(1) == y).mean() > 0.95


def test_rank_deficient_features_get_ledoit_wolf():
    x, y = _blobs()
    x = np.concatenate([x, np.zeros((len(x), 2))], axis=1)  # two features that are always 0
    fit = fit_mahalanobis(x, y, 3)
    assert fit.estimator == "ledoit-wolf" and 0.0 < fit.shrinkage < 1.0
    assert np.isfinite(fit.precision).all()
    with pytest.raises(ValueError, match="rank 8 < 10"):
        fit_mahalanobis(x, y, 3, estimator="empirical")


def test_bad_inputs_are_refused():
    x, y = _blobs()
    with pytest.raises(ValueError, match="every one of 4 classes"):
        fit_mahalanobis(x, y, 4)
    with pytest.raises(ValueError, match="labels have shape"):
        fit_mahalanobis(x, y[:-1], 3)
    with pytest.raises(ValueError, match="unknown estimator"):
        fit_mahalanobis(x, y, 3, estimator="mcd")


def test_score_is_larger_far_from_the_data():
    x, y = _blobs()
    fit = fit_mahalanobis(x, y, 3)
    far = np.random.default_rng(1).normal(0, 1, (200, 8))  # directions unlike any class
    assert np.median(fit.score(far)) > np.quantile(fit.score(x), 0.95)


class _FeaturesAndScore(nn.Module):
    """image -> (features, Mahalanobis score): both outputs of one forward pass."""

    def __init__(self, model: nn.Module, fit: MahalanobisFit) -> None:
        super().__init__()
        self.model = model
        self.score = MahalanobisScore(fit)

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.model.forward_features(image)
        return f, self.score(f)


def test_in_graph_score_equals_numpy_reference(tmp_path):
    torch.manual_seed(0)
    model = build_model("smallcnn", "isomaxplus", 3, 1, [0.5], [0.25]).eval()
    rng = np.random.default_rng(0)
    train = rng.integers(0, 256, (400, 1, 28, 28), dtype=np.uint8)
    labels = np.arange(400) % 3
    fit = fit_mahalanobis(extract_features(model, train), labels, 3)
    graph = _FeaturesAndScore(model, fit).eval()
    path = tmp_path / "m.onnx"
    test = rng.integers(0, 256, (33, 1, 28, 28), dtype=np.uint8)
    x = graph_input(test)
    export_onnx(graph, path, torch.from_numpy(x), output_names=("features", "mahalanobis"))
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    features, score = sess.run(["features", "mahalanobis"], {"image": x})
    reference = fit.score(features)  # float64, direct (f̂ − μ)ᵀ P (f̂ − μ) of the same features
    assert score.shape == (33,)
    np.testing.assert_allclose(score, reference, rtol=1e-4, atol=1e-4 * reference.mean())
    # and torch agrees with both (same graph, same features)
    with torch.no_grad():
        _, torch_score = graph(torch.from_numpy(x))
    np.testing.assert_allclose(torch_score.numpy(), score, rtol=1e-4)


def test_normalize_keeps_zero_rows():
    f = normalize(np.array([[3.0, 4.0], [0.0, 0.0]]))
    np.testing.assert_allclose(f, [[0.6, 0.8], [0.0, 0.0]])
