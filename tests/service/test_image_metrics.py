"""The per-image series counted per batch (service/image_metrics.py): the same exposition as a
prometheus_client Counter and Histogram fed image by image, in one process and with several."""

from __future__ import annotations

import asyncio
import re

import numpy as np
import pytest
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from isomax.contract.drift import DriftTable
from isomax.contract.verdict import Thresholds
from service.batching import Batcher
from service.image_metrics import DISTANCE, IMAGES, CollectedImages, FileImages, OutputObserver
from service.metrics import DISTANCE_BUCKETS, PrometheusMetrics

# Values on bucket bounds, between them, above the last (+Inf) and at zero, float32 and float64.
EDGES = np.array([0.0, 0.05, 0.1, 0.15, 1.0, 1.05, 2.0, 2.5], np.float64)


def batches() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    out = [rng.uniform(0, 2.3, n).astype(np.float32) for n in (1, 5, 32, 7)]
    return [*out, EDGES.astype(np.float32), EDGES]


def exposition(registry: CollectorRegistry) -> str:
    """/metrics text without the `_created` values (wall-clock times)."""
    text = generate_latest(registry).decode()
    return re.sub(r"(?m)^(\S*_created(\{.*\})?) \S+$", r"\1 T", text)


def reference(values: list[np.ndarray], n_ood: list[int]) -> CollectorRegistry:
    """The two series as prometheus_client metrics, one observation per image."""
    r = CollectorRegistry()
    images = Counter(*IMAGES, ["model", "verdict"], registry=r)
    hist = Histogram(*DISTANCE, ["model"], buckets=DISTANCE_BUCKETS, registry=r)
    for name in ("a", "b"):
        hist.labels(name)
        images.labels(name, "in")
        images.labels(name, "ood")
    for i, (d, k) in enumerate(zip(values, n_ood, strict=True)):
        name = "ab"[i % 2]
        for v in d.tolist():
            hist.labels(name).observe(v)
        images.labels(name, "ood").inc(k)
        images.labels(name, "in").inc(len(d) - k)
    return r


@pytest.mark.parametrize("kind", [CollectedImages, FileImages])
def test_batch_counts_expose_what_per_image_observations_would(kind: type) -> None:
    values = batches()
    n_ood = [int((d > 1.06).sum()) for d in values]
    r = CollectorRegistry()
    series = kind(r, DISTANCE_BUCKETS)
    series.add_model("a")
    series.add_model("b")
    assert exposition(r) == exposition(reference([], []))  # at zero before any batch
    for i, (d, k) in enumerate(zip(values, n_ood, strict=True)):
        series.observe("ab"[i % 2], d, k)
    assert exposition(r) == exposition(reference(values, n_ood))
    get = r.get_sample_value
    n_a = sum(len(d) for d in values[::2])
    assert get("isomax_min_distance_count", {"model": "a"}) == n_a
    # float32 values compared as Python floats (float32(0.05) > 0.05), not in float32 as numpy
    # compares a float32 array with a Python float
    assert get("isomax_min_distance_bucket", {"model": "a", "le": "0.05"}) == sum(
        int((d.astype(np.float64) <= 0.05).sum()) for d in values[::2]
    )


def test_a_nan_falls_in_no_bucket_as_in_a_histogram() -> None:
    values = np.array([0.5, np.nan], np.float32)
    r = CollectorRegistry()
    series = CollectedImages(r, DISTANCE_BUCKETS)
    series.add_model("a")
    series.add_model("b")
    series.observe("a", values, 0)
    ref = reference([values], [0])
    assert ref.get_sample_value("isomax_min_distance_count", {"model": "a"}) == 1.0
    assert exposition(r) == exposition(ref)


def test_the_output_observer_counts_verdicts_and_min_distance_of_a_scored_bundle() -> None:
    """A bundle serving another score: the verdict is on column 1, the histogram on column 0."""
    metrics = PrometheusMetrics(CollectorRegistry())
    metrics.add_model("m")
    labels = ("x", "y", "z")
    thresholds = Thresholds(0.95, 0.4, per_class=(0.3, 0.5, 0.7), in_distribution="higher")
    table = DriftTable(
        levels=(0.95,), bounds=((-0.3,), (-0.5,), (-0.7,)), higher_is_in=True,
        expected=(0.95, 0.05), class_shares=None, class_flagged=None,
    )  # fmt: skip
    observe = metrics.output_observer("m", labels, table, thresholds)
    assert isinstance(observe, OutputObserver)
    rng = np.random.default_rng(2)
    logits = rng.normal(size=(40, 3)).astype(np.float32)
    distance = np.stack([rng.uniform(0, 2, 40), rng.uniform(0, 1, 40)], 1).astype(np.float32)
    observe(logits, distance)
    predicted = logits.argmax(1)
    flags = distance[:, 1].astype(np.float64) < np.array(thresholds.per_class)[predicted]
    get = metrics.registry.get_sample_value
    assert get("isomax_images_total", {"model": "m", "verdict": "ood"}) == flags.sum()
    assert get("isomax_images_total", {"model": "m", "verdict": "in"}) == 40 - flags.sum()
    assert get("isomax_min_distance_bucket", {"model": "m", "le": "1.0"}) == (
        (distance[:, 0].astype(np.float64) <= 1.0).sum()
    )
    by_class = sum(
        get("isomax_class_images_total", {"model": "m", "label": s, "verdict": "ood"}) or 0.0
        for s in labels
    )
    assert by_class == flags.sum()  # the drift series and the verdict counters agree


def test_a_failing_output_observer_does_not_fail_the_answers(
    caplog: pytest.LogCaptureFixture,
) -> None:
    def model(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return np.zeros((len(x), 2), np.float32), np.full(len(x), 0.5, np.float32)

    def broken(logits: np.ndarray, distance: np.ndarray) -> None:
        raise KeyError("not added")

    async def main() -> tuple[np.ndarray, np.ndarray]:
        b = Batcher(
            "m", model, max_batch_size=4, max_wait_s=0.0, max_queue_images=10, on_outputs=broken
        )
        b.start(asyncio.get_running_loop())
        try:
            return await b.submit(np.zeros((3, 1, 2, 2), np.float32))
        finally:
            b.stop()

    logits, distance = asyncio.run(main())
    assert logits.shape == (3, 2) and distance.tolist() == [0.5, 0.5, 0.5]
    assert "output observer failed" in caplog.text
