"""The bundle manifest: the one schema that training writes and the service reads.

A bundle is `models/<name>/<version>/{model.onnx, manifest.json}` (Triton-style repository).
Training imports this module to write the manifest, the service imports it to read it, so
the two halves cannot disagree about a field. Nothing here imports torch.
"""

from __future__ import annotations

import bisect
import hashlib
import json
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

__all__ = [
    "MANIFEST_FILE",
    "NAME_PATTERN",
    "VERSION_PATTERN",
    "Calibration",
    "CalibrationError",
    "ClassCalibration",
    "Direction",
    "EvaluationMetrics",
    "Manifest",
    "OODMetrics",
    "OnnxSpec",
    "Preprocess",
    "QuantilePoint",
    "sha256_file",
]

FORMAT_VERSION: Literal[1] = 1
MANIFEST_FILE = "manifest.json"
NAME_PATTERN = r"^[a-z0-9][a-z0-9._-]{0,63}$"
VERSION_PATTERN = r"^[0-9]{1,9}$"

# Which way a score is in-distribution: "lower" (a distance: is_ood = score > threshold) or
# "higher" (is_ood = score < threshold).
Direction = Literal["lower", "higher"]

ResizeFilter = Literal["nearest", "box", "bilinear", "hamming", "bicubic", "lanczos"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class OnnxSpec(_Strict):
    """Where the graph is and how to call it; sha256 is checked at load."""

    file: str = "model.onnx"
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    opset: int = Field(ge=7)
    input_name: str = "image"
    logits_name: str = "logits"
    distance_name: str = "min_distance"

    @field_validator("file")
    @classmethod
    def _plain_file_name(cls, v: str) -> str:
        # The bundle must be self-contained: no paths that escape its directory.
        if "/" in v or "\\" in v or v in {"", ".", ".."}:
            raise ValueError(f"onnx.file must be a plain file name, got {v!r}")
        return v


class Preprocess(_Strict):
    """Everything needed to turn an uploaded image into the graph's input, as training did.

    The graph takes float32 `[N, C, H, W]` in `[0, 1]`; mean/std are applied inside the graph and
    are recorded here for documentation only.
    """

    height: int = Field(ge=1, le=4096)
    width: int = Field(ge=1, le=4096)
    channels: Literal[1, 3]
    color_mode: Literal["L", "RGB"]
    resize_filter: ResizeFilter = "bilinear"
    # "stretch": resize to (width, height) ignoring aspect ratio (what 28x28 sets were made with).
    # "center_crop": scale the shorter side to fit, then crop the center (ImageNet style).
    resize_mode: Literal["stretch", "center_crop"] = "stretch"
    # Transparent pixels are composited onto this gray level (0-255) before color conversion;
    # Fashion-MNIST objects sit on black, so 0 matches its training images.
    alpha_background: int = Field(default=0, ge=0, le=255)
    exif_transpose: bool = True
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)

    @model_validator(mode="after")
    def _consistent(self) -> Preprocess:
        want = 1 if self.color_mode == "L" else 3
        if self.channels != want:
            raise ValueError(
                f"color_mode {self.color_mode} needs {want} channel(s), got {self.channels}"
            )
        for field in ("mean", "std"):
            if len(getattr(self, field)) not in (1, self.channels):
                raise ValueError(f"{field} must have 1 or {self.channels} values")
        if any(s <= 0 for s in self.std):
            raise ValueError("std values must be > 0")
        return self


class QuantilePoint(_Strict):
    """`value` is the threshold on the served score that keeps a share `q` of validation images
    (for min_distance: its `q` quantile)."""

    q: float = Field(gt=0.0, lt=1.0)
    value: float


def _check_quantiles(v: tuple[QuantilePoint, ...]) -> tuple[QuantilePoint, ...]:
    """q strictly increasing; values monotone (`_check_direction` says which way)."""
    qs = [p.q for p in v]
    vals = [p.value for p in v]
    if qs != sorted(qs) or len(set(qs)) != len(qs):
        raise ValueError("quantiles must be strictly increasing in q")
    if vals != sorted(vals) and vals != sorted(vals, reverse=True):
        raise ValueError("quantile values must be monotone in q")
    return v


def _check_direction(v: tuple[QuantilePoint, ...], direction: Direction, what: str) -> None:
    """Keeping more in-distribution images moves a threshold toward OOD: up for a score where
    lower is in-distribution, down for one where higher is."""
    vals = [p.value for p in v]
    want = sorted(vals, reverse=direction == "higher")
    if vals != want:
        way = "non-decreasing" if direction == "lower" else "non-increasing"
        raise ValueError(f"{what} values must be {way} in q for a score where {direction} is ID")


