"""OOD threshold on the served score from held-out in-distribution data only (no OOD data).

For `min_distance` (and any score where lower is in-distribution) the threshold is the smallest
value that keeps at least `target_tpr` of the validation images (`is_ood = score > threshold`);
for a score where higher is in-distribution it is the largest value that does (`is_ood = score
< threshold`), computed as the same rule on the negated score. A table of further quantiles goes
into the manifest so that an operator can move the target at serve time without recalibrating
(`Calibration.threshold_for` interpolates in it).
"""

from __future__ import annotations

import logging
import math

import numpy as np

from isomax.contract.manifest import Calibration, ClassCalibration, QuantilePoint
from isomax.contract.verdict import SERVED_SCORES

log = logging.getLogger(__name__)

# A predicted class needs this many validation images for thresholds of its own; with fewer, the
# 0.95 quantile rests on a couple of images, and the global threshold stands in (`pooled`).
MIN_CLASS_SIZE = 50

# Coarse where operators rarely go, fine where they do (0.9-0.999 of ID kept).
QUANTILE_GRID: tuple[float, ...] = (
    0.50, 0.55, 0.60, 0.65, 0.70, 0.75, 0.80, 0.85, 0.90,
    0.91, 0.92, 0.93, 0.94, 0.95, 0.96, 0.97, 0.98, 0.99,
    0.995, 0.999,
)  # fmt: skip


def keep_quantile(sorted_values: np.ndarray, q: float) -> float:
    """The smallest value `t` with at least a fraction `q` of `sorted_values` `<= t`.

    This is the order statistic `x_(k)` with `k = ceil(q·N)`, numpy's `method="inverted_cdf"`.
    It is computed here because `np.quantile` forms `q·N` in floating point and overshoots
    by a whole sample when it lands on an integer (0.55 · 100 = 55.000000000000007 picks the
    56th value), which would keep more than the target; the 1e-9 slack absorbs that rounding.
    """
    n = len(sorted_values)
    k = min(max(math.ceil(q * n - 1e-9), 1), n)
    return float(sorted_values[k - 1])


def _table(sorted_d: np.ndarray, qs: list[float], sign: float) -> tuple[QuantilePoint, ...]:
    return tuple(QuantilePoint(q=q, value=sign * keep_quantile(sorted_d, q)) for q in qs)


def _ood_values(values: np.ndarray, score: str) -> tuple[np.ndarray, float]:
    """(values in "larger = more OOD" units, the sign that maps them back) for `score`."""
    if score not in SERVED_SCORES:
        raise ValueError(f"unknown score {score!r}; choose one of {', '.join(SERVED_SCORES)}")
    d = np.asarray(values, dtype=np.float64)
    if d.ndim != 1 or d.shape[0] == 0:
        raise ValueError(f"val_scores must be a non-empty 1-D array, got shape {d.shape}")
    if not np.isfinite(d).all():
        raise ValueError(f"val_scores {d.shape} contains NaN or infinite values")
    if score == "min_distance" and d.min() < 0:
        # Distances are >= 0; negative values usually mean the score (-distance) was passed.
        raise ValueError(
            f"val_min_distance must be >= 0 (min is {d.min():.4g}): pass distances, "
            "not the higher-is-in-distribution score"
        )
    sign = -1.0 if SERVED_SCORES[score] == "higher" else 1.0
    return sign * d, sign


def calibrate(
    val_min_distance: np.ndarray,
    target_tpr: float = 0.95,
    split: str = "val",
    val_classes: np.ndarray | None = None,
    num_classes: int | None = None,
    min_class_size: int = MIN_CLASS_SIZE,
    score: str = "min_distance",
) -> Calibration:
    """Threshold keeping `target_tpr` of the validation scores, plus the quantile table.

    `val_min_distance` are the model's outputs of the served `score` (default the
    `min_distance` output, larger = more OOD; for a score in `SERVED_SCORES` where higher is
    in-distribution, its values as they are) on a split held out of the training data, never
    the test set and never OOD data.
    With `val_classes` (the *predicted* class of each of those images, as the service will
    know it) and `num_classes`, each class also gets its own threshold and table
    (`ClassCalibration` says why).
    """
    d, sign = _ood_values(val_min_distance, score)
    if not 0.0 < target_tpr < 1.0:
        raise ValueError(f"target_tpr must be in (0, 1), got {target_tpr}")
    if (val_classes is None) != (num_classes is None):
        raise ValueError("val_classes and num_classes come together")
    qs = sorted(set(QUANTILE_GRID) | {float(target_tpr)})
    d_sorted = np.sort(d)
    table = _table(d_sorted, qs, sign)
    threshold = keep_quantile(d_sorted, target_tpr)
    kept = float(np.mean(d <= threshold))
    log.info(
        "calibrated %s on %s (%d images): threshold %.6g keeps %.4f of ID (target %.4f)",
        score,
        split,
        len(d),
        sign * threshold,
        kept,
        target_tpr,
    )
    per_class = None
    if val_classes is not None and num_classes is not None:
        per_class = _per_class(
            d, np.asarray(val_classes), num_classes, qs, target_tpr, min_class_size, sign
        )
    return Calibration(
        score=score,
        in_distribution=SERVED_SCORES[score],
        split=split,
        size=len(d),
        target_tpr=target_tpr,
        threshold=sign * threshold,
        quantiles=table,
        min_class_size=None if per_class is None else min_class_size,
        per_class=per_class,
    )


