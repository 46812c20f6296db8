"""Putting a loaded bundle into service, and taking it out again.

Loading (`service/loading.py`) ends with a checked, warm session. Serving it needs more: a
batcher, started on the event loop, whose callbacks feed the model's metrics (batch sizes,
inference time, queue depth, verdicts and drift), and a count of the requests that hold it, so
that a hot swap stops its batcher only once they have answered. Both are built here, when the
registry puts a version into service, and nowhere else.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, fields

from isomax.contract.drift import DriftTable
from service.batching import Batcher
from service.loading import LoadedBundle
from service.metrics import PrometheusMetrics
from service.settings import Settings

log = logging.getLogger(__name__)

# A retired version's batcher stops once nobody holds it, and not before this many seconds after
# the swap: a request that read the old snapshot just before the swap takes its lease in the
# same event-loop step, microseconds later.
RETIRE_GRACE_S = 1.0


@dataclass
class LoadedModel(LoadedBundle):
    """A bundle in service: its session and threshold (LoadedBundle), batcher and leases."""

    drift: DriftTable  # level buckets at that operating point (docs/metrics.md, "Drift")
    batcher: Batcher
    # Requests that resolved this version and have not answered yet (event loop only).
    leases: int = 0

    def lease(self) -> Lease:
        """Hold this version for one request: a hot swap retires it only after the release.

        Take it in the same event-loop step as `ModelRegistry.resolve` (no await between).
        """
        return Lease(self)


class Lease:
    """`with model.lease():` holds `model` for the block (a class: a generator-based context
    manager costs several times more per request)."""

    __slots__ = ("model",)

    def __init__(self, model: LoadedModel) -> None:
        self.model = model

    def __enter__(self) -> LoadedModel:
        self.model.leases += 1
        return self.model

    def __exit__(self, *exc: object) -> None:
        self.model.leases -= 1


def put_in_service(
    bundle: LoadedBundle,
    settings: Settings,
    metrics: PrometheusMetrics,
    loop: asyncio.AbstractEventLoop,
) -> LoadedModel:
    """`bundle` with its batcher wired to the model's metrics and started on `loop`."""
    ref, manifest, thresholds = bundle.ref, bundle.manifest, bundle.thresholds
    drift = DriftTable.from_calibration(
        manifest.calibration, len(manifest.labels), thresholds.per_class is not None,
        thresholds.target_tpr,
    )  # fmt: skip
    batcher = Batcher(
        ref.key,
        bundle.run,
        max_batch_size=settings.max_batch_size,
        max_wait_s=settings.max_wait_s,
        max_queue_images=settings.max_queue_images,
        max_queue_wait_s=settings.max_queue_wait_ms / 1000.0,
        on_batch=batch_observer(metrics, ref.name),
        on_queue=metrics.queue_observer(ref.name, ref.version),
        on_outputs=metrics.output_observer(ref.name, manifest.labels, drift, thresholds),
    )
    loaded = {f.name: getattr(bundle, f.name) for f in fields(LoadedBundle)}
    model = LoadedModel(**loaded, drift=drift, batcher=batcher)
    batcher.start(loop)
    return model


def batch_observer(metrics: PrometheusMetrics, name: str) -> Callable[[int, float], None]:
    """The batcher's per-run callback for `name`: its batch size and inference time."""
    batch_hist = metrics.batch_size.labels(name)
    infer_hist = metrics.inference_duration.labels(name)

    def on_batch(size: int, seconds: float) -> None:
        batch_hist.observe(size)
        infer_hist.observe(seconds)

    return on_batch


@dataclass
class _Retiring:
    model: LoadedModel
    since: float


class Retirement:
    """Versions that left the served set, their batchers running until nobody holds them.

    Used by the registry's manager thread only (and by `close` once that thread has ended).
    """

    def __init__(self) -> None:
        self._waiting: list[_Retiring] = []

    def __bool__(self) -> bool:
        return bool(self._waiting)

    def add(self, model: LoadedModel) -> None:
        self._waiting.append(_Retiring(model, time.monotonic()))

    def models(self) -> list[LoadedModel]:
        return [r.model for r in self._waiting]

    def stop_idle(self, force: bool = False, timeout: float = 10.0) -> None:
        """Stop the batchers of retired versions that nobody holds any more (all: `force`)."""
        now = time.monotonic()
        keep: list[_Retiring] = []
        for r in self._waiting:
            idle = r.model.leases == 0 and r.model.batcher.pending == 0
            if force or (idle and now - r.since >= RETIRE_GRACE_S):
                r.model.batcher.stop(timeout)
                log.info("model %s: retired", r.model.ref.key)
            else:
                keep.append(r)
        self._waiting = keep


def served_gauges(
    metrics: PrometheusMetrics,
    names: list[str],
    by_name: dict[str, LoadedModel],
    by_key: dict[str, LoadedModel],
    retiring: Retirement,
) -> None:
    """The gauges of what is served: per model its readiness, default version, thresholds and
    the drift shares calibration expects; per version `model_info` (0 once retired)."""
    m = metrics
    for name in names:
        m.model_ready.labels(name).set(int(name in by_name))
        default = by_name.get(name)
        if default is not None:
            t = default.thresholds
            m.threshold.labels(name).set(t.overall)
            for label, value in zip(default.labels, t.per_class or (), strict=False):
                m.class_threshold.labels(name, label).set(value)
            m.default_version.labels(name).set(int(default.version))
            m.set_drift_expected(
                name, default.labels, default.drift, t.target_tpr,
                default.manifest.calibration.size,
            )  # fmt: skip
    for model in by_key.values():
        m.model_info.labels(model.name, model.version, model.provider).set(1)
    for model in retiring.models():
        if model.ref.key not in by_key:
            m.model_info.labels(model.name, model.version, model.provider).set(0)
