"""Choosing without OOD data: the one written rule behind every choice that ships in a default.

The IsoMax papers' promise is that no OOD data tunes anything. So the served score, the loss, the
recipe and the checkpoint are chosen here from in-distribution data only: the validation split
(held out of training) and *pseudo-OOD* sets made from it. MNIST, digits, noise, natural crops
and open-set classes are scored only afterwards, as held-out estimates (README, "Choosing without
OOD data").

Pseudo-OOD sets, each made from the validation images (seeded; `training.pseudo_ood`, whose
`selection_sets` holds the makers and their draws):
- `mosaic`: 4-image mosaics (`training.loss.mosaic`): object parts in the wrong places;
- `patch_shuffle`: the image cut into a 4 x 4 grid of patches, the patches permuted;
- `pixel_shuffle`: every pixel moved to a random place (the image's histogram, no shape).

The rule:
1. Checkpoint (epoch): the highest validation accuracy (training keeps it as `best.pt`).
2. Score, for one model (`pick_score`): the served score with the highest mean AUROC of
   validation images against the pseudo-OOD sets; within `TIE` of the best, the earlier in
   `CANDIDATE_SCORES`. The feature-space Mahalanobis score comes first: it reads the whole
   feature vector, where the others read the K logits made from it, and it costs the same (one
   matmul in the graph). So a tie goes to the score that sees more, then to the paper's
   `min_distance`, then to the logit scores.
3. Loss, recipe, augmentation, backbone (`pick_model`): among candidates whose validation
   accuracy is within `ACCURACY_SLACK` of the best candidate's, the highest mean pseudo-OOD
   AUROC of each one's picked score; ties as in 2, by the candidates' given order.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn

from isomax.contract.decode import graph_input
from isomax.contract.verdict import SERVED_SCORES
from training.data.datasets import Splits
from training.graph_scores import ServedScore
from training.mahalanobis import MahalanobisFit
from training.models.classifier import head_outputs
from training.ood_metrics import ood_metrics
from training.pseudo_ood import selection_sets

CANDIDATE_SCORES = ("mahalanobis", "min_distance", "entropic", "mmles")  # ties: the earlier
TIE = 0.001  # AUROC differences below this are noise at validation sizes of a few thousand
ACCURACY_SLACK = 0.005  # the "within 0.5 points"


@torch.no_grad()
def candidate_scores(
    model: nn.Module,
    images: np.ndarray,
    fit: MahalanobisFit | None,
    scores: Sequence[str] = CANDIDATE_SCORES,
    batch_size: int = 512,
) -> dict[str, np.ndarray]:
    """Each score in higher = more in-distribution units `(N,)`, from one torch forward pass
    per batch (the same ops the exported graph runs: `training.graph_scores`)."""
    heads = {s: ServedScore(s, fit if s == "mahalanobis" else None) for s in scores}
    model.eval()
    out: dict[str, list[np.ndarray]] = {s: [] for s in scores}
    for i in range(0, len(images), batch_size):
        x = torch.from_numpy(graph_input(images[i : i + batch_size]))
        logits, min_distance, features = head_outputs(model, x)
        if min_distance is None or features is None:
            raise ValueError("score selection needs a model with a distance head")
        for s, h in heads.items():
            sign = 1.0 if SERVED_SCORES[s] == "higher" else -1.0
            out[s].append(sign * h(logits, min_distance, features).double().numpy())
    return {s: np.concatenate(v) for s, v in out.items()}


@dataclass(frozen=True)
class ScoreChoice:
    """What `pick_score` saw and chose: AUROC per score and pseudo-OOD set, and their means."""

    score: str
    auroc: dict[str, dict[str, float]]
    mean_auroc: dict[str, float]
    val_accuracy: float
    rule: str = "max mean pseudo-OOD AUROC on validation; ties to the earlier candidate"

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def _first_best(values: Sequence[float]) -> int:
    """Index of the best value, the earliest of those within `TIE` of it."""
    best = max(values)
    return next(i for i, v in enumerate(values) if v >= best - TIE)


def pick_score(
    model: nn.Module,
    splits: Splits,
    fit: MahalanobisFit | None,
    scores: Sequence[str] = CANDIDATE_SCORES,
    seed: int = 0,
) -> ScoreChoice:
    """Step 2 of the rule: the served score, from validation and pseudo-OOD only."""
    names = [s for s in scores if s != "mahalanobis" or fit is not None]
    val = candidate_scores(model, splits.val_x, fit, names)
    auroc: dict[str, dict[str, float]] = {s: {} for s in names}
    for set_name, images in selection_sets(splits.val_x, seed).items():
        ood = candidate_scores(model, images, fit, names)
        for s in names:
            auroc[s][set_name] = ood_metrics(val[s], ood[s])["auroc"]
    means = {s: float(np.mean(list(v.values()))) for s, v in auroc.items()}
    chosen = names[_first_best([means[s] for s in names])]
    return ScoreChoice(chosen, auroc, means, _val_accuracy(model, splits))


@torch.no_grad()
def _val_accuracy(model: nn.Module, splits: Splits, batch_size: int = 512) -> float:
    correct = 0
    for i in range(0, len(splits.val_x), batch_size):
        x = torch.from_numpy(graph_input(splits.val_x[i : i + batch_size]))
        pred = head_outputs(model, x)[0].argmax(1).numpy()
        correct += int((pred == splits.val_y[i : i + batch_size]).sum())
    return correct / len(splits.val_y)


@dataclass(frozen=True)
class Candidate:
    """One trained candidate (loss, recipe, backbone) with its picked score's numbers."""

    name: str
    val_accuracy: float
    mean_pseudo_auroc: float


def pick_model(candidates: Sequence[Candidate]) -> Candidate:
    """Step 3 of the rule: accuracy within `ACCURACY_SLACK` of the best, then pseudo-OOD AUROC."""
    if not candidates:
        raise ValueError("no candidates to choose from")
    top = max(c.val_accuracy for c in candidates)
    kept = [c for c in candidates if c.val_accuracy >= top - ACCURACY_SLACK - 1e-12]
    return kept[_first_best([c.mean_pseudo_auroc for c in kept])]
