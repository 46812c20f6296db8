"""summary.png: the score histogram against the calibration, and contact sheets per class."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute

from isomax.batch.decoding import Limits, decode_bytes, read_file
from isomax.contract.manifest import Manifest
from isomax.contract.verdict import Thresholds

SHEET = 6  # images per side (most in-distribution, most out-of-distribution) and class
SIDE = 56  # thumbnail pixels
QUANTILES = (0.5, 0.9, 0.95, 0.99)


def thumbnails(paths: list[str], manifest: Manifest, limits: Limits, side: int) -> list[np.ndarray]:
    """The files as the model saw them, RGB uint8 [side, side, 3] (gray where unreadable)."""
    from PIL import Image

    spec = manifest.preprocess
    out = []
    for p in paths:
        data = read_file(p, limits)
        arr = None if isinstance(data, str) else decode_bytes(p, data, spec, limits)[1]
        if arr is None:
            out.append(np.full((side, side, 3), 128, np.uint8))
            continue
        img = Image.fromarray(arr[0] if arr.shape[0] == 1 else arr.transpose(1, 2, 0))
        small = spec.width <= side  # pixels of a 28x28 input shown as blocks
        resample = Image.Resampling.NEAREST if small else Image.Resampling.BILINEAR
        img = img.convert("RGB").resize((side, side), resample)
        out.append(np.asarray(img))
    return out


def _mosaic(tiles: list[np.ndarray], n: int) -> np.ndarray:
    """`n` slots of tiles side by side (blank slots white), one pixel apart."""
    blank = np.full((SIDE, SIDE, 3), 255, np.uint8)
    tiles = (tiles + [blank] * n)[:n]
    gap = np.full((SIDE, 2, 3), 255, np.uint8)
    return np.concatenate([x for t in tiles for x in (t, gap)], axis=1)


def _sheet_rows(
    table: pa.Table, manifest: Manifest, limits: Limits
) -> list[tuple[str, np.ndarray]]:
    ok = table.filter(pa.compute.is_null(table.column("error")))
    classes = np.asarray(ok.column("class").to_numpy(zero_copy_only=False))
    scores = np.asarray(ok.column("score").to_numpy(zero_copy_only=False))
    paths = ok.column("path").to_pylist()
    rows = []
    for c, label in enumerate(manifest.labels):
        idx = np.flatnonzero(classes == c)
        if len(idx) == 0:
            continue
        order = idx[np.argsort(scores[idx], kind="stable")]
        low, high = order[:SHEET], order[::-1][:SHEET]
        left = _mosaic(thumbnails([paths[i] for i in low], manifest, limits, SIDE), SHEET)
        right = _mosaic(thumbnails([paths[i] for i in high], manifest, limits, SIDE), SHEET)
        sep = np.full((SIDE, 16, 3), 255, np.uint8)
        rows.append((f"{label} ({len(idx)})", np.concatenate([left, sep, right], axis=1)))
    return rows


def draw(
    path: Path, table: pa.Table, manifest: Manifest, thresholds: Thresholds, limits: Limits
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = table.filter(pa.compute.is_null(table.column("error")))
    scores = np.asarray(ok.column("score").to_numpy(zero_copy_only=False), dtype=np.float64)
    sheets = _sheet_rows(table, manifest, limits)
    gap = np.full((14, sheets[0][1].shape[1], 3), 255, np.uint8) if sheets else None
    mosaic = np.concatenate([x for _, img in sheets for x in (gap, img)]) if sheets else None
    sheet_in = 0.0 if mosaic is None else 9.0 * mosaic.shape[0] / mosaic.shape[1]
    fig, axes = plt.subplots(2 if sheets else 1, 1, figsize=(9, 3.2 + sheet_in), squeeze=False,
                             height_ratios=[3.2, sheet_in] if sheets else [1])  # fmt: skip
    _histogram(axes[0, 0], scores, ok, manifest, thresholds)
    if mosaic is not None:
        a = axes[1, 0]
        a.imshow(mosaic, interpolation="nearest")
        a.set_axis_off()
        step = mosaic.shape[0] / len(sheets)
        for i, (label, _) in enumerate(sheets):
            a.text(0, i * step + 12, label, fontsize=8, va="bottom")
        a.set_title("per predicted class: most in-distribution (left), most OOD (right)",
                    fontsize=9)  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _histogram(
    ax: Any, scores: np.ndarray, ok: pa.Table, manifest: Manifest, thresholds: Thresholds
) -> None:
    if len(scores):
        ax.hist(scores, bins=60, color="0.6", label=f"{len(scores)} images")
    cal = manifest.calibration
    for q in QUANTILES:
        if cal.quantiles[0].q <= q <= cal.quantiles[-1].q:
            ax.axvline(cal.threshold_for(q), color="tab:blue", lw=0.8, ls=":")
            ax.text(cal.threshold_for(q), 1.0, f" q{q:g}", transform=ax.get_xaxis_transform(),
                    fontsize=7, color="tab:blue", va="top")  # fmt: skip
    kind = "global threshold" if thresholds.per_class is not None else "threshold"
    ax.axvline(thresholds.overall, color="tab:red", lw=1.5,
               label=f"{kind} at target_tpr {thresholds.target_tpr:g}")  # fmt: skip
    ax.set_xlabel(f"served score ({cal.score}); dotted: quantiles of the calibration split")
    ax.set_ylabel("images")
    ax.legend(fontsize=8)
    ood = int(np.asarray(ok.column("is_ood").to_numpy(zero_copy_only=False)).sum())
    ax.set_title(f"{manifest.name}:{manifest.version}: {ood} of {len(scores)} images OOD")
