"""evaluate(): every score of a head on every OOD set, class thresholds from the validation split."""

from __future__ import annotations

import numpy as np
import pytest

from training.evaluate import evaluate


def _images(classes: np.ndarray, distances: np.ndarray) -> np.ndarray:
    """uint8 images that carry their predicted class and distance (in hundredths)."""
    x = np.zeros((len(classes), 1, 1, 2), np.uint8)
    x[:, 0, 0, 0] = classes
    x[:, 0, 0, 1] = np.round(distances * 100)
    return x


def _predict(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A two-class IsoMax+-like model: logits from the class, min_distance from the image."""
    classes = x[:, 0, 0, 0].astype(int)
    dist = x[:, 0, 0, 1].astype(np.float64) / 100
    logits = -np.where(np.eye(2)[classes] == 1, dist[:, None], 1.5)
    return logits.astype(np.float32), dist.astype(np.float32)


def _split(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Class 0 sits tight (distances 0.2-0.4), class 1 loose (0.8-1.0)."""
    classes = np.arange(n) % 2
    dist = np.where(classes == 0, rng.uniform(0.2, 0.4, n), rng.uniform(0.8, 1.0, n))
    return _images(classes, dist), classes


def test_class_thresholds_catch_what_one_threshold_cannot() -> None:
    rng = np.random.default_rng(0)
    test_x, test_y = _split(rng, 400)
    val = _split(rng, 400)
    # OOD look-alikes of the tight class: nearest to its prototype, farther than any of it.
    ood = _images(np.zeros(200, int), rng.uniform(0.55, 0.65, 200))
    report, outputs = evaluate(_predict, "isomaxplus", test_x, test_y, {"ood": ood}, val=val)

    assert report["scores"] == ["mds", "mds_class", "es", "es_class", "mps"]
    assert report["accuracy"] == {"test": 1.0, "val": 1.0}
    assert report["sizes"] == {"test": 400, "val": 400, "ood": 200}
    t0, t1 = report["class_thresholds"]["mds_class"]
    # 95% of each class on validation (distances stored in hundredths, as float32)
    assert 0.375 <= t0 <= 0.4 + 1e-6 and 0.975 <= t1 <= 1.0 + 1e-6
    assert report["ood"]["ood"]["mds_class"]["auroc"] == pytest.approx(1.0)
    assert report["ood"]["ood"]["mds_class"]["tnr_at_tpr95"] == 1.0
    # The global MDS puts the look-alikes between the two classes: only half separate.
    assert report["ood"]["ood"]["mds"]["auroc"] == pytest.approx(0.5, abs=0.01)
    assert set(outputs) == {"in", "ood"}


def test_given_thresholds_are_used_and_without_any_the_score_is_left_out() -> None:
    rng = np.random.default_rng(1)
    test_x, test_y = _split(rng, 200)
    ood = _images(np.zeros(50, int), np.full(50, 0.6))
    report, _ = evaluate(
        _predict,
        "isomaxplus",
        test_x,
        test_y,
        {"ood": ood},
        score_thresholds={"mds_class": np.array([0.5, 1.0])},
    )
    assert report["class_thresholds"] == {"mds_class": [0.5, 1.0]}
    assert "es_class" not in report["scores"]  # no thresholds given, no validation split
    # Margins: ID 0.1-0.3 (class 0) and 0-0.2 (class 1), OOD 0.5 - 0.6 < 0: all separated.
    assert report["ood"]["ood"]["mds_class"]["auroc"] == pytest.approx(1.0)
    # Thresholds that sit too high: OOD margin 0.7 - 0.6 = 0.1 ranks among class 1's 0-0.2.
    loose, _ = evaluate(
        _predict,
        "isomaxplus",
        test_x,
        test_y,
        {"ood": ood},
        score_thresholds={"mds_class": np.array([0.7, 1.0])},
    )
    assert loose["ood"]["ood"]["mds_class"]["auroc"] == pytest.approx(0.75, abs=0.02)
    bare, _ = evaluate(_predict, "isomaxplus", test_x, test_y, {"ood": ood})
    assert bare["scores"] == ["mds", "es", "mps"] and "class_thresholds" not in bare
    softmax, _ = evaluate(_predict, "softmax", test_x, test_y, {"ood": ood}, val=_split(rng, 100))
    assert "mds_class" not in softmax["scores"] and "class_thresholds" not in softmax
