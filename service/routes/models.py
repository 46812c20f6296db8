"""GET /models, and the per-worker summary of the models that it is built from.

Every worker publishes `worker_state` on the worker board (service/workers.py) whenever its
registry changes; /models merges what every worker published, so with several workers a
version reads `ready` only when every worker serves it.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from fastapi import APIRouter

from service.registry import ModelRegistry
from service.registry_state import ModelStatus
from service.schemas import CalibrationSummary, ModelInfo, ModelsResponse, QuantileValue
from service.state import StateDep
from service.workers import merge_models

router = APIRouter()


@router.get("/models", response_model=ModelsResponse)
async def list_models(state: StateDep) -> ModelsResponse:
    """Every loaded or tried version: status, provider, labels, threshold, manifest summary.

    With several workers, a version reads `ready` only when every worker serves it.
    """
    infos = merge_models(state.board.collect())
    return ModelsResponse(models=[ModelInfo.model_validate(i) for i in infos])


def model_info(st: ModelStatus) -> ModelInfo:
    info = ModelInfo(
        name=st.ref.name, version=st.ref.version, status=st.status, error=st.error,
        default=st.default,
    )  # fmt: skip
    m = st.model
    if m is None:
        return info
    cal = m.manifest.calibration
    info.provider = m.provider
    info.labels = list(m.labels)
    info.input = m.manifest.preprocess.model_dump(mode="json")
    info.threshold = m.thresholds.overall
    if m.thresholds.per_class is not None:
        info.class_thresholds = dict(zip(m.labels, m.thresholds.per_class, strict=True))
    info.target_tpr = m.thresholds.target_tpr
    info.global_threshold_classes = (
        list(m.labels)
        if m.thresholds.per_class is None or cal.per_class is None
        else [label for label, c in zip(m.labels, cal.per_class, strict=True) if c.pooled]
    )
    info.calibration = CalibrationSummary(
        score=cal.score,
        in_distribution=cal.in_distribution,
        split=cal.split,
        size=cal.size,
        target_tpr=cal.target_tpr,
        threshold=cal.threshold,
        quantile_range=(cal.quantiles[0].q, cal.quantiles[-1].q),
        per_class=cal.per_class is not None,
        min_class_size=cal.min_class_size,
        temperature=cal.temperature,
        quantiles=[QuantileValue(q=p.q, value=p.value) for p in cal.quantiles],
        class_quantiles=None
        if cal.per_class is None
        else {
            label: [QuantileValue(q=p.q, value=p.value) for p in c.quantiles]
            for label, c in zip(m.labels, cal.per_class, strict=True)
        },
    )
    info.metrics = m.manifest.metrics.model_dump(mode="json")
    info.created = m.manifest.created.isoformat()
    # The commit only: a "-dirty" suffix says the training tree had uncommitted changes, which is
    # for whoever holds the bundle (its manifest keeps it), not for every caller of /models.
    commit = m.manifest.source_commit
    info.source_commit = commit.removesuffix("-dirty") if commit else commit
    info.description = m.manifest.description or None
    return info


def worker_state(registry: ModelRegistry) -> dict[str, Any]:
    """What this worker publishes on the board: readiness, entries, versions (JSON)."""
    return {
        "ready": registry.ready,
        "entries": {k: asdict(e) for k, e in registry.entries.items()},
        "models": [model_info(st).model_dump(mode="json") for st in registry.statuses.values()],
    }
