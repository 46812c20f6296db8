"""The OOD verdict: which threshold applies to an image, and whether the image is out.

One rule, used by the service for every request, by the export when it writes the share of each
set that the served verdict flags, and by evaluation. docs/bundle-format.md (section
"Calibration") describes the thresholds; docs/api.md says what a client reads.

    threshold = per_class[predicted class]   when the bundle has class thresholds (and they are on)
              = the global threshold         otherwise
    is_ood    = score > threshold            for a score where lower is in-distribution
                score < threshold            for a score where higher is in-distribution

`score` is the bundle's served score (`calibration.score`, one of `SERVED_SCORES`): the graph's
`min_distance` output for every bundle without the field (lower is in-distribution, so the rule
is `min_distance > threshold`, as it always was), else the graph output of that name.

Both thresholds are looked up for an operating point `target_tpr` (the share of in-distribution
images to keep) in the manifest's quantile tables, so an operator can move it without
recalibrating.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from isomax.contract.manifest import Calibration, Direction

__all__ = ["SERVED_SCORES", "Thresholds", "UnknownScoreError"]

# The scores a bundle may serve -> which way is in-distribution. Each is an output of the graph,
# computed in the same forward pass as the logits (docs/bundle-format.md, "model.onnx").
SERVED_SCORES: dict[str, Direction] = {
    "min_distance": "lower",  # min_j ‖f̂ − p̂_j‖ (IsoMax+'s MDS), every bundle's
    "entropic": "higher",  # Σ_j p_j log p_j, p = softmax(logits): the negative entropy
    "mmles": "higher",  # max logit + mean logit + negative entropy (DisMax)
    "mahalanobis": "lower",  # min_k (f̂ − μ_k)ᵀ P (f̂ − μ_k) on the normalized features
}


class UnknownScoreError(ValueError):
    """The manifest names a served score this code does not know (or gives it the wrong way)."""


def served_score(calibration: Calibration) -> tuple[str, Direction]:
    """(name, direction) of the bundle's served score; raises UnknownScoreError if unknown."""
    name = calibration.score
    if name not in SERVED_SCORES:
        raise UnknownScoreError(
            f"the manifest's calibration.score is {name!r}, a score this service does not know "
            f"(it knows {', '.join(sorted(SERVED_SCORES))}); serve the bundle with a service "
            "that does, or export it with a known --score"
        )
    if calibration.in_distribution != SERVED_SCORES[name]:
        raise UnknownScoreError(
            f"calibration.in_distribution is {calibration.in_distribution!r} but {name} is "
            f"in-distribution when {SERVED_SCORES[name]}"
        )
    return name, SERVED_SCORES[name]


@dataclass(frozen=True)
class Thresholds:
    """The thresholds in force for one model at one operating point."""

    target_tpr: float
    overall: float  # the global threshold: all images when per_class is None
    per_class: tuple[float, ...] | None  # one per label, in label order
    in_distribution: Direction = "lower"  # the served score's: lower (min_distance) or higher

    @classmethod
    def lookup(
        cls, calibration: Calibration, target_tpr: float | None = None, per_class: bool = True
    ) -> Thresholds:
        """The thresholds keeping `target_tpr` (default: the calibrated one) of ID images.

        `per_class=False` ignores the bundle's class thresholds. Raises ValueError for a target
        outside the calibrated range (the tables are not extrapolated), UnknownScoreError (a
        ValueError) for a served score this code does not know.
        """
        _, direction = served_score(calibration)
        tpr = calibration.target_tpr if target_tpr is None else float(target_tpr)
        return cls(
            target_tpr=tpr,
            overall=float(calibration.threshold_for(tpr)),
            per_class=calibration.class_thresholds_for(tpr) if per_class else None,
            in_distribution=direction,
        )

    def judge(
        self, predicted: Sequence[int], scores: Sequence[float]
    ) -> tuple[list[float], list[bool]]:
        """(threshold applied, is_ood) per image, from its predicted class and served score.

        `predicted` are class indices (the argmax of the logits), `scores` the graph's output of
        the served score (`min_distance` for bundles without `calibration.score`). Plain Python
        over lists, not numpy: the service judges a handful of images per
        request on its event loop, where numpy's per-call overhead on tiny arrays cost a
        measurable share of one worker's requests/s (bench/results/serving-log.md, "What each change bought");
        evaluation passes `.tolist()` of whole splits, which is cheap.
        """
        if self.per_class is None:
            thresholds = [self.overall] * len(predicted)
        else:
            table = self.per_class
            thresholds = [table[c] for c in predicted]
        if self.in_distribution == "higher":
            return thresholds, [s < t for s, t in zip(scores, thresholds, strict=True)]
        return thresholds, [s > t for s, t in zip(scores, thresholds, strict=True)]
