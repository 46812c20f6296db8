"""Response models: what the API returns, as OpenAPI documents it (with examples)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class LabelProbability(BaseModel):
    label: str
    probability: float = Field(ge=0.0, le=1.0)


class ImageResult(BaseModel):
    filename: str | None = Field(
        description="The multipart part's filename; null for a raw-body image."
    )
    class_index: int = Field(ge=0, description="Index into the model's labels.")
    label: str
    probability: float = Field(
        ge=0.0,
        le=1.0,
        description="softmax(logits / T) of the top class: T is the bundle's calibration.temperature, 1 without one.",
    )
    top_k: list[LabelProbability] = Field(description="The k most probable classes, best first.")
    min_distance: float = Field(
        ge=0.0,
        description="Distance of the feature to the nearest class prototype; larger = more OOD.",
    )
    threshold: float = Field(
        description="min_distance above which the image is OOD: the threshold of the predicted "
        "class when the model has class thresholds, else the global one."
    )
    is_ood: bool = Field(description="min_distance > threshold.")


CLASSIFY_EXAMPLE: dict[str, Any] = {
    "model": "fmnist-isomaxplus",
    "version": "1",
    "results": [
        {
            "filename": "boot.png",
            "class_index": 9,
            "label": "Ankle boot",
            "probability": 0.97,
            "top_k": [
                {"label": "Ankle boot", "probability": 0.97},
                {"label": "Sneaker", "probability": 0.02},
                {"label": "Sandal", "probability": 0.01},
            ],
            "min_distance": 0.41,
            "threshold": 0.63,
            "is_ood": False,
        }
    ],
}


class ClassifyResponse(BaseModel):
    model_config = ConfigDict(json_schema_extra={"example": CLASSIFY_EXAMPLE})

    model: str
    version: str
    results: list[ImageResult] = Field(description="One result per image, in request order.")


class ErrorResponse(BaseModel):
    detail: str = Field(
        examples=["image 1 ('boot.png'): cannot decode image: image file is truncated"]
    )


class HealthResponse(BaseModel):
    status: Literal["ok"] = "ok"


class ModelState(BaseModel):
    """One configured entry (`name`, or `name:version` when pinned)."""

    status: Literal["loading", "ready", "failed"] = Field(
        description="ready: a working version serves it; loading: none yet; failed: no version "
        "loads and none will until its files change (failed permanently)."
    )
    version: str | None = Field(default=None, description="The version `?model=` gets.")
    detail: str | None = Field(default=None, description="Why it is not ready.")


class ReadyResponse(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "example": {
                "ready": True,
                "models": {"fmnist-isomaxplus": {"status": "ready", "version": "2"}},
            }
        }
    )

    ready: bool
    detail: str | None = Field(default=None, description="Why the service is not ready.")
    models: dict[str, ModelState] = Field(description="Per configured `name` or `name:version`.")
    workers: int | None = Field(
        default=None, description="Worker processes answered for (with several workers)."
    )


class QuantileValue(BaseModel):
    q: float = Field(gt=0.0, lt=1.0)
    value: float


class CalibrationSummary(BaseModel):
    score: str = Field(
        default="min_distance",
        description="The served OOD score the thresholds are for: min_distance, or the one a "
        "result's `score` field carries (mahalanobis, entropic, mmles).",
    )
    in_distribution: Literal["lower", "higher"] = Field(
        default="lower",
        description="Which side of the threshold is in distribution: `lower` (is_ood = score > "
        "threshold) or `higher` (is_ood = score < threshold).",
    )
    split: str
    size: int
    target_tpr: float = Field(description="The manifest's calibrated operating point.")
    threshold: float = Field(description="The manifest's calibrated threshold.")
    quantile_range: tuple[float, float] = Field(
        description="The target_tpr values the quantile table can serve."
    )
    per_class: bool = Field(default=False, description="The manifest has class thresholds.")
    min_class_size: int | None = Field(
        default=None,
        description="Validation images a class needs for its own threshold (with class "
        "thresholds); a class with fewer takes the global one.",
    )
    temperature: float | None = Field(
        default=None,
        description="probability = softmax(logits / temperature); null: softmax(logits).",
    )
    quantiles: list[QuantileValue] = Field(
        default_factory=list,
        description="The manifest's quantile table of the served score on validation: `value` is the "
        "`q` quantile, so a threshold there keeps `q` of the in-distribution images. The web page "
        "draws an image's distance against it.",
    )
    class_quantiles: dict[str, list[QuantileValue]] | None = Field(
        default=None,
        description="Label -> the manifest's table for images predicted as that label (null "
        "without class thresholds): `value` is that class's threshold at the operating point "
        "that keeps `q` of all validation images (what ISOMAX_TARGET_TPR reads off).",
    )


class ModelInfo(BaseModel):
    name: str
    version: str
    status: Literal["loading", "ready", "failed"]
    error: str | None = None
    default: bool = Field(
        default=False, description="This version answers `?model=<name>` without a version."
    )
    workers: int | None = Field(default=None, description="Workers (with several workers).")
    workers_ready: int | None = Field(
        default=None, description="Workers serving this version (with several workers)."
    )
    provider: str | None = Field(
        default=None, description="The onnxruntime execution provider that actually runs it."
    )
    labels: list[str] = Field(default_factory=list)
    input: dict[str, Any] | None = Field(
        default=None, description="The preprocessing, from the manifest."
    )
    threshold: float | None = Field(default=None, description="The global threshold in use.")
    class_thresholds: dict[str, float] | None = Field(
        default=None,
        description="Label -> threshold in use for images predicted as that label; null when "
        "one global threshold judges every image.",
    )
    target_tpr: float | None = Field(
        default=None, description="The target_tpr in use (ISOMAX_TARGET_TPR or the manifest's)."
    )
    global_threshold_classes: list[str] | None = Field(
        default=None,
        description="Labels whose images the global threshold judges: those with fewer than "
        "`calibration.min_class_size` validation images predicted as them (too few for a "
        "threshold of their own), or every label when `class_thresholds` is null.",
    )
    calibration: CalibrationSummary | None = None
    metrics: dict[str, Any] | None = Field(
        default=None, description="Accuracy and OOD metrics from the manifest."
    )
    created: str | None = None
    source_commit: str | None = None
    description: str | None = None


class ModelsResponse(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "example": {
                "models": [
                    {
                        "name": "fmnist-isomaxplus",
                        "version": "1",
                        "status": "ready",
                        "provider": "CPUExecutionProvider",
                        "labels": ["T-shirt/top", "Trouser", "...", "Ankle boot"],
                        "threshold": 0.63,
                        "target_tpr": 0.95,
                    }
                ]
            }
        }
    )

    models: list[ModelInfo]
