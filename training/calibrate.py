"""OOD threshold on `min_distance` from held-out in-distribution data only (no OOD data).

The threshold is the smallest distance that keeps at least `target_tpr` of the validation
images (`is_ood = min_distance > threshold`). A table of further quantiles goes into the
manifest so that an operator can move the target at serve time without recalibrating
(`Calibration.threshold_for` interpolates in it).
"""

from __future__ import annotations

import logging
import math

import numpy as np

from service.manifest import Calibration, QuantilePoint

log = logging.getLogger(__name__)

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


def calibrate(
    val_min_distance: np.ndarray, target_tpr: float = 0.95, split: str = "val"
) -> Calibration:
    """Threshold keeping `target_tpr` of the validation distances, plus the quantile table.

    `val_min_distance` are the model's `min_distance` outputs (larger = more OOD) on a split
    held out of the training data, never the test set and never OOD data.
    """
    d = np.asarray(val_min_distance, dtype=np.float64)
    if d.ndim != 1 or d.shape[0] == 0:
        raise ValueError(f"val_min_distance must be a non-empty 1-D array, got shape {d.shape}")
    if not np.isfinite(d).all():
        raise ValueError(f"val_min_distance {d.shape} contains NaN or infinite values")
    if d.min() < 0:
        # Distances are >= 0; negative values usually mean the score (-distance) was passed.
        raise ValueError(
            f"val_min_distance must be >= 0 (min is {d.min():.4g}): pass distances, "
            "not the higher-is-in-distribution score"
        )
    if not 0.0 < target_tpr < 1.0:
        raise ValueError(f"target_tpr must be in (0, 1), got {target_tpr}")
    d = np.sort(d)
    qs = sorted(set(QUANTILE_GRID) | {float(target_tpr)})
    table = tuple(QuantilePoint(q=q, value=keep_quantile(d, q)) for q in qs)
    threshold = keep_quantile(d, target_tpr)
    kept = float(np.mean(d <= threshold))
    log.info(
        "calibrated on %s (%d images): threshold %.6g keeps %.4f of ID (target %.4f)",
        split,
        len(d),
        threshold,
        kept,
        target_tpr,
    )
    return Calibration(
        split=split, size=len(d), target_tpr=target_tpr, threshold=threshold, quantiles=table
    )
