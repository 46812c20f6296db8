"""Figures for the evaluation report: score histograms (the paper's Fig. 1) and ROC curves.

Figures are built on `matplotlib.figure.Figure` directly, not `pyplot`: no global backend or
figure registry is touched, so this works headless (it renders with Agg), inside a training
process that imported pyplot elsewhere, and in threads, and figures are freed when dropped.
Every function writes a PNG and returns its path; parent directories are created.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from sklearn.metrics import roc_curve

from training.ood_metrics import TPR_TARGET, ood_metrics

log = logging.getLogger(__name__)

DPI = 120
BINS = 80
ID_COLOR = "tab:blue"
OOD_COLORS = ("tab:orange", "tab:red", "tab:green", "tab:purple", "tab:brown", "tab:pink")


def _values(name: str, x: np.ndarray) -> np.ndarray:
    a = np.asarray(x, dtype=np.float64).ravel()
    if a.size == 0 or not np.isfinite(a).all():
        raise ValueError(f"{name} must be non-empty and finite, got shape {np.shape(x)}")
    return a


def _edges(arrays: list[np.ndarray], bins: int) -> list[float]:
    """Shared bin edges so that densities of different sets are comparable bar for bar."""
    lo = min(float(a.min()) for a in arrays)
    hi = max(float(a.max()) for a in arrays)
    if hi <= lo:  # every value equal: give the single spike some width
        lo, hi = lo - 0.5, hi + 0.5
    return np.linspace(lo, hi, bins + 1).tolist()


def _draw_histograms(
    ax: Axes,
    scores_in: np.ndarray,
    scores_out: Mapping[str, np.ndarray],
    id_name: str,
    bins: int,
) -> None:
    arrays = {id_name: _values(id_name, scores_in)}
    arrays |= {name: _values(name, s) for name, s in scores_out.items()}
    edges = _edges(list(arrays.values()), bins)
    ax.hist(
        arrays[id_name],
        bins=edges,
        density=True,
        histtype="stepfilled",
        alpha=0.45,
        color=ID_COLOR,
        label=f"{id_name} (n={arrays[id_name].size})",
    )
    for i, name in enumerate(scores_out):
        color = OOD_COLORS[i % len(OOD_COLORS)]
        filled = len(scores_out) == 1  # one OOD set reads best filled, several as outlines
        ax.hist(
            arrays[name],
            bins=edges,
            density=True,
            alpha=0.45 if filled else 1.0,
            histtype="stepfilled" if filled else "step",
            linewidth=1.5,
            color=color,
            label=f"{name} (n={arrays[name].size})",
        )
    ax.set_ylabel("density")
    ax.legend(fontsize="small")


def _save(fig: Figure, path: Path | str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=DPI)
    log.info("wrote %s", path)
    return path


def plot_score_histograms(
    scores_in: np.ndarray,
    scores_out: Mapping[str, np.ndarray],
    title: str,
    xlabel: str,
    path: Path | str,
    *,
    id_name: str = "in-distribution",
    bins: int = BINS,
) -> Path:
    """Densities of one score on in-distribution data and on each OOD set, overlaid.

    Shows what a single AUROC number hides: whether OOD is shifted, merely wider, or
    overlapping only in a tail. Any score or raw quantity works (the paper plots entropy and
    minimum distance, where larger = more OOD); `xlabel` should say which.
    """
    if not scores_out:
        raise ValueError("scores_out is empty: give at least one OOD set")
    fig = Figure(figsize=(6.4, 4.0), layout="constrained")
    ax = fig.add_subplot()
    _draw_histograms(ax, scores_in, scores_out, id_name, bins)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    return _save(fig, path)


def plot_roc_curves(
    score_in: np.ndarray,
    scores_out: Mapping[str, np.ndarray],
    title: str,
    path: Path | str,
) -> Path:
    """ROC curves of one score against each OOD set, in-distribution as the positive class.

    x = fraction of OOD accepted (FPR), y = fraction of ID kept (TPR); the dotted line marks
    TPR 95%, where TNR@TPR95 is read. The legend carries each set's AUROC from
    `training.ood_metrics.ood_metrics`, so the figure and the metrics table cannot disagree.
    """
    if not scores_out:
        raise ValueError("scores_out is empty: give at least one OOD set")
    s_in = _values("score_in", score_in)
    fig = Figure(figsize=(5.0, 5.0), layout="constrained")
    ax = fig.add_subplot()
    for i, (name, s) in enumerate(scores_out.items()):
        s_out = _values(name, s)
        auroc = ood_metrics(s_in, s_out)["auroc"]
        y = np.r_[np.ones(s_in.size), np.zeros(s_out.size)]
        fpr, tpr, _ = roc_curve(y, np.r_[s_in, s_out])
        ax.plot(
            fpr, tpr, color=OOD_COLORS[i % len(OOD_COLORS)], label=f"{name} (AUROC {auroc:.3f})"
        )
    ax.plot([0, 1], [0, 1], color="gray", linestyle="--", linewidth=0.8, label="chance")
    ax.axhline(TPR_TARGET, color="gray", linestyle=":", linewidth=0.8)
    ax.set(xlim=(0, 1), ylim=(0, 1.01), title=title, aspect="equal")
    ax.set_xlabel("OOD accepted (FPR)")
    ax.set_ylabel("in-distribution kept (TPR)")
    ax.legend(loc="lower right", fontsize="small")
    return _save(fig, path)


def plot_fig1_grid(
    panels: Mapping[str, Mapping[str, tuple[np.ndarray, np.ndarray]]],
    path: Path | str,
    *,
    ood_name: str = "OOD",
    id_name: str = "in-distribution",
    title: str | None = None,
    bins: int = BINS,
) -> Path:
    """The paper's Fig. 1 as a grid: one row per model, one column per quantity.

    `panels[model][quantity] = (values_in, values_out)`; every row needs the same quantities,
    in the same order. For the reproduction:

        {"IsoMax":  {"entropy": (...), "minimum distance": (...)},
         "IsoMax+": {"entropy": (...), "minimum distance": (...)}}

    with entropy = `-training.scores.entropic(logits)` and minimum distance = the
    `min_distance` output (IsoMax: `training.scores.min_distance_from_logits(logits)`), i.e.
    the raw quantities the paper plots, larger = more OOD. The figure should show entropy
    separating ID from OOD for both models, but distance only for IsoMax+.
    Panels are lettered (a), (b), ... row by row.
    """
    rows = list(panels)
    if not rows:
        raise ValueError("panels is empty")
    cols = list(panels[rows[0]])
    if not cols:
        raise ValueError(f"panels[{rows[0]!r}] is empty")
    for model in rows:
        if list(panels[model]) != cols:
            raise ValueError(
                f"panels[{model!r}] has quantities {list(panels[model])}, expected {cols} "
                "(same for every model, same order)"
            )
    fig = Figure(figsize=(4.2 * len(cols), 3.2 * len(rows)), layout="constrained")
    axes = fig.subplots(len(rows), len(cols), squeeze=False)
    for r, model in enumerate(rows):
        for c, quantity in enumerate(cols):
            values_in, values_out = panels[model][quantity]
            ax = axes[r][c]
            _draw_histograms(ax, values_in, {ood_name: values_out}, id_name, bins)
            ax.set_title(f"({chr(ord('a') + r * len(cols) + c)}) {model}: {quantity}")
            ax.set_xlabel(quantity)
    if title:
        fig.suptitle(title)
    return _save(fig, path)
