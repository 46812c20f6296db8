"""Threshold calibration: keeps the target share of ID on its own split; table usable at serve."""

from __future__ import annotations

import numpy as np
import pytest

from isomax.contract.manifest import Calibration
from isomax.contract.verdict import Thresholds
from training.calibrate import (
    QUANTILE_GRID,
    calibrate,
    keep_quantile,
    per_class_thresholds,
)


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


def _two_classes(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Class 0 sits tight (distances ~0.3), class 1 loose (~0.9), plus 10 images of class 2."""
    d = np.r_[rng.uniform(0.2, 0.4, 800), rng.uniform(0.6, 1.2, 1200), rng.uniform(0, 1, 10)]
    classes = np.r_[np.zeros(800, int), np.ones(1200, int), np.full(10, 2)]
    return d, classes


@pytest.mark.parametrize("target", [0.9, 0.95, 0.99])
def test_class_thresholds_keep_the_target_overall_and_fit_each_class(target: float) -> None:
    d, classes = _two_classes(np.random.default_rng(1))
    cal = calibrate(d, target_tpr=target, val_classes=classes, num_classes=4, min_class_size=50)
    assert cal.per_class is not None and cal.min_class_size == 50
    t = np.array([c.threshold for c in cal.per_class])
    kept = np.mean(d <= t[classes])
    assert target - 1e-12 <= kept < target + 2.0 / len(d)  # the overall target, as one threshold
    # The tight class gets a threshold of its own, far below the global one, and keeps at least
    # the target of its images; the loose class is capped at the global level.
    tight, loose = cal.per_class[0], cal.per_class[1]
    assert not tight.pooled and tight.size == 800 and not loose.pooled and loose.size == 1200
    assert tight.threshold < 0.45 < cal.threshold
    assert np.mean(d[classes == 0] <= tight.threshold) >= target
    assert loose.threshold >= cal.threshold  # the level q is above target_tpr, so is its cap
    # Too few (10) or no images: the global level-q threshold, sizes stay true.
    for c, size in ((2, 10), (3, 0)):
        entry = cal.per_class[c]
        assert entry.pooled and entry.size == size and entry.threshold == loose.threshold
    assert cal.class_thresholds_for(target) == tuple(t)


def test_noise_like_inputs_in_a_loose_class_stay_flagged() -> None:
    # Class 1 is very loose; without the cap its own 95% quantile would pass distances up to 1.9.
    rng = np.random.default_rng(6)
    d = np.r_[rng.uniform(0.2, 0.4, 900), rng.uniform(0.5, 2.0, 100)]
    classes = np.r_[np.zeros(900, int), np.ones(100, int)]
    cal = calibrate(d, val_classes=classes, num_classes=2)
    assert cal.per_class is not None
    own_95 = np.quantile(d[classes == 1], 0.95)
    assert cal.per_class[1].threshold < own_95 - 0.2  # capped: 1.72 here, against 1.94
    assert cal.per_class[0].threshold < 0.4


def test_class_thresholds_of_any_score_match_the_manifest_calibration() -> None:
    d, classes = _two_classes(np.random.default_rng(5))
    cal = calibrate(d, val_classes=classes, num_classes=4)
    np.testing.assert_array_equal(
        per_class_thresholds(d, classes, 4), cal.class_thresholds_for(cal.target_tpr)
    )
    with pytest.raises(ValueError, match="same"):
        per_class_thresholds(d, classes[:-1], 4)


def test_class_thresholds_move_along_their_own_tables() -> None:
    d, classes = _two_classes(np.random.default_rng(2))
    cal = calibrate(d, val_classes=classes, num_classes=3)
    assert cal.per_class is not None
    at_90 = cal.class_thresholds_for(0.9)
    assert at_90 is not None
    kept = np.mean(d <= np.array(at_90)[classes])
    assert abs(kept - 0.9) < 0.01  # a grid point: exactly the calibrated rule at 0.9
    between = cal.class_thresholds_for(0.905)  # interpolated between grid points 0.9 and 0.91
    assert between is not None and 0.9 <= np.mean(d <= np.array(between)[classes]) <= 0.91
    with pytest.raises(ValueError, match="outside the calibrated range"):
        cal.class_thresholds_for(0.3)
    assert calibrate(d).class_thresholds_for(0.9) is None  # no classes given: none


def test_the_verdict_judges_by_the_predicted_class_threshold() -> None:
    d, classes = _two_classes(np.random.default_rng(3))
    per_class = calibrate(d, val_classes=classes, num_classes=3)
    thresholds, flags = Thresholds.lookup(per_class).judge(classes.tolist(), d.tolist())
    want = np.array(per_class.class_thresholds_for(0.95))[classes]
    np.testing.assert_array_equal(thresholds, want)
    np.testing.assert_array_equal(flags, d > want)
    global_only = calibrate(d)
    thresholds, flags = Thresholds.lookup(global_only).judge(classes.tolist(), d.tolist())
    np.testing.assert_array_equal(flags, d > global_only.threshold)
    # Class thresholds turned off: the global one, whatever the bundle holds.
    _, flags = Thresholds.lookup(per_class, per_class=False).judge(classes.tolist(), d.tolist())
    np.testing.assert_array_equal(flags, d > per_class.threshold)
    # Another operating point: the tables' reading at that target.
    moved = Thresholds.lookup(per_class, 0.9)
    assert moved.per_class == per_class.class_thresholds_for(0.9)
    assert moved.overall == per_class.threshold_for(0.9)


@pytest.mark.parametrize(
    ("classes", "num_classes", "pattern"),
    [
        (np.zeros(5, int), None, "come together"),
        (np.zeros(4, int), 2, "shape"),
        (np.array([0, 1, 2, 3, 5]), 5, r"class indices in \[0, 5\)"),
        (np.array([0, -1, 0, 0, 0]), 2, "class indices"),
    ],
)
def test_bad_class_inputs_are_refused(classes, num_classes, pattern) -> None:
    with pytest.raises(ValueError, match=pattern):
        calibrate(np.linspace(0.1, 1, 5), val_classes=classes, num_classes=num_classes)


def test_manifest_refuses_inconsistent_class_calibration() -> None:
    d, classes = _two_classes(np.random.default_rng(4))
    cal = calibrate(d, val_classes=classes, num_classes=3).model_dump()
    with pytest.raises(ValueError, match="come together"):
        Calibration.model_validate({**cal, "min_class_size": None})
    with pytest.raises(ValueError, match="add up"):
        bad = [dict(e) for e in cal["per_class"]]
        bad[0]["size"] += 1
        Calibration.model_validate({**cal, "per_class": bad})
    with pytest.raises(ValueError, match="global q grid"):
        bad = [dict(e) for e in cal["per_class"]]
        bad[0]["quantiles"] = bad[0]["quantiles"][1:]
        Calibration.model_validate({**cal, "per_class": bad})


def test_class_flagged_is_the_share_each_class_threshold_flags() -> None:
    """per_class[].flagged: what the drift metrics expect of each class's OOD rate."""
    d, classes = _two_classes(np.random.default_rng(4))
    cal = calibrate(d, val_classes=classes, num_classes=3)
    assert cal.per_class is not None
    for c, entry in enumerate(cal.per_class):
        mine = d[classes == c]
        assert entry.flagged == (float(np.mean(mine > entry.threshold)) if mine.size else 0.0)
    overall = sum(e.flagged * e.size for e in cal.per_class if e.flagged is not None) / cal.size
    assert overall == pytest.approx(1 - cal.target_tpr, abs=2 / cal.size)
