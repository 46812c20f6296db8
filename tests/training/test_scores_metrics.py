"""OOD scores (sign, formula, numerical safety) and metrics (hand-checked values, ties, errors)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from training.ood_metrics import accuracy, ood_metrics
from training.scores import (
    SCORES,
    energy,
    entropic,
    max_logit,
    max_probability,
    min_distance_from_logits,
    min_distance_score,
    score_fn,
    scores_for,
)

# ----------------------------------------------------------------------------- scores


def test_score_registry_names_and_heads() -> None:
    assert set(SCORES) == {"mds", "es", "mps", "energy", "max_logit", "mmles"}
    assert scores_for("softmax") == ["es", "mps", "energy", "max_logit"]
    assert scores_for("isomax") == ["es", "mps", "mds"]
    assert scores_for("isomaxplus") == ["mds", "mds_class", "es", "es_class", "mps"]
    assert scores_for("dismax") == ["mmles", "mds", "es", "mps", "max_logit"]
    scores_for("softmax").append("x")  # callers get a copy
    assert scores_for("softmax") == ["es", "mps", "energy", "max_logit"]
    with pytest.raises(ValueError, match=r"unknown head 'linear'.*isomaxplus"):
        scores_for("linear")


def test_class_margin_ranks_against_the_predicted_class_threshold() -> None:
    thresholds = np.array([0.5, 1.0])
    logits = np.array([[0.0, -1.0], [-1.0, 0.0], [0.0, -1.0]])  # predicted 0, 1, 0
    dist = np.array([0.6, 0.6, 0.4])
    margin = score_fn("mds_class", thresholds)(logits, dist)
    np.testing.assert_allclose(margin, [-0.1, 0.4, 0.1])
    # Positive exactly when the service answers is_ood = false.
    assert list(margin > 0) == [False, True, True]
    # The same distance ranks differently by class: the global MDS cannot tell them apart.
    assert min_distance_score(dist)[0] == min_distance_score(dist)[1]
    with pytest.raises(ValueError, match="needs class thresholds"):
        score_fn("mds_class")
    with pytest.raises(ValueError, match="3 class thresholds for 2 logits"):
        score_fn("mds_class", np.ones(3))(logits, dist)


def test_formulas_on_a_hand_computed_row() -> None:
    z = np.array([[0.0, math.log(3.0)]])  # softmax = [1/4, 3/4]
    assert max_probability(z)[0] == pytest.approx(0.75)
    assert entropic(z)[0] == pytest.approx(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
    assert energy(z)[0] == pytest.approx(math.log(4.0))
    assert max_logit(z)[0] == pytest.approx(math.log(3.0))
    np.testing.assert_allclose(min_distance_score(np.array([0.5, 2.0])), [-0.5, -2.0])


@pytest.mark.parametrize("name", ["es", "mps", "energy", "max_logit"])
def test_confident_outputs_score_higher_than_flat_ones(name: str) -> None:
    # Row 0: one class far ahead (in-distribution-like); row 1: all classes alike.
    z = np.array([[8.0, 0.0, 0.0], [1.0, 1.0, 1.0]])
    s = SCORES[name](z, None)
    assert s.shape == (2,) and s[0] > s[1]


def test_mds_is_higher_for_inputs_closer_to_a_prototype() -> None:
    d = np.array([0.1, 1.3])  # IsoMax+ min distances
    z = -2.0 * np.array([[0.1, 1.2], [1.3, 1.4]])  # |d_s| = 2
    s = SCORES["mds"](z, d)
    assert s[0] > s[1]
    np.testing.assert_allclose(s, -d)
    # max_logit ranks like mds for IsoMax+ (a positive rescale), and recovers IsoMax's distance.
    assert np.argsort(SCORES["max_logit"](z, None)).tolist() == np.argsort(s).tolist()
    np.testing.assert_allclose(min_distance_from_logits(z), 2.0 * d)


def test_softmax_scores_are_shift_invariant_and_energy_shifts() -> None:
    rng = np.random.default_rng(0)
    z = rng.normal(size=(5, 4))
    for fn in (max_probability, entropic):
        np.testing.assert_allclose(fn(z + 7.0), fn(z), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(energy(z + 7.0), energy(z) + 7.0)


def test_extreme_logits_stay_finite() -> None:
    z = np.array([[1000.0, 0.0], [-1000.0, 0.0], [0.0, -800.0]], dtype=np.float32)
    for fn in (max_probability, entropic, energy, max_logit):
        out = fn(z)
        assert out.dtype == np.float64 and np.isfinite(out).all()
    np.testing.assert_allclose(entropic(z), [0.0, 0.0, 0.0], atol=1e-12)
    np.testing.assert_allclose(energy(z), [1000.0, 0.0, 0.0], atol=1e-12)


def test_score_errors_name_the_shapes() -> None:
    with pytest.raises(ValueError, match=r"\(N, K\).*\(3,\)"):
        entropic(np.zeros(3))
    with pytest.raises(ValueError, match="NaN"):
        max_probability(np.array([[0.0, np.nan]]))
    with pytest.raises(ValueError, match="needs min_distance"):
        SCORES["mds"](np.zeros((2, 3)), None)
    with pytest.raises(ValueError, match=r"min_distance has shape \(3,\), logits \(2, 3\)"):
        SCORES["mds"](np.zeros((2, 3)), np.zeros(3))
    with pytest.raises(ValueError, match=r"min_distance \(2,\) contains NaN"):
        SCORES["mds"](np.zeros((2, 3)), np.array([0.0, np.nan]))


# ----------------------------------------------------------------------------- metrics


def test_perfectly_separable_scores() -> None:
    m = ood_metrics(np.array([2.0, 3.0, 4.0]), np.array([0.0, 1.0]))
    assert m == {"auroc": 1.0, "tnr_at_tpr95": 1.0, "dtacc": 1.0, "aupr_in": 1.0, "aupr_out": 1.0}


def test_reversed_scores() -> None:
    m = ood_metrics(np.array([0.0, 1.0]), np.array([2.0, 3.0, 4.0]))
    assert m["auroc"] == 0.0
    assert m["tnr_at_tpr95"] == 0.0
    assert m["dtacc"] == 0.5  # the threshold above everything: TPR 0, TNR 1


def test_hand_computed_case() -> None:
    # ID  0.9 0.8 0.6 0.3      OOD 0.7 0.5 0.4 0.1
    # AUROC: ID-over-OOD pairs 4 + 4 + 3 + 1 = 12 of 16 = 0.75.
    # TNR@TPR95: keeping all 4 ID (3/4 < 0.95) needs threshold 0.3; OOD >= 0.3 are 0.7 0.5 0.4,
    #   so FPR 3/4 and TNR 1/4.
    # DTACC: threshold 0.8 gives TPR 2/4, TNR 4/4 -> 0.75 (0.6 gives 3/4, 3/4 -> 0.75 too);
    #   no threshold does better.
    # AUPR-in, scores descending: I I O I O O I -> precisions at each ID hit 1, 1, 3/4, 4/7,
    #   each recall step 1/4: (1 + 1 + 3/4 + 4/7) / 4.
    # AUPR-out, -score descending = score ascending: O I O O I O -> precisions at each OOD hit
    #   1, 2/3, 3/4, 4/6: (1 + 2/3 + 3/4 + 4/6) / 4.
    m = ood_metrics(np.array([0.9, 0.8, 0.6, 0.3]), np.array([0.7, 0.5, 0.4, 0.1]))
    assert m["auroc"] == pytest.approx(0.75)
    assert m["tnr_at_tpr95"] == pytest.approx(0.25)
    assert m["dtacc"] == pytest.approx(0.75)
    assert m["aupr_in"] == pytest.approx((1 + 1 + 3 / 4 + 4 / 7) / 4)
    assert m["aupr_out"] == pytest.approx((1 + 2 / 3 + 3 / 4 + 4 / 6) / 4)


def test_ties_count_half() -> None:
    assert ood_metrics(np.ones(3), np.ones(5))["auroc"] == 0.5
    # Pairs: 2>1, 2>0, 1=1 (half), 1>0 -> 3.5 / 4.
    assert ood_metrics(np.array([2.0, 1.0]), np.array([1.0, 0.0]))["auroc"] == 0.875


def test_tnr_keeps_exactly_95_percent_when_possible() -> None:
    # 100 ID scores 0..99: the threshold 5 keeps 95 of them; OOD -10..89 has 85 values >= 5.
    m = ood_metrics(np.arange(100.0), np.arange(-10.0, 90.0))
    assert m["tnr_at_tpr95"] == pytest.approx(0.15)
    # 20 ID scores: 19/20 must count as reaching 0.95 (threshold 1, not 0).
    m = ood_metrics(np.arange(20.0), np.arange(20.0) - 0.5)  # OOD >= 1: 18 of 20
    assert m["tnr_at_tpr95"] == pytest.approx(0.1)


def test_aupr_out_is_aupr_in_with_the_roles_swapped() -> None:
    rng = np.random.default_rng(1)
    s_in, s_out = rng.normal(1.0, 1.0, 50), rng.normal(0.0, 1.0, 70)
    assert ood_metrics(s_in, s_out)["aupr_out"] == pytest.approx(
        ood_metrics(-s_out, -s_in)["aupr_in"]
    )
    assert ood_metrics(s_in, s_out)["auroc"] == pytest.approx(ood_metrics(-s_out, -s_in)["auroc"])


@pytest.mark.parametrize(
    ("s_in", "s_out", "pattern"),
    [
        (
            np.array([]),
            np.array([1.0]),
            r"score_in must be a non-empty 1-D array, got shape \(0,\)",
        ),
        (np.array([1.0]), np.zeros((2, 2)), r"score_out .* got shape \(2, 2\)"),
        (np.array([1.0, np.nan]), np.array([1.0]), r"score_in \(2,\) contains NaN"),
        (np.array([1.0]), np.array([np.inf]), "score_out .* infinite"),
    ],
)
def test_metric_input_errors(s_in: np.ndarray, s_out: np.ndarray, pattern: str) -> None:
    with pytest.raises(ValueError, match=pattern):
        ood_metrics(s_in, s_out)


def test_accuracy_from_logits_or_predictions() -> None:
    logits = np.array([[0.1, 0.9], [0.8, 0.2], [0.3, 0.7], [0.6, 0.4]])
    labels = np.array([1, 0, 0, 0])
    assert accuracy(logits, labels) == 0.75
    assert accuracy(np.array([1, 0, 0, 0]), labels) == 1.0
    with pytest.raises(ValueError, match=r"got \(4, 2\) and \(3,\)"):
        accuracy(logits, labels[:3])
    with pytest.raises(ValueError, match=r"got \(0,\) and \(0,\)"):
        accuracy(np.array([]), np.array([]))
