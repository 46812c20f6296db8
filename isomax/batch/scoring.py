"""The bundle as the service loads it, and rows as the service answers them.

Loading is `service.loading.load_model` itself (manifest, sha256, provider with the
no-silent-CPU-fallback rule of `device=cuda`, input/output checks, thresholds at the operating
point), so a bundle the service refuses is refused here with the same reason. Rows come from
`service.classify.result_rows`, the code that builds /classify's answers (argmax, probability
with the bundle's temperature, the verdict through `Thresholds.judge`): a file scored here and
the same file POSTed to the service give the same class, score and verdict.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from isomax.batch.decoding import Limits, Meta
from isomax.contract.decode import graph_input
from isomax.contract.manifest import MANIFEST_FILE, Manifest
from service.classify import Upload, result_rows
from service.discovery import BundleRef, discover
from service.loading import LoadedBundle, load_model
from service.settings import Settings

log = logging.getLogger(__name__)

# The output's columns, in order (output.SCHEMA gives their types). `score` is the served
# score, the one the verdict compares with `threshold` (`min_distance` unless the bundle serves
# another, as the default bundle serves `mahalanobis`).
COLUMNS = (
    "path", "class", "label", "probability", "score", "min_distance", "threshold", "is_ood",
    "width", "height", "format", "error",
)  # fmt: skip


@dataclass(frozen=True)
class ScorerConfig:
    """Everything needed to open the same scorer again in another process (Ray actors).

    `settings` are the driver's resolved service settings (limits, device, operating point),
    so that an actor on another node does not read that node's environment instead.
    """

    bundle: str  # the bundle directory
    models_dir: str  # the directory `load_model` checks the bundle is inside
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def limits(self) -> Limits:
        return limits_of(Settings(**self.settings))

    def open(self, threads: int | None = None) -> Scorer:
        values = dict(self.settings)
        if threads is not None:
            values["intra_op_threads"] = threads
        settings = Settings(**values)
        manifest = Manifest.read(Path(self.bundle))
        ref = BundleRef(manifest.name, manifest.version, Path(self.bundle))
        # One warm-up run (batch 1) instead of the service's 1..max_batch_size: the batch
        # path forms its own batches.
        model = load_model(ref, settings, Path(self.models_dir))
        return Scorer(self, settings, model)


@dataclass
class Scorer:
    config: ScorerConfig
    settings: Settings
    model: LoadedBundle

    @property
    def limits(self) -> Limits:
        return limits_of(self.settings)

    def rows(self, metas: list[Meta], pixels: np.ndarray | None) -> list[dict[str, Any]]:
        """One row per meta, in order: the decoded ones scored in one onnxruntime run
        (`pixels` holds them, [n_ok, C, H, W] uint8), the others as error rows."""
        results: list[dict[str, Any]] = []
        if pixels is not None:
            logits, distance = self.model.run(graph_input(pixels))
            uploads = [Upload(m.path, b"") for m in metas if m.error is None]
            results, _ = result_rows(self.model, uploads, logits, distance, top_k=1)
        scored = iter(results)
        return [row_of(m, None if m.error else next(scored)) for m in metas]


def limits_of(s: Settings) -> Limits:
    """The service's per-image limits (413 there, an error row here)."""
    return Limits(s.max_image_bytes, s.max_image_pixels, s.max_image_decoded_bytes)


def row_of(meta: Meta, result: dict[str, Any] | None) -> dict[str, Any]:
    row: dict[str, Any] = dict.fromkeys(COLUMNS)
    row.update(path=meta.path, width=meta.width, height=meta.height, format=meta.format)
    row["error"] = meta.error
    if result is not None:
        distance = result["min_distance"]
        row.update(
            {
                "class": result["class_index"],
                "label": result["label"],
                "probability": result["probability"],
                # the served score: a generalised verdict names it `score` in the answer
                "score": result.get("score", distance),
                "min_distance": distance,
                "threshold": result["threshold"],
                "is_ood": result["is_ood"],
            }
        )
    return row


class BundleNotFoundError(ValueError):
    """BUNDLE_OR_MODELS_DIR is neither a bundle nor a models directory with one model."""


def scorer_config(
    target: Path,
    model: str | None = None,
    target_tpr: float | None = None,
    **settings: Any,
) -> ScorerConfig:
    """The bundle `target` names: a bundle directory (holding manifest.json), or a models
    directory and `model` (`name` or `name:version`; optional when it holds one model).

    `target_tpr` moves the operating point of this model; `settings` override the service's
    (ISOMAX_* environment variables apply as for `isomax serve`).
    """
    target = Path(target)
    if (target / MANIFEST_FILE).is_file():
        bundle, models_dir = target, target.parent.parent
        # The bundle was named directly: the symlink guard protects a served directory.
        settings.setdefault("allow_symlinks", True)
    else:
        refs = discover(target, (model,) if model else ())
        if len(refs) != 1:
            names = ", ".join(r.key for r in refs)
            raise BundleNotFoundError(
                f"{target} holds several models ({names}); pick one with --model"
            )
        bundle, models_dir = refs[0].path, target
    if target_tpr is not None:
        settings["target_tpr"] = {Manifest.read(bundle).name: target_tpr}
    resolved = Settings(models_dir=models_dir, max_batch_size=1, **settings)
    values = resolved.model_dump(mode="json", exclude={"admin_token"}, exclude_unset=False)
    return ScorerConfig(str(bundle), str(models_dir), values)
