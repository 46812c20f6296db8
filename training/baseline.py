"""What fine-tuning bought: the frozen backbone's own figures beside the trained model's, on the
validation split and pseudo-OOD made from it (training/pseudo_ood.py), so no OOD data is used.

- Frozen backbone: a logistic regression on its features of the training images (the linear
  probe, scikit-learn), and the Mahalanobis score on its L2-normalized features (class means
  and one shared covariance of the training features, Ledoit-Wolf shrinkage from
  sklearn.covariance; Lee et al. 2018).
- Trained model: its validation accuracy, its minimum-distance score (what the bundle serves
  today) and the same Mahalanobis score on its own features.

AUROC has the validation images as the positive class (higher score = more in-distribution).
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch

from training.mahalanobis import fit_mahalanobis, normalize
from training.ood_metrics import ood_metrics

log = logging.getLogger(__name__)


class Mahalanobis:
    """`-min_k (x - mu_k)^T P (x - mu_k)` on normalized features, higher = more ID: the served
    score's own fit (training/mahalanobis.py), with Ledoit-Wolf shrinkage, which a wide frozen
    backbone's covariance on a few thousand images needs."""

    def __init__(self, train_feats: torch.Tensor, train_labels: torch.Tensor) -> None:
        y = np.asarray(train_labels)
        self.fit = fit_mahalanobis(
            np.asarray(train_feats), y, int(y.max()) + 1, estimator="ledoit-wolf"
        )

    def score(self, feats: torch.Tensor | np.ndarray) -> np.ndarray:
        return -self.fit.score(np.asarray(feats))


def auroc(score_in: np.ndarray, score_out: np.ndarray) -> float:
    """The project's one AUROC (training/ood_metrics.py), in-distribution positive."""
    return ood_metrics(score_in, score_out)["auroc"]


def aurocs(score_in: np.ndarray, scores_out: dict[str, np.ndarray]) -> dict[str, float]:
    """AUROC against each pseudo-OOD set, plus their `mean` and `min`."""
    out = {name: round(auroc(score_in, s), 4) for name, s in scores_out.items()}
    values = list(out.values())
    return {**out, "mean": round(float(np.mean(values)), 4), "min": min(values)}


def linear_probe_accuracy(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    val_feats: torch.Tensor,
    val_y: np.ndarray,
) -> float:
    """Validation accuracy of a logistic regression on normalized, standardized features."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=500))
    probe.fit(normalize(np.asarray(train_feats)), np.asarray(train_labels))
    return float((probe.predict(normalize(np.asarray(val_feats))) == np.asarray(val_y)).mean())


def frozen_figures(
    train: tuple[torch.Tensor, torch.Tensor],
    val: torch.Tensor,
    val_y: np.ndarray,
    pseudo: dict[str, torch.Tensor],
) -> dict[str, Any]:
    """The frozen backbone's linear probe accuracy and Mahalanobis AUROC (features given)."""
    maha = Mahalanobis(*train)
    return {
        "linear_probe_val_accuracy": round(linear_probe_accuracy(*train, val, val_y), 4),
        "mahalanobis_auroc": aurocs(maha.score(val), {k: maha.score(v) for k, v in pseudo.items()}),
    }


def trained_figures(
    val_outputs: tuple[np.ndarray, np.ndarray | None],
    val_y: np.ndarray,
    pseudo_outputs: dict[str, tuple[np.ndarray, np.ndarray | None]],
    train: tuple[torch.Tensor, torch.Tensor],
    val: torch.Tensor,
    pseudo: dict[str, torch.Tensor],
) -> dict[str, Any]:
    """The trained model's accuracy, min-distance AUROC and Mahalanobis AUROC, same sets."""
    logits, dist = val_outputs
    out: dict[str, Any] = {"val_accuracy": round(float((logits.argmax(1) == val_y).mean()), 4)}
    if dist is not None:
        out["mds_auroc"] = aurocs(
            -dist, {k: -o[1] for k, o in pseudo_outputs.items() if o[1] is not None}
        )
    maha = Mahalanobis(*train)
    out["mahalanobis_auroc"] = aurocs(
        maha.score(val), {k: maha.score(v) for k, v in pseudo.items()}
    )
    return out


def log_comparison(summary: dict[str, Any]) -> None:
    """One line each: the frozen backbone, then the trained model, on the same data."""
    f, t = summary["frozen_backbone"], summary.get("trained")
    log.info(
        "frozen backbone (no training): linear probe %.1f%% val accuracy; Mahalanobis AUROC "
        "vs pseudo-OOD mean %.3f, min %.3f",
        100 * f["linear_probe_val_accuracy"],
        f["mahalanobis_auroc"]["mean"],
        f["mahalanobis_auroc"]["min"],
    )
    if t:
        mds = t.get("mds_auroc", {})
        log.info(
            "trained model (epoch %d): %.1f%% val accuracy; min-distance AUROC mean %s, min %s; "
            "Mahalanobis AUROC mean %.3f, min %.3f",
            t["epoch"],
            100 * t["val_accuracy"],
            mds.get("mean", "-"),
            mds.get("min", "-"),
            t["mahalanobis_auroc"]["mean"],
            t["mahalanobis_auroc"]["min"],
        )
