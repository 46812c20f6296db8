"""The per-image series, counted once per batch in the batching thread.

`isomax_images_total` (by verdict) and the `isomax_min_distance` histogram count every image the
model judged. The batcher's output observer (`OutputObserver`, one per model version) judges a
run's images once, for these series and for the drift series (service/drift.py), and adds the
run's counts at once: nothing of it runs per request on the event loop.

In one process the counts are plain numbers behind a custom collector (`CollectedImages`, on
prometheus_client's public collector API and metric families): a batch takes the lock once and
bisects each image's bucket, and /metrics shows the names, labels, buckets and values that a
`Counter` and a `Histogram` fed image by image would show. (Bisecting over `.tolist()` measured
cheaper than numpy's `searchsorted` and `bincount` for the batch sizes served:
bench/results/serving-log.md, "Measurements behind code choices".) With several workers /metrics is
made from the files prometheus_client's own metrics write, so there `FileImages` keeps a
`Counter` and a `Histogram`, still fed from the batching thread, the counters once per batch.
"""

from __future__ import annotations

import os
import threading
import time
from bisect import bisect_left
from collections.abc import Iterator, Sequence
from itertools import accumulate
from typing import Protocol

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.utils import floatToGoString

from isomax.contract.verdict import Thresholds
from service.batching import verdict_columns
from service.drift import DriftObserver

IMAGES = ("isomax_images_total", "Images classified, by OOD verdict.")
DISTANCE = ("isomax_min_distance", "min_distance of classified images (larger = more OOD).")
# prometheus_client's own switch for the `_created` samples, read as it reads it.
CREATED = os.environ.get("PROMETHEUS_DISABLE_CREATED_SERIES", "False").lower() not in (
    "true", "1", "t",
)  # fmt: skip


class ImageSeries(Protocol):
    def add_model(self, name: str) -> None:
        """Create the model's series at zero."""

    def observe(self, name: str, distances: np.ndarray, n_ood: int) -> None:
        """One batch of `name`'s images: their min_distance [n] and how many are OOD."""


class _Counts:
    """One model's series: images per histogram bucket (not cumulative), their sum, verdicts."""

    __slots__ = ("buckets", "created", "n_in", "n_ood", "total")

    def __init__(self, n_buckets: int) -> None:
        self.buckets = [0] * n_buckets
        self.total = 0.0
        self.n_in = 0
        self.n_ood = 0
        self.created = time.time()


class CollectedImages:
    """Both series as plain counts behind a collector (one process), under one lock."""

    def __init__(self, registry: CollectorRegistry, bounds: Sequence[float]) -> None:
        self._bounds = [float(b) for b in bounds]  # upper bounds, +Inf left out
        self._le = [floatToGoString(b) for b in bounds] + ["+Inf"]
        self._models: dict[str, _Counts] = {}
        self._lock = threading.Lock()
        registry.register(self)

    def add_model(self, name: str) -> None:
        with self._lock:
            self._models.setdefault(name, _Counts(len(self._le)))

    def observe(self, name: str, distances: np.ndarray, n_ood: int) -> None:
        values = distances.tolist()  # Python floats, compared as Histogram.observe compares them
        bounds = self._bounds
        with self._lock:
            c = self._models[name]
            buckets, total = c.buckets, c.total
            for v in values:  # the first bound >= v; in order, as observations add to the sum
                if v == v:  # a NaN falls in no bucket (`NaN <= bound` is false)
                    buckets[bisect_left(bounds, v)] += 1
                total += v
            c.total = total
            c.n_ood += n_ood
            c.n_in += len(values) - n_ood

    def collect(self) -> Iterator[Metric]:
        images = CounterMetricFamily(*IMAGES, labels=["model", "verdict"])
        hist = HistogramMetricFamily(*DISTANCE, labels=["model"])
        with self._lock:
            rows = [
                (name, list(accumulate(c.buckets)), c.total, c.n_in, c.n_ood, c.created)
                for name, c in self._models.items()
            ]
        for name, cumulative, total, n_in, n_ood, created in rows:
            at = created if CREATED else None
            images.add_metric([name, "in"], n_in, created=at)
            images.add_metric([name, "ood"], n_ood, created=at)
            hist.add_metric([name], list(zip(self._le, cumulative, strict=True)), total)
            if CREATED:
                hist.add_sample(DISTANCE[0] + "_created", {"model": name}, created)
        yield images
        yield hist


class FileImages:
    """Both series as prometheus_client metrics (multiprocess mode: /metrics reads their files)."""

    def __init__(self, registry: CollectorRegistry, bounds: Sequence[float]) -> None:
        self.images = Counter(*IMAGES, ["model", "verdict"], registry=registry)
        self.min_distance = Histogram(*DISTANCE, ["model"], buckets=bounds, registry=registry)
        self._per_model: dict[str, tuple[Histogram, Counter, Counter]] = {}

    def add_model(self, name: str) -> None:
        self._per_model[name] = (
            self.min_distance.labels(name),
            self.images.labels(name, "in"),
            self.images.labels(name, "ood"),
        )

    def observe(self, name: str, distances: np.ndarray, n_ood: int) -> None:
        hist, n_in_counter, n_ood_counter = self._per_model[name]
        for d in distances.tolist():
            hist.observe(d)
        if n_ood:
            n_ood_counter.inc(n_ood)
        if len(distances) - n_ood:
            n_in_counter.inc(len(distances) - n_ood)


class OutputObserver:
    """The batcher's output observer (`Batcher(on_outputs=...)`) of one version of `name`:
    each run's images judged once (`Thresholds.judge`, the verdict's one rule), then counted in
    the drift series and the per-image series."""

    def __init__(
        self, name: str, thresholds: Thresholds, drift: DriftObserver, images: ImageSeries
    ) -> None:
        self.name = name
        self.thresholds = thresholds
        self.drift = drift
        self.images = images

    def __call__(self, logits: np.ndarray, distance: np.ndarray) -> None:
        predicted = logits.argmax(axis=1).tolist()  # the first of ties, as the answer's argmax
        min_distance, score = verdict_columns(distance)
        scores = score.tolist()  # the served score, judged and bucketed
        _, flags = self.thresholds.judge(predicted, scores)
        self.drift.count(predicted, scores, flags)
        self.images.observe(self.name, min_distance, sum(flags))