def _read_off(
    quantiles: tuple[QuantilePoint, ...], target_tpr: float, exact: tuple[float, float]
) -> float:
    """Threshold keeping `target_tpr`, by linear interpolation in a quantile table.

    `exact` is the (target, threshold) pair calibrated directly, returned as is. Targets outside
    the table are refused rather than extrapolated: the tails are where a guess is most wrong.
    """
    if abs(target_tpr - exact[0]) < 1e-12:
        return exact[1]
    qs = [p.q for p in quantiles]
    if not qs[0] <= target_tpr <= qs[-1]:
        raise ValueError(
            f"target_tpr {target_tpr} is outside the calibrated range [{qs[0]}, {qs[-1]}]"
        )
    i = bisect.bisect_left(qs, target_tpr)
    if qs[i] == target_tpr:
        return quantiles[i].value
    lo, hi = quantiles[i - 1], quantiles[i]
    t = (target_tpr - lo.q) / (hi.q - lo.q)
    return lo.value + t * (hi.value - lo.value)


class ClassCalibration(_Strict):
    """Threshold for the images *predicted* as one class (class thresholds).

    In-distribution distances differ by class (on the default bundle the validation median is
    0.75 for sandals and 0.96 for shirts), so one global threshold passes distant look-alikes
    of tight classes. The rule, all on validation images, no OOD data: at a level `q`, each
    class's threshold is the `q` quantile of its own distances, capped by the `q` quantile of
    all distances (so that inputs far from everything, like noise, stay flagged even when they
    land in a loose class); `q` is the smallest level at which `target_tpr` of all validation
    images are kept. `threshold` is at the manifest's `target_tpr`; `quantiles` maps other
    overall targets (`q` = target) to this class's threshold, on the global table's grid.
    `pooled`: fewer than `Calibration.min_class_size` validation images were predicted as this
    class, so it takes the global level-`q` threshold. `flagged` (optional; bundles exported
    before it lack it): the share of this class's validation images that `threshold` flags,
    what the class's OOD rate should be under in-distribution traffic (capped classes are
    flagged more often than 1 - target_tpr, the others less; docs/metrics.md, "Drift").
    """

    size: int = Field(ge=0)
    pooled: bool
    threshold: float
    quantiles: tuple[QuantilePoint, ...] = Field(min_length=2)
    flagged: float | None = Field(default=None, ge=0.0, le=1.0)

    @field_validator("quantiles")
    @classmethod
    def _sorted(cls, v: tuple[QuantilePoint, ...]) -> tuple[QuantilePoint, ...]:
        return _check_quantiles(v)


class Calibration(_Strict):
    """Threshold on the served score chosen on held-out in-distribution data only (no OOD data).

    `score` names the served score, a graph output (`isomax.contract.verdict.SERVED_SCORES`
    lists the ones the service knows; a bundle naming another is refused at load, so the name is
    not restricted here), and `in_distribution` which way it is in-distribution. Bundles without
    them serve `min_distance`, lower in-distribution. `per_class` (optional, one entry per label
    in label order) holds class-conditional thresholds; bundles without it are served with the
    global threshold.
    """

    score: str = Field(default="min_distance", pattern=r"^[a-z][a-z0-9_]{0,63}$")
    in_distribution: Direction = "lower"
    split: str
    size: int = Field(ge=1)
    target_tpr: float = Field(gt=0.0, lt=1.0)
    threshold: float
    quantiles: tuple[QuantilePoint, ...] = Field(min_length=2)
    min_class_size: int | None = Field(default=None, ge=1)
    per_class: tuple[ClassCalibration, ...] | None = None
    # Temperature scaling (optional): the served `probability` is softmax(logits / temperature),
    # with the temperature fitted on `split` by minimising the negative log-likelihood. Only the
    # probabilities change: argmax, logits, min_distance and the verdict do not. Without it
    # (older bundles) `probability` is softmax(logits).
    temperature: float | None = Field(default=None, gt=0.0, allow_inf_nan=False)

    @field_validator("quantiles")
    @classmethod
    def _sorted(cls, v: tuple[QuantilePoint, ...]) -> tuple[QuantilePoint, ...]:
        return _check_quantiles(v)

    @model_validator(mode="after")
    def _per_class_consistent(self) -> Calibration:
        if (self.per_class is None) != (self.min_class_size is None):
            raise ValueError("per_class and min_class_size come together")
        _check_direction(self.quantiles, self.in_distribution, "quantile")
        if self.per_class is not None:
            grid = [p.q for p in self.quantiles]
            for i, c in enumerate(self.per_class):
                if [p.q for p in c.quantiles] != grid:
                    raise ValueError(f"per_class[{i}] quantiles must use the global q grid")
                _check_direction(c.quantiles, self.in_distribution, f"per_class[{i}] quantile")
            if sum(c.size for c in self.per_class) != self.size:
                raise ValueError("per_class sizes must add up to the calibration size")
        return self

    def threshold_for(self, target_tpr: float) -> float:
        """The global threshold that keeps `target_tpr` of in-distribution images."""
        return _read_off(self.quantiles, target_tpr, (self.target_tpr, self.threshold))

    def class_thresholds_for(self, target_tpr: float) -> tuple[float, ...] | None:
        """Per predicted class, the threshold keeping `target_tpr` of that class; None without."""
        if self.per_class is None:
            return None
        return tuple(
            _read_off(c.quantiles, target_tpr, (self.target_tpr, c.threshold))
            for c in self.per_class
        )


