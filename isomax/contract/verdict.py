"""The OOD verdict: which threshold applies to an image, and whether the image is out.

One rule, used by the service for every request, by the export when it writes the share of each
set that the served verdict flags, and by evaluation. docs/bundle-format.md (section
"Calibration") describes the thresholds; docs/api.md says what a client reads.

    threshold = per_class[predicted class]   when the bundle has class thresholds (and they are on)
              = the global threshold         otherwise
    is_ood    = min_distance > threshold

Both thresholds are looked up for an operating point `target_tpr` (the share of in-distribution
images to keep) in the manifest's quantile tables, so an operator can move it without
recalibrating.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np

from isomax.contract.manifest import Calibration


@dataclass(frozen=True)
class Thresholds:
    """The thresholds in force for one model at one operating point."""

    target_tpr: float
    overall: float  # the global threshold: all images when per_class is None
    per_class: tuple[float, ...] | None  # one per label, in label order

    @classmethod
    def lookup(
        cls, calibration: Calibration, target_tpr: float | None = None, per_class: bool = True
    ) -> Thresholds:
        """The thresholds keeping `target_tpr` (default: the calibrated one) of ID images.

        `per_class=False` ignores the bundle's class thresholds. Raises ValueError for a target
        outside the calibrated range (the tables are not extrapolated).
        """
        tpr = calibration.target_tpr if target_tpr is None else float(target_tpr)
        return cls(
            target_tpr=tpr,
            overall=float(calibration.threshold_for(tpr)),
            per_class=calibration.class_thresholds_for(tpr) if per_class else None,
        )

    def judge(
        self, predicted: np.ndarray, min_distance: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """(threshold applied, is_ood) per image, from its predicted class and `min_distance`.

        `predicted` are class indices (argmax of the logits), `min_distance` the graph's output;
        both `(N,)`. The thresholds come back as float64, `is_ood` as bool.
        """
        d = np.asarray(min_distance)
        if self._per_class_array is None:
            t = np.full(d.shape, self.overall, dtype=np.float64)
        else:
            t = self._per_class_array[np.asarray(predicted)]
        return t, d > t

    @cached_property
    def _per_class_array(self) -> np.ndarray | None:
        # Built once per model, not per request (~10 us each on the service's hot path).
        return None if self.per_class is None else np.asarray(self.per_class, dtype=np.float64)
