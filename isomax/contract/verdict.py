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

from collections.abc import Sequence
from dataclasses import dataclass

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
        self, predicted: Sequence[int], min_distance: Sequence[float]
    ) -> tuple[list[float], list[bool]]:
        """(threshold applied, is_ood) per image, from its predicted class and `min_distance`.

        `predicted` are class indices (the argmax of the logits), `min_distance` the graph's
        output. Plain Python over lists, not numpy: the service judges a handful of images per
        request on its event loop, where numpy's per-call overhead on tiny arrays cost 10-15% of
        one worker's requests/s (measured A/B, docs/serving.md); evaluation passes `.tolist()`
        of whole splits, which takes milliseconds.
        """
        if self.per_class is None:
            thresholds = [self.overall] * len(predicted)
        else:
            table = self.per_class
            thresholds = [table[c] for c in predicted]
        return thresholds, [d > t for d, t in zip(min_distance, thresholds, strict=True)]