class OODMetrics(_Strict):
    """One score on one OOD set; in-distribution is the positive class (docs/bundle-format.md)."""

    auroc: float = Field(ge=0.0, le=1.0)
    tnr_at_tpr95: float = Field(ge=0.0, le=1.0)
    dtacc: float = Field(ge=0.0, le=1.0)
    aupr_in: float = Field(ge=0.0, le=1.0)
    aupr_out: float = Field(ge=0.0, le=1.0)


class CalibrationError(_Strict):
    """Expected calibration error of the top-class probability, before and after the temperature.

    ECE = sum over equal-width confidence bins of (share of images in the bin) x |accuracy -
    mean confidence| in the bin.
    """

    bins: int = Field(ge=1)
    before: float = Field(ge=0.0, le=1.0)  # softmax(logits)
    after: float = Field(ge=0.0, le=1.0)  # softmax(logits / calibration.temperature)
    # |mean top-class probability - accuracy| over the split, without and with the temperature
    # (optional: older manifests have only the ECE).
    gap_before: float | None = Field(default=None, ge=0.0, le=1.0)
    gap_after: float | None = Field(default=None, ge=0.0, le=1.0)


class EvaluationMetrics(_Strict):
    accuracy: dict[str, float] = Field(default_factory=dict)  # split -> accuracy in [0, 1]
    ood: dict[str, dict[str, OODMetrics]] = Field(default_factory=dict)  # set -> score -> metrics
    # split or OOD set -> share the calibrated threshold flags as OOD: what an operator should
    # expect of `is_ood` (about 1 - target_tpr on in-distribution traffic, by design).
    flagged: dict[str, float] = Field(default_factory=dict)
    # split -> expected calibration error of `probability` (with a calibration.temperature).
    calibration_error: dict[str, CalibrationError] = Field(default_factory=dict)


class Manifest(_Strict):
    format_version: Literal[1] = FORMAT_VERSION
    name: str = Field(pattern=NAME_PATTERN)
    version: str = Field(pattern=VERSION_PATTERN)
    created: datetime
    source_commit: str | None = None
    description: str = ""
    onnx: OnnxSpec
    preprocess: Preprocess
    labels: tuple[str, ...] = Field(min_length=2)
    training: dict[str, Any] = Field(default_factory=dict)
    metrics: EvaluationMetrics = Field(default_factory=EvaluationMetrics)
    calibration: Calibration

    @field_validator("labels")
    @classmethod
    def _unique_labels(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        if len(set(v)) != len(v):
            raise ValueError("labels must be unique")
        return v

    @model_validator(mode="after")
    def _one_calibration_per_label(self) -> Manifest:
        per_class = self.calibration.per_class
        if per_class is not None and len(per_class) != len(self.labels):
            raise ValueError(
                f"calibration.per_class has {len(per_class)} entries for {len(self.labels)} labels"
            )
        return self

    @classmethod
    def read(cls, bundle_dir: Path) -> Manifest:
        return cls.model_validate_json((Path(bundle_dir) / MANIFEST_FILE).read_text())

    def write(self, bundle_dir: Path) -> Path:
        path = Path(bundle_dir) / MANIFEST_FILE
        path.write_text(json.dumps(self.model_dump(mode="json"), indent=2) + "\n")
        return path


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
