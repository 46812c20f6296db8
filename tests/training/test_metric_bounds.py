"""Every metric the manifest schema bounds is produced within its bounds, on small sets too.

scikit-learn's `average_precision_score` returns 1 + 2e-16 for some perfectly separated
(ID count, OOD count) pairs, which the manifest refused at export (issue: a 3-class photo
folder with 20 OOD photos could not be exported).
"""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

from isomax.contract.manifest import CalibrationError, OODMetrics
from training.ood_metrics import TPR_TARGET, ood_metrics
from training.temperature import expected_calibration_error

COUNTS = range(5, 61)


def _separated(n_in: int, n_out: int, ties: bool) -> tuple[np.ndarray, np.ndarray]:
    s_in, s_out = np.linspace(1.0, 2.0, n_in), np.linspace(-2.0, -0.5, n_out)
    if ties:  # a few distinct values, each shared by several images of the same side
        s_in, s_out = np.round(s_in * 2) / 2, np.round(s_out * 2) / 2
    return s_in, s_out


@pytest.mark.parametrize("ties", [False, True], ids=["distinct", "ties"])
def test_perfectly_separated_scores_give_exactly_one_on_the_whole_small_grid(ties: bool) -> None:
    over = []
    for n_in in COUNTS:
        for n_out in COUNTS:
            m = ood_metrics(*_separated(n_in, n_out, ties))
            OODMetrics(**m)  # the manifest's own bounds: this raised for 688 pairs before
            if any(v != 1.0 for v in m.values()):
                over.append((n_in, n_out, m))
    assert over == []


def test_scikit_learn_itself_exceeds_one_on_that_grid() -> None:
    """Why the metrics count in integers: scikit-learn's float sum fails the grid above."""
    pairs = ((n_in, n_out) for n_in in COUNTS for n_out in COUNTS)
    above = next(
        (n_in, n_out)
        for n_in, n_out in pairs
        if average_precision_score(
            np.r_[np.ones(n_in), np.zeros(n_out)], np.r_[_separated(n_in, n_out, ties=False)]
        )
        > 1.0
    )
    assert ood_metrics(*_separated(*above, ties=False))["aupr_in"] == 1.0


def test_reversed_and_overlapping_scores_stay_in_bounds() -> None:
    for n_in in COUNTS:
        for n_out in COUNTS:
            s_in, s_out = _separated(n_in, n_out, ties=True)
            OODMetrics(**ood_metrics(s_out, s_in))  # perfectly wrong: AUROC 0
            OODMetrics(**ood_metrics(np.r_[s_in, s_out[:2]], np.r_[s_out, s_in[:2]]))


def _sklearn(s_in: np.ndarray, s_out: np.ndarray) -> dict[str, float]:
    """The same five metrics straight from scikit-learn: the independent reference."""
    y, s = np.r_[np.ones(len(s_in)), np.zeros(len(s_out))], np.r_[s_in, s_out]
    fpr, tpr, _ = roc_curve(y, s, drop_intermediate=False)
    i95 = int(np.argmax(tpr >= TPR_TARGET - 1e-12))
    return {
        "auroc": roc_auc_score(y, s),
        "tnr_at_tpr95": 1.0 - fpr[i95],
        "dtacc": float(np.max(0.5 * (tpr + 1.0 - fpr))),
        "aupr_in": average_precision_score(y, s),
        "aupr_out": average_precision_score(1 - y, -s),
    }


def test_every_metric_equals_scikit_learn_on_random_scores_with_ties() -> None:
    rng = np.random.default_rng(0)
    for _ in range(150):
        decimals = int(rng.integers(0, 3))  # 0-2 decimals: few to no ties
        s_in = np.round(rng.normal(size=int(rng.integers(1, 300))) + 0.7, decimals)
        s_out = np.round(rng.normal(size=int(rng.integers(1, 300))), decimals)
        got, want = ood_metrics(s_in, s_out), _sklearn(s_in, s_out)
        assert got == pytest.approx(want, abs=1e-12)


def test_expected_calibration_error_stays_in_bounds_at_its_extremes() -> None:
    for n in COUNTS:
        wrong = np.tile([[0.0, 60.0]], (n, 1))  # confidence 1.0, always wrong: ECE 1
        right = np.tile([[60.0, 0.0]], (n, 1))
        labels = np.zeros(n, dtype=np.int64)
        CalibrationError(
            bins=15,
            before=expected_calibration_error(wrong, labels),
            after=expected_calibration_error(right, labels),
        )