class _ClassDistances:
    """Validation distances sorted per predicted class, for thresholds at any level `q`."""

    def __init__(
        self, d: np.ndarray, classes: np.ndarray, num_classes: int, min_class_size: int
    ) -> None:
        if classes.shape != d.shape:
            raise ValueError(f"val_classes has shape {classes.shape}, distances {d.shape}")
        if num_classes < 1 or classes.min() < 0 or classes.max() >= num_classes:
            raise ValueError(f"val_classes must be class indices in [0, {num_classes})")
        if min_class_size < 1:
            raise ValueError(f"min_class_size must be >= 1, got {min_class_size}")
        self.d, self.classes = d, classes
        self.all = np.sort(d)
        self.per_class = [np.sort(d[classes == c]) for c in range(num_classes)]
        self.own = [len(dc) >= min_class_size for dc in self.per_class]

    def at(self, q: float) -> np.ndarray:
        """Each class's own level-q threshold, capped by the global level-q one."""
        t_all = keep_quantile(self.all, q)
        return np.array(
            [min(keep_quantile(dc, q), t_all) if own else t_all
             for dc, own in zip(self.per_class, self.own, strict=True)]
        )  # fmt: skip

    def for_target(self, target_tpr: float) -> np.ndarray:
        """Class thresholds at the smallest level q that keeps `target_tpr` of all images."""
        lo, hi = target_tpr, 1.0  # keeps < target at lo (capping only lowers), all at 1.0
        if self.kept(self.at(lo)) >= target_tpr:
            return self.at(lo)
        for _ in range(40):  # the level is found to 1e-12; each step halves the interval
            mid = (lo + hi) / 2
            if self.kept(self.at(mid)) >= target_tpr:
                hi = mid
            else:
                lo = mid
        return self.at(hi)

    def kept(self, thresholds: np.ndarray) -> float:
        return float(np.mean(self.d <= thresholds[self.classes]))


def _per_class(
    d: np.ndarray,
    classes: np.ndarray,
    num_classes: int,
    qs: list[float],
    target_tpr: float,
    min_class_size: int,
    sign: float = 1.0,
) -> tuple[ClassCalibration, ...]:
    """One `ClassCalibration` per class: its threshold at `target_tpr` and at every grid target.

    `d` are in "larger = more OOD" units; `sign` maps thresholds back to the score's own."""
    cd = _ClassDistances(d, classes, num_classes, min_class_size)
    grid = np.stack([cd.for_target(q) for q in qs])  # (len(qs), K), non-decreasing down columns
    at_target = grid[qs.index(target_tpr)]  # the grid holds the target (calibrate adds it)
    small = [c for c in range(num_classes) if not cd.own[c]]
    if small:
        log.info("classes %s have < %d validation images: global threshold", small, min_class_size)
    log.info(
        "class thresholds keep %.4f of %d validation images (target %.4f)",
        cd.kept(at_target),
        len(d),
        target_tpr,
    )
    return tuple(
        ClassCalibration(
            size=len(cd.per_class[c]),
            pooled=not cd.own[c],
            threshold=sign * float(at_target[c]),
            # in "larger = more OOD" units, where d and at_target both are
            flagged=float(np.mean(cd.per_class[c] > at_target[c])) if cd.per_class[c].size else 0.0,
            quantiles=tuple(
                QuantilePoint(q=q, value=sign * float(v))
                for q, v in zip(qs, grid[:, c], strict=True)
            ),
        )
        for c in range(num_classes)
    )


def per_class_thresholds(
    ood_values: np.ndarray,
    classes: np.ndarray,
    num_classes: int,
    target_tpr: float = 0.95,
    min_class_size: int = MIN_CLASS_SIZE,
) -> np.ndarray:
    """The class thresholds of `calibrate(...).per_class` for any score (larger = more OOD).

    `ood_values` are `−score` on the validation split (for MDS: `min_distance`), `classes` the
    predicted classes. `ClassCalibration` describes the rule.
    """
    v = np.asarray(ood_values, dtype=np.float64)
    c = np.asarray(classes)
    if v.ndim != 1 or v.shape != c.shape or len(v) == 0:
        raise ValueError(f"ood_values {v.shape} and classes {c.shape} must be the same (N,)")
    return _ClassDistances(v, c, num_classes, min_class_size).for_target(target_tpr)
