"""Fine-tuning a pretrained backbone without distorting it: frozen features, the linear probe
that fits the head on them first (LP-FT), and BatchNorm kept in eval mode.

Why (measured on the photo benchmark, docs/training.md "Fine-tuning a pretrained backbone"):
EfficientNet-Lite's BatchNorm layers update their running statistics with momentum 0.01 (the
TensorFlow 0.99), so after an epoch of training in train mode, evaluation normalizes with
statistics that are mostly still ImageNet's while the weights were trained on batch statistics
of the new images; and a randomly initialized head sends large, random gradients into the
backbone at the switch (Kumar et al. 2022, "Fine-Tuning can Distort Pretrained Features and
Underperform Out-of-Distribution"). The linear probe removes the second, `freeze_batchnorm` the
first.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from training.data.datasets import Splits
from training.data.image_files import ImageFiles
from training.loss import make_loss

log = logging.getLogger(__name__)

PROBE_ITERATIONS = 200  # L-BFGS iterations of the head fit: converged well before (see docs)
FEATURE_BATCH = 256


def set_batchnorm_eval(model: nn.Module) -> None:
    """Every BatchNorm layer of `model` in eval mode: normalize with the running statistics and
    leave them as they are; its affine weight and bias still train."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()


def training_images(data: Splits, workers: int) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
    """The training split as `(uint8 (B, C, H, W), labels)` batches in file order, with the
    evaluation transform (no augmentation): what the frozen backbone's features are fitted on."""
    if data.train_files is not None:
        assert data.preprocess is not None
        files = ImageFiles(data.train_files, data.train_y, data.preprocess, augment=False)
        return DataLoader(files, batch_size=FEATURE_BATCH, num_workers=workers)
    return _uint8_batches(data.train_x, data.train_y)


def _uint8_batches(x: np.ndarray, y: np.ndarray) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    for i in range(0, len(x), FEATURE_BATCH):
        yield torch.from_numpy(x[i : i + FEATURE_BATCH]), torch.from_numpy(y[i : i + FEATURE_BATCH])


