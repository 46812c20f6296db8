"""The OOD sets: Fashion-MNIST layout, real content, reproducible sampling, clear errors."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest

from training.data import ood

EXPECTED_KEYS = ["mnist", "digits", "natural-crops", "gaussian-noise", "uniform-noise"]


def _check_layout(x: np.ndarray, n: int | None = None) -> None:
    assert x.dtype == np.uint8
    assert x.ndim == 4 and x.shape[1:] == (1, 28, 28)
    assert x.flags.c_contiguous
    if n is not None:
        assert x.shape[0] == n


def test_registry_keys_are_the_documented_ones() -> None:
    assert list(ood.OOD_SETS) == EXPECTED_KEYS


def test_mnist5k_is_white_digits_on_black() -> None:
    x = ood.load_mnist5k()
    _check_layout(x, 5000)
    assert x.max() == 255
    # Like Fashion-MNIST: the border is background (black), ink is bright and sparse.
    border = np.concatenate([x[:, 0, :2, :].ravel(), x[:, 0, -2:, :].ravel()])
    assert border.mean() < 2
    assert 20 < x.mean() < 50  # MNIST's mean pixel is ~33


def test_sklearn_digits_are_upscaled_ink_high_to_0_255() -> None:
    x = ood.load_sklearn_digits()
    _check_layout(x, 1797)
    assert x.min() == 0 and x.max() == 255
    # The 8x8 digits leave their outer columns blank: after upscaling the sides stay dark and the
    # center holds the ink (not inverted).
    assert x[:, 0, :, 0].mean() < x[:, 0, :, 12:16].mean() / 4


def test_natural_crops_are_reproducible_varied_patches() -> None:
    a = ood.load_natural_crops(64, seed=3)
    _check_layout(a, 64)
    np.testing.assert_array_equal(a, ood.load_natural_crops(64, seed=3))
    assert not np.array_equal(a, ood.load_natural_crops(64, seed=4))
    # Photos, not noise and not blank: pixels vary within a patch, and patches differ.
    assert np.median(a.reshape(64, -1).std(axis=1)) > 2
    assert len({img.tobytes() for img in a}) == 64


def test_noise_sets_cover_the_pixel_range_and_follow_the_seed() -> None:
    g = ood.gaussian_noise(50, seed=1)
    u = ood.uniform_noise(50, seed=1)
    for x in (g, u):
        _check_layout(x, 50)
    assert abs(float(g.mean()) - 128) < 3 and 55 < float(g.std()) < 66  # clipping shrinks std
    assert u.min() == 0 and u.max() == 255 and abs(float(u.mean()) - 127.5) < 3
    np.testing.assert_array_equal(g, ood.gaussian_noise(50, seed=1))
    assert not np.array_equal(u, ood.uniform_noise(50, seed=2))


def test_load_ood_sets_passes_size_and_seed_to_sampled_sets_only() -> None:
    sets = ood.load_ood_sets(["uniform-noise", "natural-crops", "mnist"], n_synthetic=10, seed=5)
    assert list(sets) == ["uniform-noise", "natural-crops", "mnist"]
    assert sets["uniform-noise"].shape[0] == 10
    assert sets["natural-crops"].shape[0] == 10
    assert sets["mnist"].shape[0] == 5000
    np.testing.assert_array_equal(sets["uniform-noise"], ood.uniform_noise(10, seed=5))


def test_load_ood_sets_accepts_a_single_name() -> None:
    assert list(ood.load_ood_sets("gaussian-noise", n_synthetic=3)) == ["gaussian-noise"]


def test_unknown_set_name_lists_the_valid_ones() -> None:
    with pytest.raises(ValueError, match="svhn") as info:
        ood.load_ood_sets(["mnist", "svhn"])
    for key in EXPECTED_KEYS:
        assert key in str(info.value)


@pytest.mark.parametrize("fn", [ood.load_natural_crops, ood.gaussian_noise, ood.uniform_noise])
def test_sampled_sets_refuse_nonpositive_size(fn: Callable[[int], np.ndarray]) -> None:
    with pytest.raises(ValueError, match="n must be >= 1"):
        fn(0)
