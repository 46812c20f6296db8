"""Temperature scaling: one scalar T so that softmax(logits / T) means what it says.

The served `probability` is softmax of the exported logits. For IsoMax+ those logits are
-|d_s| * distance without the entropic scale that training multiplied in, so softmax is
"deliberately flat" (a confident pullover reads 0.27). One temperature, fitted on the
validation split by minimising the negative log-likelihood (Guo et al., 2017), fixes the scale
without changing any decision: argmax, `min_distance` and the OOD verdict are untouched.

NLL(beta) with beta = 1/T is convex (the log-sum-exp of beta * z is convex in beta, minus a
linear term), so Newton's method on beta with a backtracking step finds the minimum; numpy
only, no torch. Expected calibration error (ECE, 15 equal-width confidence bins) measures the
result on the test split, before and after.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ECE_BINS = 15
T_MIN, T_MAX = 1e-3, 1e4


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    z = logits.astype(np.float64) / temperature
    z -= z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def nll(logits: np.ndarray, labels: np.ndarray, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of `labels` under softmax(logits / T)."""
    z = logits.astype(np.float64) / temperature
    top = z.max(axis=1, keepdims=True)
    lse = np.log(np.exp(z - top).sum(axis=1)) + top[:, 0]
    return float(np.mean(lse - z[np.arange(len(z)), labels]))


def fit_temperature(
    logits: np.ndarray, labels: np.ndarray, tol: float = 1e-10, max_iter: int = 100
) -> float:
    """The T > 0 minimising NLL(softmax(logits / T), labels) (Newton on beta = 1/T)."""
    z = logits.astype(np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    if z.ndim != 2 or len(z) != len(labels) or len(z) == 0:
        raise ValueError(f"need logits [N, K] and N labels, got {z.shape} and {labels.shape}")
    zy = z[np.arange(len(z)), labels]

    def f(beta: float) -> float:
        return nll(z, labels, 1.0 / beta)

    beta = 1.0
    for _ in range(max_iter):
        p = softmax(z * beta)
        mean_z = (p * z).sum(axis=1)
        grad = float(np.mean(mean_z - zy))
        hess = float(np.mean((p * z * z).sum(axis=1) - mean_z**2))
        if abs(grad) < tol:
            break
        step = grad / hess if hess > 1e-12 else math.copysign(beta, grad) * 0.5
        # Backtrack: stay positive and never increase the (convex) objective.
        now = f(beta)
        t = 1.0
        while t > 1e-8:
            nxt = beta - t * step
            if nxt > 1.0 / T_MAX and f(nxt) <= now:
                break
            t *= 0.5
        else:
            break
        if abs(nxt - beta) < 1e-12 * max(1.0, beta):
            beta = nxt
            break
        beta = nxt
    return float(min(max(1.0 / beta, T_MIN), T_MAX))


@dataclass(frozen=True)
class Reliability:
    """Per confidence bin: count, mean confidence, accuracy; and the ECE they add up to."""

    edges: np.ndarray  # [bins + 1]
    count: np.ndarray  # [bins]
    confidence: np.ndarray  # [bins] (nan where empty)
    accuracy: np.ndarray  # [bins] (nan where empty)
    ece: float


def reliability(
    logits: np.ndarray, labels: np.ndarray, temperature: float = 1.0, bins: int = ECE_BINS
) -> Reliability:
    """Top-class confidence against accuracy in `bins` equal-width bins over [0, 1]."""
    p = softmax(logits, temperature)
    conf = p.max(axis=1)
    correct = (p.argmax(axis=1) == np.asarray(labels)).astype(np.float64)
    edges = np.linspace(0.0, 1.0, bins + 1)
    # Bin i holds (edges[i], edges[i+1]]; a confidence of exactly 0 cannot happen (>= 1/K).
    idx = np.clip(np.searchsorted(edges, conf, side="left") - 1, 0, bins - 1)
    count = np.bincount(idx, minlength=bins).astype(np.int64)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_conf = np.bincount(idx, weights=conf, minlength=bins) / count
        acc = np.bincount(idx, weights=correct, minlength=bins) / count
    gaps = np.where(count > 0, np.abs(acc - mean_conf), 0.0)
    ece = float((count * gaps).sum() / max(len(conf), 1))
    return Reliability(edges, count, mean_conf, acc, ece)


def expected_calibration_error(
    logits: np.ndarray, labels: np.ndarray, temperature: float = 1.0, bins: int = ECE_BINS
) -> float:
    return reliability(logits, labels, temperature, bins).ece


def confidence_gap(logits: np.ndarray, labels: np.ndarray, temperature: float = 1.0) -> float:
    """|mean top-class probability − accuracy|: over- or under-confidence on the whole split."""
    p = softmax(logits, temperature)
    accuracy = float(np.mean(p.argmax(axis=1) == np.asarray(labels)))
    return abs(float(p.max(axis=1).mean()) - accuracy)


def plot_reliability(
    logits: np.ndarray, labels: np.ndarray, temperature: float, path: Path, title: str
) -> Path:
    """Reliability diagram, raw logits (T = 1) beside the fitted temperature, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 4.2), sharey=True)
    for ax, (t, name) in zip(
        axes, ((1.0, "softmax(logits)"), (temperature, "tempered")), strict=True
    ):
        r = reliability(logits, labels, t)
        centers = (r.edges[:-1] + r.edges[1:]) / 2
        width = r.edges[1] - r.edges[0]
        ok = r.count > 0
        ax.bar(centers[ok], r.accuracy[ok], width=width * 0.95, color="#4c72b0", label="accuracy")
        ax.plot([0, 1], [0, 1], "--", color="gray", lw=1, label="perfect calibration")
        ax.plot(centers[ok], r.confidence[ok], "o", color="#dd8452", ms=4, label="mean confidence")
        ax.set_title(f"{name}, T = {t:.3g}: ECE {r.ece:.3f}")
        ax.set_xlabel("top-class probability")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
    axes[0].set_ylabel("accuracy")
    axes[0].legend(loc="upper left", fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