@torch.no_grad()
def features_of(
    model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Backbone features `(N, d)` (float32, CPU) and labels `(N,)` of uint8 batches, eval mode."""
    was_training = model.training
    model.eval()
    feats, labels = [], []
    for x, y in batches:
        x = x.to(device).float().div_(255.0)
        feats.append(model.forward_features(x).float().cpu())  # type: ignore[operator]
        labels.append(y.cpu())
    model.train(was_training)
    return torch.cat(feats), torch.cat(labels)


def array_features(model: nn.Module, images: np.ndarray, device: torch.device) -> torch.Tensor:
    """Features of in-memory uint8 images (validation, pseudo-OOD)."""
    return features_of(model, _uint8_batches(images, np.zeros(len(images), np.int64)), device)[0]


def fit_head(head: nn.Module, kind: str, feats: torch.Tensor, labels: torch.Tensor) -> float:
    """Fit `head` to convergence on fixed features (the LP of LP-FT); -> final training loss.

    Full-batch L-BFGS on the head's own loss. IsoMax+ prototypes start at the normalized class
    means (the nearest-class-mean classifier) and are fitted; the distance scale stays at its
    initial value. Fitted too, it grows without bound where the training features are
    separable (1,280-d features of 5,000 images are: the loss went to 0.0000), and fine-tuning
    then gets no gradient at all; with the scale fixed the logits are bounded and the optimum
    is finite, and the scale learns during fine-tuning as it does from scratch.
    """
    if hasattr(head, "prototypes") and kind == "isomaxplus":
        with torch.no_grad():
            means = torch.stack(
                [
                    nn.functional.normalize(feats[labels == k], dim=1).mean(0)
                    for k in range(head.prototypes.shape[0])  # type: ignore[index]
                ]
            )
            head.prototypes.copy_(nn.functional.normalize(means, dim=1))  # type: ignore[operator]
    loss_fn = make_loss(kind)
    params = [p for n, p in head.named_parameters() if p.requires_grad and n != "distance_scale"]
    opt = torch.optim.LBFGS(
        params, lr=1.0, max_iter=PROBE_ITERATIONS, history_size=20, line_search_fn="strong_wolfe"
    )

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = loss_fn(head(feats), labels)
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
        final = float(loss_fn(head(feats), labels).detach())
    log.info("linear probe: head fitted on %d frozen features, loss %.4f", len(feats), final)
    return final


# Validation images each pseudo-OOD set is made from: one forward pass per set.
PSEUDO_OOD_IMAGES = 500
FROZEN_BASELINE = "frozen_baseline.json"  # written before training, read into summary.json
SUMMARY = "summary.json"


def _pseudo_sources(val_x: np.ndarray) -> np.ndarray:
    """A seeded random subset of the validation images (a folder's come sorted by class)."""
    if len(val_x) <= PSEUDO_OOD_IMAGES:
        return val_x
    pick = np.random.default_rng(0).choice(len(val_x), PSEUDO_OOD_IMAGES, replace=False)
    return val_x[np.sort(pick)]


def _pseudo_images(data: Splits) -> dict[str, np.ndarray]:
    """The frozen baseline's pseudo-OOD images, made from the seeded validation subset."""
    from training.pseudo_ood import baseline_sets

    return baseline_sets(_pseudo_sources(data.val_x))


def _pseudo_features(
    model: nn.Module, data: Splits, images: dict[str, np.ndarray], device: torch.device
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Features of the validation images and of the pseudo-OOD `images` made from them."""
    val = array_features(model, data.val_x, device)
    pseudo = {k: array_features(model, v, device) for k, v in images.items()}
    return val, pseudo


def start_from_frozen_features(
    model: nn.Module, cfg: Any, data: Splits, device: torch.device, run_dir: Path | None
) -> None:
    """Before the first epoch, on the pretrained backbone's features (one pass, no training):
    the linear probe (`cfg.linear_probe`) and the frozen baseline's figures
    (`cfg.frozen_baseline`, written to `run_dir` when given: the main process's)."""
    if not (cfg.linear_probe or cfg.frozen_baseline):
        return
    train = features_of(model, training_images(data, cfg.workers), device)
    if cfg.linear_probe:
        fit_head(model.head, cfg.head, *train)  # type: ignore[arg-type]
    if cfg.frozen_baseline and run_dir is not None:
        from training.baseline import frozen_figures

        val, pseudo = _pseudo_features(model, data, _pseudo_images(data), device)
        figures = frozen_figures(train, val, data.val_y, pseudo)
        (run_dir / FROZEN_BASELINE).write_text(json.dumps(figures, indent=2) + "\n")


def summarize(
    model: nn.Module, epoch: int, data: Splits, device: torch.device, workers: int, run_dir: Path
) -> dict[str, Any]:
    """`run_dir/summary.json`: the frozen backbone's figures beside the trained model's (the
    checkpoint training selected), on the same validation images and pseudo-OOD; logged."""
    from training.baseline import log_comparison, trained_figures
    from training.models.classifier import logits_and_min_distance

    def outputs(images: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        logits, dists = [], []
        model.eval()
        with torch.no_grad():
            for x, _ in _uint8_batches(images, np.zeros(len(images), np.int64)):
                z, d = logits_and_min_distance(model, x.to(device).float().div_(255.0))
                logits.append(z.float().cpu().numpy())
                dists.append(None if d is None else d.float().cpu().numpy())
        return np.concatenate(logits), None if dists[0] is None else np.concatenate(dists)  # type: ignore[arg-type]

    pseudo_images = _pseudo_images(data)
    train = features_of(model, training_images(data, workers), device)
    val, pseudo = _pseudo_features(model, data, pseudo_images, device)
    trained = trained_figures(
        outputs(data.val_x),
        data.val_y,
        {k: outputs(v) for k, v in pseudo_images.items()},
        train,
        val,
        pseudo,
    )
    summary: dict[str, Any] = {
        "pseudo_ood": {
            "from": f"{min(len(data.val_y), PSEUDO_OOD_IMAGES)} validation images (seeded)",
            "sets": list(pseudo),
        },
        "frozen_backbone": json.loads((run_dir / FROZEN_BASELINE).read_text()),
        "trained": {"epoch": epoch, **trained},
    }
    (run_dir / SUMMARY).write_text(json.dumps(summary, indent=2) + "\n")
    log_comparison(summary)
    return summary
