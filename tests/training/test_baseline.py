"""The frozen-baseline figures: pseudo-OOD made from validation images, the Mahalanobis score
against a direct numpy computation, and AUROC 1.0 where the sets are separable."""

from __future__ import annotations

import numpy as np
import torch
from sklearn.covariance import LedoitWolf

from training.baseline import Mahalanobis, aurocs, frozen_figures
from training.pseudo_ood import BASELINE_SETS, baseline_sets, mosaic, pixel_shuffle


def _images(n: int = 12, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 3, 16, 16), dtype=np.uint8)


def test_every_pseudo_ood_set_has_the_validation_shape() -> None:
    x = _images()
    sets = baseline_sets(x)
    assert list(sets) == list(BASELINE_SETS)
    for name, s in sets.items():
        assert s.shape == x.shape and s.dtype == np.uint8, name
        assert not np.array_equal(s, x), name


def test_mosaic_quadrants_are_subsampled_validation_images() -> None:
    x = _images()
    m = mosaic(x, np.random.default_rng(0))
    quadrant = m[0, :, :8, :8]
    assert any(np.array_equal(quadrant, img[:, ::2, ::2]) for img in x)


def test_pixel_shuffle_keeps_each_images_colors() -> None:
    x = _images()
    s = pixel_shuffle(x, np.random.default_rng(0))
    for a, b in zip(x, s, strict=True):
        assert sorted(map(tuple, a.reshape(3, -1).T)) == sorted(map(tuple, b.reshape(3, -1).T))


def test_mahalanobis_equals_a_numpy_reference() -> None:
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(3), 50)
    feats = rng.normal(size=(150, 5)) + 3 * rng.normal(size=(3, 5))[labels]
    maha = Mahalanobis(torch.from_numpy(feats), torch.from_numpy(labels))
    test = rng.normal(size=(7, 5))
    x = test / np.linalg.norm(test, axis=1, keepdims=True)
    f = feats / np.linalg.norm(feats, axis=1, keepdims=True)
    means = np.stack([f[labels == k].mean(0) for k in range(3)])
    lw = LedoitWolf(assume_centered=True).fit(f - means[labels])  # an independent fit
    precision = np.linalg.inv(lw.covariance_)
    ref = -np.min([np.einsum("nd,de,ne->n", x - m, precision, x - m) for m in means], axis=0)
    np.testing.assert_allclose(maha.score(test), ref, rtol=1e-6)
    # The means are those of the normalized training features.
    np.testing.assert_allclose(maha.fit.means, means)


def test_separable_sets_give_auroc_one_and_the_figures_have_every_set() -> None:
    rng = np.random.default_rng(1)
    labels = np.repeat(np.arange(2), 60)
    dirs = np.eye(8)[:2] * 5
    train = torch.from_numpy(dirs[labels] + 0.1 * rng.normal(size=(120, 8)))
    val_y = np.repeat(np.arange(2), 20)
    val = torch.from_numpy(dirs[val_y] + 0.1 * rng.normal(size=(40, 8)))
    far = {"away": torch.from_numpy(np.eye(8)[5] * 5 + 0.1 * rng.normal(size=(30, 8)))}
    fig = frozen_figures((train, torch.from_numpy(labels)), val, val_y, far)
    assert fig["linear_probe_val_accuracy"] == 1.0
    assert fig["mahalanobis_auroc"] == {"away": 1.0, "mean": 1.0, "min": 1.0}
    assert aurocs(np.array([1.0, 2.0]), {"a": np.array([0.0]), "b": np.array([1.5])})["min"] == 0.5
