"""The training loop: the paper's recipe, seeded, resumable, selected on validation only.

Each run directory holds `last.pt` (resume) and `best.pt` (highest validation accuracy), both
carrying the config, plus `history.jsonl`. The test split is never looked at here.
"""

from __future__ import annotations

import json
import logging
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from training.config import TrainConfig
from training.data.batches import BatchLoader
from training.data.datasets import load_dataset
from training.loss import make_loss
from training.models import Classifier, build_model

log = logging.getLogger(__name__)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' requested but torch sees no CUDA device")
    if name not in ("cpu", "cuda"):
        raise ValueError(f"unknown device {name!r}; choose auto, cpu or cuda")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def channel_stats(images: np.ndarray) -> tuple[list[float], list[float]]:
    """Per-channel mean/std of uint8 images in [0, 1] units (normalization lives in the model)."""
    x = images.astype(np.float64) / 255.0
    return x.mean(axis=(0, 2, 3)).tolist(), x.std(axis=(0, 2, 3)).tolist()


def model_from_config(cfg: TrainConfig, num_classes: int, shape, mean, std) -> Classifier:
    """`shape` is the input's (C, H, W)."""
    return build_model(
        cfg.arch,
        cfg.head,
        num_classes,
        shape[0],
        mean,
        std,
        image_size=shape[1],
        prototype_init=cfg.prototype_init,
    )


@torch.no_grad()
def predict(
    model: Classifier, images: np.ndarray, device: torch.device, batch_size: int = 512
) -> tuple[np.ndarray, np.ndarray | None]:
    """uint8 images -> (inference logits (N, K), min distance (N,) or None), eval mode."""
    model.eval()
    logits, dists = [], []
    channels_last = device.type == "cpu"
    for x, _ in BatchLoader(
        images, np.zeros(len(images)), batch_size, device=device, channels_last=channels_last
    ):
        z, d = model.outputs(x)
        logits.append(z.float().cpu())
        if d is not None:
            dists.append(d.float().cpu())
    return torch.cat(logits).numpy(), (torch.cat(dists).numpy() if dists else None)


def accuracy_of(model: Classifier, x: np.ndarray, y: np.ndarray, device: torch.device) -> float:
    logits, _ = predict(model, x, device)
    return float((logits.argmax(1) == y).mean())


def _lr_lambda(total_steps: int, milestones: list[float]):
    steps = [round(m * total_steps) for m in milestones]
    return lambda step: 0.1 ** sum(step >= s for s in steps)


@dataclass
class RunResult:
    run_dir: Path
    best_val_accuracy: float
    best_epoch: int
    seconds: float


