"""The summary a person reads after a run: figures (text and JSON) and one picture (PNG).

Figures, from the rows alone:
  - rows, images scored, error rows by kind (unreadable, too large, not a decodable image);
  - the OOD share with its 95% Clopper-Pearson interval (scipy's `binomtest`), against what
    the calibration expects of in-distribution images, `1 - target_tpr`, and the range a
    corpus of this size drawn from the calibration's distribution lands in 95% of the time
    (the binomial's central interval): a share above that range says the corpus holds more
    than the model's own kind of images;
  - per predicted class: images, OOD images and share (class thresholds keep `target_tpr` of
    each class, so the same expectation applies per class).
Picture (`summary.png`): the histogram of the served score against the calibration's
quantiles and the threshold in force, and per class the images scored most in-distribution
(lowest score) and most out-of-distribution (highest), as the model saw them (decoded with
the contract's decode, at the model's input size).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from isomax.batch.decoding import Limits
from isomax.contract.manifest import Manifest
from isomax.contract.verdict import Thresholds

log = logging.getLogger(__name__)

LEVEL = 0.95


def error_kind(message: str) -> str:
    if message.startswith("cannot read"):
        return "unreadable"
    if "limit" in message:
        return "too large"
    return "not a decodable image"


def _share(k: int, n: int) -> dict[str, Any]:
    from scipy.stats import binomtest  # imported here: seconds of import on a busy machine

    if n == 0:
        return {"count": 0, "ood": 0, "ood_share": None, "interval": None}
    ci = binomtest(k, n).proportion_ci(LEVEL, method="exact")
    return {"count": n, "ood": k, "ood_share": k / n, "interval": [ci.low, ci.high]}


def figures(table: pa.Table, manifest: Manifest, thresholds: Thresholds) -> dict[str, Any]:
    """Every figure of the summary, computed from the rows."""
    errors = [e for e in table.column("error").to_pylist() if e is not None]
    kinds: dict[str, int] = {}
    for e in errors:
        kinds[error_kind(e)] = kinds.get(error_kind(e), 0) + 1
    ok = np.array([e is None for e in table.column("error").to_pylist()], dtype=bool)
    classes = np.array(table.column("class").to_pylist(), dtype=object)[ok].astype(np.int64)
    is_ood = np.array(table.column("is_ood").to_pylist(), dtype=object)[ok].astype(bool)
    n = int(ok.sum())
    from scipy.stats import binom

    expected = 1.0 - thresholds.target_tpr
    lo, hi = binom.interval(LEVEL, n, expected) if n else (0, 0)
    per_class = {
        label: _share(int(is_ood[classes == c].sum()), int((classes == c).sum()))
        for c, label in enumerate(manifest.labels)
    }
    return {
        "model": f"{manifest.name}:{manifest.version}",
        "target_tpr": thresholds.target_tpr,
        "class_thresholds": thresholds.per_class is not None,
        "rows": table.num_rows,
        "errors": len(errors),
        "errors_by_kind": dict(sorted(kinds.items())),
        "expected_ood_share": expected,
        "expected_range": [lo / n, hi / n] if n else None,
        **{k: v for k, v in _share(int(is_ood.sum()), n).items() if k != "count"},
        "scored": n,
        "per_class": per_class,
    }


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.2f}%"


def text(f: dict[str, Any]) -> str:
    lines = [
        f"model {f['model']} at target_tpr {f['target_tpr']:g} "
        f"({'class' if f['class_thresholds'] else 'global'} thresholds)",
        f"rows {f['rows']}: {f['scored']} images scored, {f['errors']} errors"
        + "".join(f"; {k}: {v}" for k, v in f["errors_by_kind"].items()),
    ]
    if f["scored"]:
        lo, hi = f["interval"]
        elo, ehi = f["expected_range"]
        lines.append(
            f"OOD {f['ood']} = {_pct(f['ood_share'])} (95% interval {_pct(lo)}-{_pct(hi)}); "
            f"in-distribution images would give {_pct(f['expected_ood_share'])} "
            f"(95% of such corpora of this size: {_pct(elo)}-{_pct(ehi)})"
        )
    lines.append(f"{'class':<24}{'images':>10}{'OOD':>10}{'OOD share':>12}  95% interval")
    for label, c in f["per_class"].items():
        ci = c["interval"]
        span = f"{_pct(ci[0])}-{_pct(ci[1])}" if ci else "-"
        lines.append(f"{label:<24}{c['count']:>10}{c['ood']:>10}{_pct(c['ood_share']):>12}  {span}")
    return "\n".join(lines) + "\n"


def write_summary(
    out: Path, table: pa.Table, manifest: Manifest, thresholds: Thresholds, limits: Limits,
    picture: bool = True,
) -> dict[str, Any]:  # fmt: skip
    """summary.json, summary.txt and (with `picture`) summary.png in `out`; the figures."""
    f = figures(table, manifest, thresholds)
    (out / "summary.json").write_text(json.dumps(f, indent=2) + "\n")
    (out / "summary.txt").write_text(text(f))
    if picture:
        from isomax.batch.picture import draw

        draw(out / "summary.png", table, manifest, thresholds, limits)
    return f
