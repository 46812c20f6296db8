"""Drift buckets anchored to calibration: what share of in-distribution traffic lands where.

The manifest's quantile tables say, for each calibrated level `q` (an overall share of
validation images to keep), the threshold in force for each predicted class. An image's
*level bucket* is the first of those levels whose threshold (for its predicted class) keeps it:

    bucket(image) = min { i : levels[i] keeps the image }      (len(levels): kept by none)

By construction of the tables, a share `q` of the validation images is kept at level `q`, so
under in-distribution traffic bucket `i` holds `levels[i] - levels[i-1]` of the images: the
expected share is known exactly from calibration, with no reference sample shipped. In units
of the image's own class threshold this is a ratio histogram whose bounds are
`threshold_c(levels[i]) / threshold_c(target_tpr)`, which differ by class; the buckets are
named by their level (one set of bucket names for every class, docs/metrics.md).

Used by the service's metrics (per batch), by the drift benchmark and the tests: one rule.
The score direction is a parameter so that a bundle whose served score is higher for
in-distribution images buckets the same way (its thresholds then fall as the level rises).
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Sequence
from dataclasses import dataclass

from isomax.contract.manifest import Calibration

__all__ = ["DRIFT_LEVELS", "DriftTable", "level_bucket"]

# The levels used as bucket bounds, where the manifest's grid has them (plus the served
# target_tpr when it is on the grid): few buckets with expected shares of at least 1%, so a
# chi-square test over them is sound from a few hundred images (every bucket expects >= 5),
# and the tail above the usual thresholds (0.95, 0.99) is split where drift first shows.
DRIFT_LEVELS = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99)


def level_bucket(score: float, bounds: Sequence[float], higher_is_in: bool = False) -> int:
    """Index of the first level whose threshold keeps `score`; len(bounds) if none does.

    `bounds` are one class's thresholds at increasing levels: non-decreasing for a score where
    lower is in-distribution (kept when `score <= bound`, as the verdict), non-increasing when
    `higher_is_in` (kept when `score >= bound`); pass them negated then (`DriftTable` does), so
    both cases are one bisection.
    """
    return bisect.bisect_left(bounds, -score if higher_is_in else score)


def _fmt(q: float) -> str:
    return f"{q:g}"


@dataclass(frozen=True)
class DriftTable:
    """The bucket bounds of one model at one operating point, and what calibration expects."""

    levels: tuple[float, ...]  # increasing; the last bucket is above levels[-1]
    bounds: tuple[tuple[float, ...], ...]  # per class, the thresholds at `levels` (negated if
    # higher_is_in), so that level_bucket is a plain bisection
    higher_is_in: bool
    expected: tuple[float, ...]  # per bucket (len(levels) + 1): the share under ID traffic
    class_shares: tuple[float, ...] | None  # validation images predicted as each class
    class_flagged: tuple[float, ...] | None  # per class, share its threshold flags (validation)

    @property
    def bucket_names(self) -> tuple[str, ...]:
        """Label values: each bucket by its upper level, the last one "+Inf"."""
        return (*map(_fmt, self.levels), "+Inf")

    @classmethod
    def from_calibration(
        cls, calibration: Calibration, num_classes: int, per_class: bool, target_tpr: float
    ) -> DriftTable:
        """Buckets at DRIFT_LEVELS (those on the grid; the whole grid when fewer than two are),
        using the class tables when class thresholds are served, else the global table.

        `class_flagged` only at the calibrated target_tpr (it is measured there).
        """
        grid = [p.q for p in calibration.quantiles]
        wanted = set(DRIFT_LEVELS) | {target_tpr}
        picked = [i for i, q in enumerate(grid) if any(abs(q - w) < 1e-9 for w in wanted)]
        if len(picked) < 2:
            picked = list(range(len(grid)))
        levels = tuple(grid[i] for i in picked)
        sign = (
            -1.0 if calibration.in_distribution == "higher" else 1.0
        )  # the served score's direction
        global_row = tuple(sign * calibration.quantiles[i].value for i in picked)
        classes = calibration.per_class
        if per_class and classes is not None:
            bounds = tuple(tuple(sign * c.quantiles[i].value for i in picked) for c in classes)
        else:
            bounds = (global_row,) * num_classes
        edges = (0.0, *levels, 1.0)
        expected = tuple(round(b - a, 12) for a, b in itertools.pairwise(edges))
        shares = None if classes is None else tuple(c.size / calibration.size for c in classes)
        flagged = None
        at_calibrated = abs(target_tpr - calibration.target_tpr) < 1e-12
        if classes is not None and per_class and at_calibrated:
            values = [c.flagged for c in classes]
            if all(v is not None for v in values):
                flagged = tuple(float(v) for v in values if v is not None)
        return cls(levels, bounds, sign < 0, expected, shares, flagged)

    def bucket(self, score: float, predicted: int) -> int:
        return level_bucket(score, self.bounds[predicted], self.higher_is_in)
