"""Drift series of one model version, observed once per batch in the batching thread.

Per batch: the level bucket of every image (isomax/contract/drift.py) and its verdict by
predicted class, added to the counters once per bucket and class that occurs, not once per
image, and off the event loop. The counters are per-bucket (not cumulative `le` buckets) so a
batch adds to one series per bucket it touches. What the rules make of them: docs/metrics.md,
"Drift".
"""

from __future__ import annotations

from collections.abc import Sequence

from prometheus_client import Counter

from isomax.contract.drift import DriftTable, level_bucket

# Per-class series are bounded: a model with more classes keeps this many (those with the
# largest validation shares) and counts the others under label="other".
MAX_CLASS_SERIES = 50
OTHER_CLASS = "other"


def class_series(
    labels: Sequence[str], shares: Sequence[float] | None, limit: int = MAX_CLASS_SERIES
) -> tuple[str, ...]:
    """The `label` value of each class's series: itself, or "other" beyond `limit` classes.

    The kept classes are the `limit` largest by validation share (ties: label order), or the
    first `limit` without shares.
    """
    if len(labels) <= limit:
        return tuple(labels)
    order = range(len(labels))
    if shares is not None:
        order = sorted(order, key=lambda c: (-shares[c], c))  # type: ignore[assignment]
    kept = set(list(order)[: limit - 1])  # one series is left for "other"
    return tuple(label if c in kept else OTHER_CLASS for c, label in enumerate(labels))


class DriftObserver:
    """The drift series of one model version, added per run by the batcher's output observer
    (`OutputObserver` in service/image_metrics.py, which also counts the per-image series)."""

    def __init__(
        self,
        table: DriftTable,
        buckets: Sequence[Counter],
        series_of: Sequence[int],
        verdicts: Sequence[tuple[Counter, Counter]],
    ) -> None:
        self.table = table
        self._buckets = buckets  # one child per level bucket
        self._series_of = series_of  # class index -> index of its class series (folded: shared)
        self._verdicts = verdicts  # per class series: the (in, ood) children

    def count(self, predicted: list[int], scores: list[float], flags: list[bool]) -> None:
        """Add one run's images, judged already (service/image_metrics.py judges them once)."""
        bounds, higher, series_of = self.table.bounds, self.table.higher_is_in, self._series_of
        per_bucket: dict[int, int] = {}  # only the buckets and classes this batch touches
        per_class: dict[tuple[int, bool], int] = {}
        for c, s, ood in zip(predicted, scores, flags, strict=True):
            b = level_bucket(s, bounds[c], higher)
            per_bucket[b] = per_bucket.get(b, 0) + 1
            key = (series_of[c], ood)
            per_class[key] = per_class.get(key, 0) + 1
        buckets, verdicts = self._buckets, self._verdicts
        for b, n in per_bucket.items():
            buckets[b].inc(n)
        for (k, ood), n in per_class.items():
            verdicts[k][ood].inc(n)
