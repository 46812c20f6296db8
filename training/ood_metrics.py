"""Classification accuracy and the OOD detection metrics of the OOD literature, torch-free.

In-distribution is the positive class and a higher score means more in-distribution (the
convention of `training.scores`), as in Lee et al. 2018 and the IsoMax papers. OpenOOD and
pytorch-ood report FPR@95 with OOD as the positive class instead; `1 - tnr_at_tpr95` here is
the FPR of OOD at 95% ID recall, not that number. Tied scores count half (scikit-learn's ROC).
"""

from __future__ import annotations

import numpy as np
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

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


def ood_metrics(score_in: np.ndarray, score_out: np.ndarray) -> dict[str, float]:
    """AUROC, TNR@TPR95, DTACC, AUPR-in and AUPR-out of one score on one OOD set.

    - auroc: P(score_in > score_out) + ½ P(tie).
    - tnr_at_tpr95: on sklearn's ROC curve (one point per distinct score), the first point whose
      TPR is >= 0.95, i.e. the highest threshold that keeps at least 95% of ID; reported as
      1 - FPR, the fraction of OOD rejected there.
    - dtacc: max over ROC points of ½ (TPR + TNR), the best balanced detection accuracy.
    - aupr_in: average precision with ID positive; aupr_out: OOD positive on negated scores.
    """
    s_in = _scores("score_in", score_in)
    s_out = _scores("score_out", score_out)
    y = np.concatenate([np.ones(len(s_in), dtype=np.int64), np.zeros(len(s_out), dtype=np.int64)])
    s = np.concatenate([s_in, s_out])
    fpr, tpr, _ = roc_curve(y, s, drop_intermediate=False)
    i95 = int(np.argmax(tpr >= TPR_TARGET - _TPR_EPS))  # tpr ends at 1, so a point exists
    return {
        "auroc": float(roc_auc_score(y, s)),
        "tnr_at_tpr95": float(1.0 - fpr[i95]),
        "dtacc": float(np.max(0.5 * (tpr + 1.0 - fpr))),
        "aupr_in": float(average_precision_score(y, s)),
        "aupr_out": float(average_precision_score(1 - y, -s)),
    }
