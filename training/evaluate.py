"""Accuracy and OOD detection of one model, from its outputs (torch or ONNX, same numbers).

In-distribution = the test split; every OOD set is compared against it with every score that
makes sense for the model's head (training.scores.scores_for), in-distribution positive.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from training.calibrate import per_class_thresholds
from training.ood_metrics import accuracy, ood_metrics
from training.scores import CALIBRATED, SCORES, ScoreFn, entropic, score_fn, scores_for

log = logging.getLogger(__name__)

Outputs = tuple[np.ndarray, np.ndarray | None]  # logits (N, K), min_distance (N,) or None
Predictor = Callable[[np.ndarray], Outputs]  # uint8 images (N, C, H, W) -> outputs
METRIC_KEYS = ("auroc", "tnr_at_tpr95", "dtacc", "aupr_in", "aupr_out")


def evaluate(
    predict: Predictor,
    head: str,
    id_images: np.ndarray,
    id_labels: np.ndarray,
    ood_sets: Mapping[str, np.ndarray],
    val: tuple[np.ndarray, np.ndarray] | None = None,
    score_thresholds: Mapping[str, np.ndarray] | None = None,
) -> tuple[dict[str, Any], dict[str, Outputs]]:
    """-> (report, raw outputs by set name incl. 'in') for plots and further analysis.

    Class-conditional scores (`mds_class`, `es_class`) rank against per-class thresholds
    ("larger = more OOD" units): those in `score_thresholds` (e.g. the bundle's own), else
    calibrated here on `val` at target TPR 0.95; without either they are skipped. The
    thresholds used are kept in `report["class_thresholds"]`.
    """
    outputs: dict[str, Outputs] = {"in": predict(id_images)}
    val_outputs = predict(val[0]) if val is not None else None
    thresholds = {k: np.asarray(v) for k, v in (score_thresholds or {}).items()}
    scores = scores_for(head)
    for s in scores:
        if s in CALIBRATED and s not in thresholds and val_outputs is not None:
            logits = val_outputs[0]
            if CALIBRATED[s] == "mds" and val_outputs[1] is None:
                continue
            thresholds[s] = per_class_thresholds(
                -SCORES[CALIBRATED[s]](*val_outputs), logits.argmax(1), logits.shape[1]
            )
    scores = [s for s in scores if s not in CALIBRATED or s in thresholds]
    report: dict[str, Any] = {
        "head": head,
        "scores": scores,
        "accuracy": {},
        "ood": {},
        "sizes": {"test": len(id_labels)},
    }
    used = {s: [float(t) for t in thresholds[s]] for s in scores if s in CALIBRATED}
    if used:
        report["class_thresholds"] = used
    report["accuracy"]["test"] = accuracy(outputs["in"][0], id_labels)
    if val is not None and val_outputs is not None:
        report["accuracy"]["val"] = accuracy(val_outputs[0], val[1])
        report["sizes"]["val"] = len(val[1])
    fns = {s: score_fn(s, thresholds.get(s)) for s in scores}
    s_in = {s: fns[s](*outputs["in"]) for s in scores}
    for name, images in ood_sets.items():
        outputs[name] = predict(images)
        report["sizes"][name] = len(images)
        report["ood"][name] = {s: ood_metrics(s_in[s], fns[s](*outputs[name])) for s in scores}
    return report, outputs


def report_score_fn(report: Mapping[str, Any], name: str) -> ScoreFn:
    """The score `name` as `report` computed it (with its class thresholds, if it has any)."""
    return score_fn(name, report.get("class_thresholds", {}).get(name))


def markdown_table(
    report: Mapping[str, Any], metrics: tuple[str, ...] = ("auroc", "tnr_at_tpr95")
) -> str:
    """One row per OOD set, one column per (score, metric), values in %; no table without one."""
    acc = ", ".join(f"{k} {100 * v:.2f}%" for k, v in report["accuracy"].items())
    if not report["ood"]:  # a header alone reads as a failed evaluation
        return f"Accuracy: {acc}\n\nNo OOD set was scored (--ood-folder NAME=DIR adds one).\n"
    # The served score (e.g. `mahalanobis`, `mahalanobis_class`) is scored beside the model's
    # own; a table without it would hide the one figure that describes what is served.
    first = next(iter(report["ood"].values()))
    scores = [*report["scores"], *(s for s in first if s not in report["scores"])]
    head = "| OOD set | " + " | ".join(f"{s.upper()} {m}" for s in scores for m in metrics) + " |"
    lines = [head, "|" + " --- |" * (1 + len(scores) * len(metrics))]
    for name, per_score in report["ood"].items():
        cells = [f"{100 * per_score[s][m]:.1f}" for s in scores for m in metrics]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return f"Accuracy: {acc}\n\n" + "\n".join(lines) + "\n"


def write_report(
    report: Mapping[str, Any], outputs: Mapping[str, Outputs], out_dir: Path, title: str
) -> list[Path]:
    """metrics.json, metrics.md, and per-score histogram + ROC PNGs into `out_dir`."""
    from training.plots import plot_roc_curves, plot_score_histograms

    out_dir.mkdir(parents=True, exist_ok=True)
    written = [out_dir / "metrics.json", out_dir / "metrics.md"]
    written[0].write_text(json.dumps(report, indent=2) + "\n")
    written[1].write_text(f"# {title}\n\n" + markdown_table(report))
    ood_names = [n for n in outputs if n != "in"]
    if not ood_names:
        return written
    raw: dict[str, Callable[[Outputs], np.ndarray | None]] = {
        "min distance": lambda o: o[1],
        "entropy": lambda o: -entropic(o[0]),
    }
    for label, fn in raw.items():
        v_in = fn(outputs["in"])
        outs = {n: fn(outputs[n]) for n in ood_names}
        if v_in is None or any(v is None for v in outs.values()):
            continue
        written.append(
            plot_score_histograms(
                v_in,
                {n: v for n, v in outs.items() if v is not None},
                f"{title}: {label}",
                f"{label} (larger = more OOD)",
                out_dir / f"hist_{label.replace(' ', '_')}.png",
            )
        )
    for s in report["scores"]:
        score = report_score_fn(report, s)
        written.append(
            plot_roc_curves(
                score(*outputs["in"]),
                {n: score(*outputs[n]) for n in ood_names},
                f"{title}: {s.upper()}",
                out_dir / f"roc_{s}.png",
            )
        )
    return written
