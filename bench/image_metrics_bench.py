"""CPU per batch of the per-image series (service/image_metrics.py), and the alternatives.

    nice -n 5 .venv/bin/python bench/image_metrics_bench.py

For batches of 1, 8 and 32 float32 min_distances, us per batch of:

  histogram   prometheus_client's Histogram.observe per image plus the two counters: what the
              request path did per request before, and what `FileImages` (multiprocess mode)
              does per batch
  numpy       numpy's searchsorted and bincount into an array of counts, the sum in order
              (the alternative `CollectedImages` was chosen over)
  bisect      `CollectedImages.observe`: one lock per batch, bisect over `.tolist()`
"""

from __future__ import annotations

import functools
import sys
import threading
import timeit
from pathlib import Path

import numpy as np
from prometheus_client import CollectorRegistry

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from service.image_metrics import CollectedImages, FileImages  # noqa: E402
from service.metrics import DISTANCE_BUCKETS  # noqa: E402


class NumpyCounts:
    """The numpy form of `CollectedImages.observe` (NaN handling as there)."""

    def __init__(self) -> None:
        self.bounds = np.asarray(DISTANCE_BUCKETS, dtype=np.float64)
        self.buckets = np.zeros(len(DISTANCE_BUCKETS) + 1, dtype=np.int64)
        self.total = 0.0
        self.lock = threading.Lock()

    def observe(self, name: str, distances: np.ndarray, n_ood: int) -> None:
        values = distances.astype(np.float64)
        kept = values[~np.isnan(values)]
        counts = np.bincount(np.searchsorted(self.bounds, kept), minlength=len(self.buckets))
        with self.lock:
            self.buckets += counts
            for v in values.tolist():
                self.total += v


def main() -> int:
    rng = np.random.default_rng(0)
    print(f"{'batch':>5} {'histogram':>10} {'numpy':>8} {'bisect':>8}   (us per batch)")
    for n in (1, 8, 32):
        d = rng.uniform(0.5, 1.3, n).astype(np.float32)
        row = []
        for kind in (FileImages, None, CollectedImages):
            series = NumpyCounts() if kind is None else kind(CollectorRegistry(), DISTANCE_BUCKETS)
            if kind is not None:
                series.add_model("m")
            calls = 20000
            call = functools.partial(series.observe, "m", d, 1)
            best = min(timeit.repeat(call, number=calls, repeat=5))
            row.append(1e6 * best / calls)
        print(f"{n:5} {row[0]:10.1f} {row[1]:8.1f} {row[2]:8.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
