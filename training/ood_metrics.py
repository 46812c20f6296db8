"""Classification accuracy and the OOD detection metrics of the OOD literature, torch-free.

In-distribution is the positive class and a higher score means more in-distribution (the
convention of `training.scores`), as in Lee et al. 2018 and the IsoMax papers. OpenOOD and
pytorch-ood report FPR@95 with OOD as the positive class instead; `1 - tnr_at_tpr95` here is
the FPR of OOD at 95% ID recall, not that number. Tied scores count half (scikit-learn's ROC).
"""

from __future__ import annotations

import math

import numpy as np

TPR_TARGET = 0.95
# tpr is tps / n_in in float: 19/20 must count as 0.95, not fall just below it.
_TPR_EPS = 1e-12


def accuracy(logits_or_pred: np.ndarray, labels: np.ndarray) -> float:
    """Top-1 accuracy from `(N, K)` logits/probabilities (argmax) or `(N,)` predicted classes."""
    out = np.asarray(logits_or_pred)
    y = np.asarray(labels)
    if out.ndim not in (1, 2) or y.ndim != 1 or out.shape[0] != y.shape[0] or y.shape[0] == 0:
        raise ValueError(
            f"expected (N, K) logits or (N,) predictions and (N,) labels with N >= 1, "
            f"got {out.shape} and {y.shape}"
        )
    pred = out.argmax(axis=1) if out.ndim == 2 else out
    return float(np.mean(pred == y))


def _scores(name: str, s: np.ndarray) -> np.ndarray:
    a = np.asarray(s, dtype=np.float64)
    if a.ndim != 1 or a.shape[0] == 0:
        raise ValueError(f"{name} must be a non-empty 1-D array, got shape {a.shape}")
    if not np.isfinite(a).all():
        raise ValueError(f"{name} {a.shape} contains NaN or infinite values")
    return a


def _counts(s_in: np.ndarray, s_out: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Integer (ID, OOD) counts at or above each distinct score, highest threshold first.

    The points of scikit-learn's `roc_curve(drop_intermediate=False)` before it divides. Every
    metric below is computed from these integers so that none can leave [0, 1] by rounding:
    scikit-learn's `average_precision_score` sums float recall steps and returns 1 + 2e-16 on
    688 of the 3,136 perfectly separated (ID, OOD) count pairs between 5 and 60, which the
    manifest refuses. One sort also spares scikit-learn's four input validations.
    """
    s = np.concatenate([s_in, s_out])
    is_in = np.concatenate([np.ones(len(s_in)), np.zeros(len(s_out))])
    order = np.argsort(-s, kind="mergesort")
    s, is_in = s[order], is_in[order]
    last = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]  # last index of each distinct score
    tps = np.cumsum(is_in)[last]
    return tps, (last + 1) - tps


def _average_precision(tp: np.ndarray, fp: np.ndarray) -> float:
    """Sum over thresholds of (R_n - R_{n-1}) P_n (scikit-learn's definition), within [0, 1].

    Each recall step is the integer count of positives it adds; each term `step * P_n` rounds to
    at most `step` (P_n <= 1) and `math.fsum` rounds the exact sum, so the total is at most the
    number of positives and the result at most 1, exactly 1 when precision is 1 throughout.
    """
    steps = np.diff(np.r_[0.0, tp])
    return math.fsum((steps * (tp / (tp + fp))).tolist()) / float(tp[-1])


def ood_metrics(score_in: np.ndarray, score_out: np.ndarray) -> dict[str, float]:
    """AUROC, TNR@TPR95, DTACC, AUPR-in and AUPR-out of one score on one OOD set.

    - auroc: P(score_in > score_out) + ½ P(tie), counted in (half-)pairs.
    - tnr_at_tpr95: on the ROC curve (one point per distinct score), the first point whose TPR is
      >= 0.95, i.e. the highest threshold that keeps at least 95% of ID; reported as 1 - FPR,
      the fraction of OOD rejected there.
    - dtacc: max over ROC points of ½ (TPR + TNR), the best balanced detection accuracy.
    - aupr_in: average precision with ID positive; aupr_out: OOD positive on negated scores.
    Each equals scikit-learn's (`roc_auc_score`, `roc_curve`, `average_precision_score`) up to
    rounding (tests/training/test_metric_bounds.py), and each is within [0, 1].
    """
    s_in = _scores("score_in", score_in)
    s_out = _scores("score_out", score_out)
    n_in, n_out = len(s_in), len(s_out)
    tps, fps = _counts(s_in, s_out)
    tpr, fpr = np.r_[0.0, tps / n_in], np.r_[0.0, fps / n_out]
    i95 = int(np.argmax(tpr >= TPR_TARGET - _TPR_EPS))  # tpr ends at 1, so a point exists
    # Pairs won: each OOD image counts the ID images strictly above it plus half the ties.
    d_tp, d_fp = np.diff(np.r_[0.0, tps]), np.diff(np.r_[0.0, fps])
    won = math.fsum((d_fp * (tps - d_tp)).tolist()) + 0.5 * math.fsum((d_fp * d_tp).tolist())
    # AUPR-out ranks by -score with OOD positive: the same points, read from the other end.
    rtp, rfp = (n_out - fps)[::-1], (n_in - tps)[::-1]
    return {
        "auroc": won / (n_in * n_out),
        "tnr_at_tpr95": float(1.0 - fpr[i95]),
        "dtacc": float(np.max(0.5 * (tpr + 1.0 - fpr))),
        "aupr_in": _average_precision(tps, fps),
        "aupr_out": _average_precision(np.r_[rtp[1:], n_out], np.r_[rfp[1:], n_in]),
    }
