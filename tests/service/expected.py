"""What the service must answer, computed without it: preprocess + a direct onnxruntime run."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from isomax.contract.decode import decode
from isomax.contract.manifest import Manifest
from tests.service.bundles import run_graph


def expected_results(
    bundle: Path,
    images: list[tuple[str | None, bytes]],
    top_k: int = 3,
    threshold: float | None = None,
    class_thresholds: bool = True,
) -> list[dict[str, Any]]:
    """One result dict per image, as the contract defines it, from a batch-of-1 ORT run each.

    The threshold is the predicted class's when the manifest has class thresholds (and
    `class_thresholds`), else `threshold` or the manifest's global one.
    """
    manifest = Manifest.read(bundle)
    cal = manifest.calibration
    per_class = cal.class_thresholds_for(cal.target_tpr) if class_thresholds else None
    global_thr = cal.threshold if threshold is None else threshold
    out = []
    for name, data in images:
        x = decode(data, manifest.preprocess)[None]
        logits, dist = run_graph(bundle / "model.onnx", x)
        z = logits[0].astype(np.float64) / (cal.temperature or 1.0)
        p = np.exp(z - z.max())
        p /= p.sum()
        order = sorted(range(len(p)), key=lambda j: -p[j])[:top_k]
        d = float(dist[0])
        thr = global_thr if per_class is None else per_class[order[0]]
        out.append(
            {
                "filename": name,
                "class_index": order[0],
                "label": manifest.labels[order[0]],
                "probability": float(p[order[0]]),
                "top_k": [{"label": manifest.labels[j], "probability": float(p[j])} for j in order],
                "min_distance": d,
                "threshold": thr,
                "is_ood": d > thr,
            }
        )
    return out


def assert_results_equal(got: list[dict[str, Any]], want: list[dict[str, Any]]) -> None:
    """Equal up to float32 rounding (a batch of 32 may round differently than a batch of 1)."""
    assert len(got) == len(want)
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        assert set(g) == set(w), f"result {i}: keys {sorted(g)} != {sorted(w)}"
        for key in ("filename", "class_index", "label", "is_ood", "threshold"):
            assert g[key] == w[key], f"result {i}: {key} {g[key]!r} != {w[key]!r}"
        assert math.isclose(g["min_distance"], w["min_distance"], rel_tol=1e-5, abs_tol=1e-6)
        assert math.isclose(g["probability"], w["probability"], rel_tol=1e-4, abs_tol=1e-6)
        assert [t["label"] for t in g["top_k"]] == [t["label"] for t in w["top_k"]]
        for gt, wt in zip(g["top_k"], w["top_k"], strict=True):
            assert math.isclose(gt["probability"], wt["probability"], rel_tol=1e-4, abs_tol=1e-6)
