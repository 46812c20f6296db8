"""Drift buckets and per-class series: the bucketing rule, its agreement with the verdict, the
counters a batch adds, and the bounded class labels (docs/metrics.md, "Drift")."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from isomax.contract.drift import DRIFT_LEVELS, DriftTable, level_bucket
from isomax.contract.manifest import Manifest
from isomax.contract.verdict import Thresholds
from service.drift import OTHER_CLASS, class_series
from service.metrics import PrometheusMetrics

ROOT = Path(__file__).resolve().parents[2]
DEFAULT = ROOT / "models" / "fmnist-isomaxplus" / "2"


@pytest.fixture(scope="module")
def manifest() -> Manifest:
    if not (DEFAULT / "manifest.json").exists():
        pytest.skip("the default bundle is not in models/")
    return Manifest.read(DEFAULT)


def test_level_bucket_is_the_first_level_that_keeps_the_score() -> None:
    bounds = (0.5, 0.8, 1.0)
    assert [level_bucket(s, bounds) for s in (0.1, 0.5, 0.6, 1.0, 1.2)] == [0, 0, 1, 2, 3]
    # a score where higher is in-distribution: thresholds fall with the level, passed negated
    high = (-0.9, -0.7, -0.2)  # thresholds 0.9, 0.7, 0.2
    assert [level_bucket(s, high, higher_is_in=True) for s in (0.95, 0.9, 0.8, 0.1)] == [0, 0, 1, 3]


def test_buckets_above_the_target_are_exactly_the_flagged_images(manifest: Manifest) -> None:
    cal = manifest.calibration
    thresholds = Thresholds.lookup(cal)
    table = DriftTable.from_calibration(cal, len(manifest.labels), True, thresholds.target_tpr)
    assert table.levels == DRIFT_LEVELS
    assert sum(table.expected) == pytest.approx(1.0)
    rng = np.random.default_rng(0)
    classes = rng.integers(0, len(manifest.labels), 5000).tolist()
    scores = rng.uniform(0.6, 1.4, 5000).tolist()
    _, flags = thresholds.judge(classes, scores)
    target = table.levels.index(thresholds.target_tpr)
    assert [table.bucket(s, c) > target for s, c in zip(scores, classes, strict=True)] == flags
    # An independent reference: numpy's searchsorted over each class's table at the levels.
    grid = [p.q for p in cal.quantiles]
    cols = [grid.index(q) for q in DRIFT_LEVELS]
    assert cal.per_class is not None
    for s, c in zip(scores[:500], classes[:500], strict=True):
        bounds = np.array([cal.per_class[c].quantiles[i].value for i in cols])
        assert table.bucket(s, c) == int(np.searchsorted(bounds, s, side="left"))


def test_a_batch_adds_to_each_bucket_and_class_once(manifest: Manifest) -> None:
    metrics = PrometheusMetrics(CollectorRegistry())
    cal = manifest.calibration
    thresholds = Thresholds.lookup(cal)
    table = DriftTable.from_calibration(cal, len(manifest.labels), True, thresholds.target_tpr)
    metrics.add_model("m")
    observe = metrics.output_observer("m", manifest.labels, table, thresholds)
    metrics.set_drift_expected("m", manifest.labels, table, thresholds.target_tpr, cal.size)
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(64, len(manifest.labels))).astype(np.float32)
    distance = rng.uniform(0.7, 1.3, 64).astype(np.float32)
    observe(logits, distance)
    observe(logits[:5], distance[:5])
    get = metrics.registry.get_sample_value
    predicted = np.concatenate([logits.argmax(1), logits[:5].argmax(1)])
    d = np.concatenate([distance, distance[:5]]).astype(np.float64)
    t = np.array(thresholds.per_class)[predicted]
    for c, label in enumerate(manifest.labels):
        mine = predicted == c
        n_ood = float((d[mine] > t[mine]).sum())
        labels = {"model": "m", "label": label}
        assert get("isomax_class_images_total", {**labels, "verdict": "ood"}) == n_ood
        assert get("isomax_class_images_total", {**labels, "verdict": "in"}) == mine.sum() - n_ood
        assert get("isomax_class_share_expected", labels) == cal.per_class[c].size / cal.size  # type: ignore[index]
    per_level = [
        get("isomax_score_level_total", {"model": "m", "level": b}) for b in table.bucket_names
    ]
    assert sum(per_level) == len(d)
    assert get("isomax_target_tpr", {"model": "m"}) == 0.95
    # the default bundle predates calibration.per_class[].flagged: no per-class OOD expectation
    assert (
        get("isomax_class_ood_ratio_expected", {"model": "m", "label": manifest.labels[0]}) is None
    )


def test_class_series_fold_beyond_the_limit_into_other() -> None:
    labels = tuple(f"c{i}" for i in range(60))
    shares = [0.001] * 60
    shares[59] = 0.5  # the largest class is kept though it comes last
    series = class_series(labels, shares, limit=50)
    kept = [s for s in series if s != OTHER_CLASS]
    assert len(set(series)) == 50 and len(kept) == 49 and "c59" in kept
    assert class_series(labels[:10], None) == labels[:10]
