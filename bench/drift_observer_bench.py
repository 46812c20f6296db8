"""What the drift observer costs per batch and per image, in process (robust to machine load).

    nice -n 10 .venv/bin/python bench/drift_observer_bench.py

The observer runs in the batching thread once per onnxruntime run (service/image_metrics.py,
service/drift.py): argmax, the verdict, one level bucket per image and one counter increment per
bucket and class seen, then the per-image series (verdict counters, min_distance histogram),
which it has counted too since they left the request path.
Best of 5 repeats of 2000 calls, per batch size, with the default bundle's tables. Results:
bench/results/drift-observer.json.
"""

from __future__ import annotations

import json
import sys
import timeit
from pathlib import Path

import numpy as np
from prometheus_client import CollectorRegistry

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from isomax.contract.drift import DriftTable  # noqa: E402
from isomax.contract.manifest import Manifest  # noqa: E402
from isomax.contract.verdict import Thresholds  # noqa: E402
from service.metrics import PrometheusMetrics  # noqa: E402


def main() -> int:
    manifest = Manifest.read(REPO / "models" / "fmnist-isomaxplus" / "2")
    cal = manifest.calibration
    thresholds = Thresholds.lookup(cal)
    table = DriftTable.from_calibration(cal, len(manifest.labels), True, thresholds.target_tpr)
    metrics = PrometheusMetrics(CollectorRegistry())
    metrics.add_model("m")
    observe = metrics.output_observer("m", manifest.labels, table, thresholds)
    rng = np.random.default_rng(0)
    out = {}
    for b in (1, 4, 16, 64):
        logits = rng.normal(size=(b, len(manifest.labels))).astype(np.float32)
        d = rng.uniform(0.7, 1.3, b).astype(np.float32)
        best = min(timeit.repeat(lambda: observe(logits, d), number=2000, repeat=5)) / 2000  # noqa: B023
        out[b] = {"us_per_batch": round(best * 1e6, 2), "us_per_image": round(best * 1e6 / b, 2)}
        print(f"batch {b:3d}: {best * 1e6:7.2f} us per batch, {best * 1e6 / b:6.2f} us per image")
    path = REPO / "bench" / "results" / "drift-observer.json"
    path.write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
