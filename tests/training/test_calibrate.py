"""Threshold calibration: keeps the target share of ID on its own split; table usable at serve."""

from __future__ import annotations

import numpy as np
import pytest

from service.manifest import Calibration
from training.calibrate import QUANTILE_GRID, calibrate, keep_quantile


def _brute_force(d: np.ndarray, q: float) -> float:
    """Smallest sample value keeping at least q of the samples, by trying each one."""
    return float(min(v for v in d if np.mean(d <= v) >= q - 1e-12))


@pytest.mark.parametrize("n", [1, 7, 20, 100, 1000, 4321])
@pytest.mark.parametrize("target", [0.5, 0.9, 0.95, 0.99])
def test_threshold_keeps_the_target_fraction_of_its_own_split(n: int, target: float) -> None:
    d = np.random.default_rng(n).gamma(2.0, 0.3, n)
    cal = calibrate(d, target_tpr=target)
    kept = np.mean(d <= cal.threshold)  # is_ood = d > threshold
    assert target - 1e-12 <= kept < target + 1.0 / n + 1e-12
    assert cal.size == n and cal.split == "val" and cal.target_tpr == target


@pytest.mark.parametrize("q", [0.5, 0.55, 0.7, 0.95, 0.999, 0.123])
def test_keep_quantile_is_the_smallest_value_reaching_q(q: float) -> None:
    for n in (10, 100, 200, 1000):
        d = np.sort(np.random.default_rng(n).normal(size=n))
        assert keep_quantile(d, q) == _brute_force(d, q)


def test_table_covers_the_grid_and_the_target_and_is_monotone() -> None:
    d = np.random.default_rng(0).uniform(0.0, 1.0, 5000)
    cal = calibrate(d, target_tpr=0.955, split="holdout")
    qs = [p.q for p in cal.quantiles]
    assert set(QUANTILE_GRID) <= set(qs) and 0.955 in qs
    values = [p.value for p in cal.quantiles]
    assert values == sorted(values)
    assert cal.quantiles[qs.index(0.955)].value == cal.threshold
    assert cal.split == "holdout"
    low = calibrate(d, target_tpr=0.3)
    assert low.quantiles[0].q == 0.3  # a target below the grid extends the table


def test_manifest_threshold_for_reads_the_table() -> None:
    d = np.random.default_rng(1).uniform(0.0, 1.0, 20000)
    cal = calibrate(d)
    assert cal.threshold_for(0.95) == cal.threshold
    assert cal.threshold_for(0.97) == next(p.value for p in cal.quantiles if p.q == 0.97)
    mid = cal.threshold_for(0.925)  # between grid points 0.92 and 0.93: interpolated
    lo, hi = cal.threshold_for(0.92), cal.threshold_for(0.93)
    assert lo < mid < hi
    assert mid == pytest.approx(0.925, abs=0.01)  # uniform data: quantile ~ q
    assert np.mean(d <= cal.threshold_for(0.8)) == pytest.approx(0.8, abs=1e-3)
    with pytest.raises(ValueError, match="outside the calibrated range"):
        cal.threshold_for(0.9999)
    assert Calibration.model_validate_json(cal.model_dump_json()) == cal


def test_ties_keep_everything_tied() -> None:
    cal = calibrate(np.full(10, 0.4))
    assert cal.threshold == 0.4
    assert all(p.value == 0.4 for p in cal.quantiles)


@pytest.mark.parametrize(
    ("d", "target", "pattern"),
    [
        (np.array([]), 0.95, r"non-empty 1-D array, got shape \(0,\)"),
        (np.ones((2, 3)), 0.95, r"got shape \(2, 3\)"),
        (np.array([0.1, np.nan]), 0.95, "NaN"),
        (np.array([0.1, np.inf]), 0.95, "infinite"),
        (np.array([-0.5, 0.1]), 0.95, "must be >= 0.*not the higher-is-in-distribution score"),
        (np.array([0.1, 0.2]), 0.0, r"target_tpr must be in \(0, 1\), got 0.0"),
        (np.array([0.1, 0.2]), 1.0, r"target_tpr must be in \(0, 1\), got 1.0"),
        (np.array([0.1, 0.2]), 95.0, r"target_tpr must be in \(0, 1\), got 95.0"),
    ],
)
def test_bad_inputs_are_refused(d: np.ndarray, target: float, pattern: str) -> None:
    with pytest.raises(ValueError, match=pattern):
        calibrate(d, target_tpr=target)