def train(
    cfg: TrainConfig, run_dir: Path, resume: bool = False, progress: bool = True
) -> RunResult:
    """Train to `run_dir`; with `resume`, continue from `last.pt` if present (same config)."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    last_path, best_path = run_dir / "last.pt", run_dir / "best.pt"
    if last_path.exists() and not resume:
        raise FileExistsError(
            f"{run_dir} already holds a run; pass --resume to continue it or choose another --out"
        )
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = resolve_device(cfg.device)
    seed_everything(cfg.seed)
    data = load_dataset(cfg)
    mean, std = channel_stats(data.train_x)
    model = model_from_config(cfg, len(data.labels), data.shape, mean, std).to(device)
    channels_last = cfg.channels_last and device.type == "cpu"
    if channels_last:
        model = model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    opt = torch.optim.SGD(
        model.parameters(),
        lr=cfg.lr,
        momentum=cfg.momentum,
        nesterov=cfg.nesterov,
        weight_decay=cfg.weight_decay,
    )
    loader = BatchLoader(
        data.train_x,
        data.train_y,
        cfg.batch_size,
        shuffle=True,
        augment=cfg.augment,
        seed=cfg.seed,
        device=device,
        channels_last=channels_last,
        drop_last=True,
    )
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, _lr_lambda(cfg.epochs * len(loader), cfg.lr_milestones)
    )
    loss_fn = make_loss(cfg.head)

    start_epoch, best_acc, best_epoch, elapsed = 0, -1.0, -1, 0.0
    if resume and last_path.exists():
        ck = torch.load(last_path, map_location=device, weights_only=False)
        if TrainConfig.from_dict(ck["config"]).to_dict() != cfg.to_dict():
            raise ValueError(f"{last_path} was trained with a different config; refusing to resume")
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        sched.load_state_dict(ck["scheduler"])
        loader.gen.set_state(ck["loader_rng"])
        torch.set_rng_state(ck["torch_rng"])
        start_epoch, best_acc, best_epoch, elapsed = (
            ck["epoch"] + 1,
            ck["best_val_accuracy"],
            ck["best_epoch"],
            ck["seconds"],
        )
        log.info("resuming %s at epoch %d", run_dir, start_epoch)

    meta: dict[str, Any] = {
        "labels": data.labels,
        "mean": mean,
        "std": std,
        "shape": list(data.shape),
        "color_mode": data.color_mode,
    }
    for epoch in range(start_epoch, cfg.epochs):
        t0 = time.perf_counter()
        model.train()
        total, n = 0.0, 0
        bar = tqdm(
            loader,
            desc=f"{run_dir.name} epoch {epoch + 1}/{cfg.epochs}",
            disable=not progress,
            leave=False,
        )
        for x, y in bar:
            loss = loss_fn(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(y)
            n += len(y)
            bar.set_postfix(loss=f"{total / n:.4f}")
        val_acc = accuracy_of(model, data.val_x, data.val_y, device)
        elapsed += time.perf_counter() - t0
        record = {
            "epoch": epoch + 1,
            "train_loss": total / max(n, 1),
            "val_accuracy": val_acc,
            "lr": sched.get_last_lr()[0],
            "seconds": elapsed,
        }
        if hasattr(model.head, "distance_scale"):
            record["distance_scale"] = float(model.head.distance_scale.detach().abs())  # type: ignore[operator]
        log.info(
            "%s epoch %d: loss %.4f val acc %.4f (%.0fs)",
            run_dir.name,
            epoch + 1,
            record["train_loss"],
            val_acc,
            elapsed,
        )
        state = {
            "config": cfg.to_dict(),
            "meta": meta,
            "model": model.state_dict(),
            "epoch": epoch,
            "seconds": elapsed,
        }
        if val_acc > best_acc:
            best_acc, best_epoch = val_acc, epoch + 1
            _save_atomic({**state, "val_accuracy": val_acc}, best_path)
        _save_atomic(
            {
                **state,
                "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict(),
                "loader_rng": loader.gen.get_state(),
                "torch_rng": torch.get_rng_state(),
                "best_val_accuracy": best_acc,
                "best_epoch": best_epoch,
            },
            last_path,
        )
        # History last: a line in it always has its checkpoint on disk, so a run killed at
        # any point resumes from the epoch its history ends with.
        with open(run_dir / "history.jsonl", "a") as history:
            history.write(json.dumps(record) + "\n")
    return RunResult(run_dir, best_acc, best_epoch, elapsed)


def _save_atomic(obj: dict[str, Any], path: Path) -> None:
    """Write next to `path`, then rename: a kill mid-write leaves the previous file intact."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def load_checkpoint(
    path: Path, device: str = "cpu"
) -> tuple[Classifier, TrainConfig, dict[str, Any]]:
    """A trained model in eval mode, its config and meta (labels, mean/std, input shape)."""
    ck = torch.load(Path(path), map_location=device, weights_only=False)
    cfg = TrainConfig.from_dict(ck["config"])
    meta = ck["meta"]
    model = model_from_config(cfg, len(meta["labels"]), meta["shape"], meta["mean"], meta["std"])
    model.load_state_dict(ck["model"])
    return model.eval(), cfg, meta
