"""OOD scores as pure numpy functions of a model's outputs: torch-free, so ONNX outputs work too.

Convention for every score here: HIGHER = MORE IN-DISTRIBUTION (the positive class of the
metrics in `training.ood_metrics`). Inputs:
- `logits` `(N, K)`: the inference logits. IsoMax+: `-|d_s|·D`; IsoMax: `-‖f - p_j‖`; SoftMax:
  the linear layer's output. No entropic scale: the paper's inference drops `E_s`.
- `min_distance` `(N,)`: IsoMax+: `min_j ‖f̂ - p̂_j‖` (the bundle's `min_distance` output, no
  `|d_s|`); IsoMax: the unnormalized `min_j ‖f - p_j‖`, which is `-max(logits)`.

All scores are computed in float64 (cheap at these sizes) so ties and tails do not depend on
whether the logits came from float32 ONNX or float64 analysis code.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

ScoreFn = Callable[[np.ndarray, np.ndarray | None], np.ndarray]


def _logits(logits: np.ndarray) -> np.ndarray:
    z = np.asarray(logits, dtype=np.float64)
    if z.ndim != 2 or z.shape[0] == 0 or z.shape[1] == 0:
        raise ValueError(f"logits must be (N, K) with N, K >= 1, got shape {z.shape}")
    if not np.isfinite(z).all():
        raise ValueError(f"logits {z.shape} contain NaN or infinite values")
    return z


def _logsumexp(z: np.ndarray) -> np.ndarray:
    m = z.max(axis=1)
    return m + np.log(np.exp(z - m[:, None]).sum(axis=1))


def _log_softmax(z: np.ndarray) -> np.ndarray:
    return z - _logsumexp(z)[:, None]


def max_probability(logits: np.ndarray) -> np.ndarray:
    """Maximum probability score (MPS): `max_j softmax(z)_j`, in (1/K, 1].

    Hendrycks & Gimpel, "A Baseline for Detecting Misclassified and Out-of-Distribution
    Examples", ICLR 2017. Higher = more in-distribution.
    """
    z = _logits(logits)
    return np.exp(_log_softmax(z).max(axis=1))


def entropic(logits: np.ndarray) -> np.ndarray:
    """Entropic score (ES): negative entropy `Σ_j p_j log p_j`, `p = softmax(z)`; in [-log K, 0].

    Macêdo et al., "Entropic Out-of-Distribution Detection" (IsoMax), IJCNN 2021; the paper's
    Fig. 1 plots the entropy itself, i.e. `-entropic(z)`. The sign is flipped so that higher =
    more in-distribution like every score here. Computed from log-softmax, so a probability
    that underflows to 0 contributes `0 · (finite log p) = 0` rather than `0 · log 0 = NaN`.
    """
    logp = _log_softmax(_logits(logits))
    return (np.exp(logp) * logp).sum(axis=1)


def energy(logits: np.ndarray) -> np.ndarray:
    """Energy score: `logsumexp_j z_j`, the negative free energy at temperature 1.

    Liu et al., "Energy-based Out-of-distribution Detection", NeurIPS 2020 (their `-E(x; f)`).
    Higher = more in-distribution.
    """
    return _logsumexp(_logits(logits))


def max_logit(logits: np.ndarray) -> np.ndarray:
    """Maximum logit: `max_j z_j`. Higher = more in-distribution.

    Hendrycks et al., "Scaling Out-of-Distribution Detection for Real-World Settings", ICML 2022.
    For IsoMax+ this is `-|d_s|·min_j D_j`, the reference code's inference score: the minimum
    distance score scaled by `|d_s| > 0`, so it ranks inputs exactly as `min_distance_score`.
    """
    return _logits(logits).max(axis=1)


def mmles(logits: np.ndarray) -> np.ndarray:
    """Max-mean logit entropy score (MMLES): `max_j z_j + mean_j z_j + Σ_j p_j log p_j`.

    Macêdo et al., "Distinction Maximization Loss" (DisMax): their default score, with
    `p = softmax(z)` and no entropic scale. Higher = more in-distribution.
    """
    z = _logits(logits)
    return z.max(axis=1) + z.mean(axis=1) + entropic(z)


def min_distance_score(min_distance: np.ndarray) -> np.ndarray:
    """Minimum distance score (MDS): `-min_j ‖f̂ - p̂_j‖`. Higher = more in-distribution.

    Macêdo & Ludermir, "Enhanced Isotropy Maximization Loss" (IsoMax+), 2021. The distance
    itself (larger = more OOD) is what the bundle outputs and what the threshold is calibrated
    on; the sign is flipped here only to share the convention of the other scores.
    """
    d = np.asarray(min_distance, dtype=np.float64)
    if d.ndim != 1 or d.shape[0] == 0:
        raise ValueError(f"min_distance must be (N,) with N >= 1, got shape {d.shape}")
    if not np.isfinite(d).all():
        raise ValueError(f"min_distance {d.shape} contains NaN or infinite values")
    return -d


def min_distance_from_logits(logits: np.ndarray) -> np.ndarray:
    """`-max_j z_j`: IsoMax's unnormalized minimum distance exactly; for IsoMax+ `|d_s|·min D`.

    Use it for IsoMax, whose graph has no separate distance output. For IsoMax+ use the
    model's `min_distance` output: the ranking is the same but the calibrated threshold is on
    the distance without `|d_s|`.
    """
    return -max_logit(logits)


def _mds(logits: np.ndarray, min_distance: np.ndarray | None) -> np.ndarray:
    if min_distance is None:
        raise ValueError("score 'mds' needs min_distance (N,), got None")
    d = np.asarray(min_distance)
    n = np.shape(logits)[0] if np.ndim(logits) >= 1 else None
    if d.ndim != 1 or d.shape[0] != n:
        raise ValueError(
            f"min_distance has shape {d.shape}, logits {np.shape(logits)}: expected ({n},)"
        )
    return min_distance_score(d)


def _logit_score(fn: Callable[[np.ndarray], np.ndarray]) -> ScoreFn:
    def score(logits: np.ndarray, min_distance: np.ndarray | None = None) -> np.ndarray:
        return fn(logits)

    score.__doc__ = fn.__doc__
    score.__name__ = fn.__name__
    return score


# name -> (logits, min_distance) -> score (N,), higher = more in-distribution.
SCORES: dict[str, ScoreFn] = {
    "mds": _mds,
    "es": _logit_score(entropic),
    "mps": _logit_score(max_probability),
    "energy": _logit_score(energy),
    "max_logit": _logit_score(max_logit),
    "mmles": _logit_score(mmles),
}

_HEAD_SCORES = {
    "softmax": ("es", "mps", "energy", "max_logit"),
    "logitnorm": ("mps", "energy", "max_logit", "es"),  # the paper scores max probability
    "isomax": ("es", "mps", "mds"),  # mds from min_distance_from_logits: the paper's Table 6
    "isomaxplus": ("mds", "mds_class", "es", "es_class", "mps"),  # the method's own score first
    "dismax": ("mmles", "mds", "es", "mps", "max_logit"),
}

# Class-conditional scores -> the score they are built on. `<score>_class` ranks an image by its
# score against the threshold of its predicted class, calibrated on the validation split
# (`class_thresholds`); `mds_class` is what the service's `is_ood` does with class thresholds.
CALIBRATED = {"mds_class": "mds", "es_class": "es"}


def class_margin(base: ScoreFn, class_thresholds: np.ndarray) -> ScoreFn:
    """`base` score minus the threshold of the predicted class: > 0 means "in-distribution".

    `class_thresholds` are in "larger = more OOD" units, like `min_distance` (`−score`), so the
    margin is `base + threshold[argmax logits]`; for MDS, `threshold[class] − min_distance`.
    """
    t = np.asarray(class_thresholds, dtype=np.float64)

    def score(logits: np.ndarray, min_distance: np.ndarray | None = None) -> np.ndarray:
        if np.shape(logits)[-1] != t.shape[0]:
            raise ValueError(f"{t.shape[0]} class thresholds for {np.shape(logits)[-1]} logits")
        return base(logits, min_distance) + t[np.argmax(logits, axis=1)]

    score.__doc__ = f"Class-conditional {base.__name__}: " + (class_margin.__doc__ or "")
    return score


def score_fn(name: str, class_thresholds: np.ndarray | None = None) -> ScoreFn:
    """The score called `name`; class-conditional ones need the thresholds they rank against."""
    if name in CALIBRATED:
        if class_thresholds is None:
            raise ValueError(f"score {name!r} needs class thresholds from the validation split")
        return class_margin(SCORES[CALIBRATED[name]], class_thresholds)
    return SCORES[name]


def scores_for(head: str) -> list[str]:
    """Names in `SCORES` worth reporting for a model with this head, most relevant first."""
    if head not in _HEAD_SCORES:
        raise ValueError(f"unknown head {head!r}; expected one of {sorted(_HEAD_SCORES)}")
    return list(_HEAD_SCORES[head])
