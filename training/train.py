"""The training loop: the paper's recipe, seeded, resumable, selected on validation only.

Each run directory holds `last.pt` (resume) and `best.pt` (highest validation accuracy), both
carrying the config, plus `history.jsonl`. The test split is never looked at here.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from isomax.contract.manifest import Preprocess
from training.config import TrainConfig
from training.data.batches import BatchLoader
from training.data.datasets import Splits, load_dataset
from training.data.image_files import FileBatches, ImageFiles
from training.devices import Distributed, Precision
from training.finetune import set_batchnorm_eval, start_from_frozen_features, summarize
from training.head import HEADS
from training.loss import make_loss
from training.models import BACKBONES, Classifier, build_model
from training.models.pretrained import is_pretrained_arch, normalization

log = logging.getLogger(__name__)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def channel_stats(images: np.ndarray) -> tuple[list[float], list[float]]:
    """Per-channel mean/std of uint8 images in [0, 1] units (normalization lives in the model)."""
    x = images.astype(np.float64) / 255.0
    return x.mean(axis=(0, 2, 3)).tolist(), x.std(axis=(0, 2, 3)).tolist()


def model_from_config(
    cfg: TrainConfig, num_classes: int, shape, mean, std, weights: str | None = None
) -> Classifier:
    """`shape` is the input's (C, H, W); `weights` initialize a pretrained-backbone arch."""
    return build_model(
        cfg.arch,
        cfg.head,
        num_classes,
        shape[0],
        mean,
        std,
        image_size=shape[1],
        prototype_init=cfg.prototype_init,
        weights=weights,
    )


def input_normalization(cfg: TrainConfig, data: Splits) -> tuple[list[float], list[float]]:
    """Pretrained backbones: their weights' mean/std; otherwise the training images' own."""
    if is_pretrained_arch(cfg.arch):
        mean, std = normalization(cfg.arch)
        return list(mean), list(std)
    if data.train_mean is not None and data.train_std is not None:
        return data.train_mean, data.train_std
    return channel_stats(data.train_x)


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


def _lr_lambda(cfg: TrainConfig, steps_per_epoch: int):
    """Learning-rate factor per step: linear warm-up, then step decay or cosine to 0."""
    total = cfg.epochs * steps_per_epoch
    warmup = round(cfg.warmup_epochs * steps_per_epoch)
    milestones = [round(m * total) for m in cfg.lr_milestones]

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if cfg.schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))
        return 0.1 ** sum(step >= s for s in milestones)

    return factor


def make_optimizer(cfg: TrainConfig, model: Classifier) -> torch.optim.Optimizer:
    """Two parameter groups: the backbone at `lr x backbone_lr_scale`, the head at `lr`.

    With `head_weight_decay` off, the head's prototypes and distance scale are not decayed:
    decay would shrink the distance scale (the logits' temperature) for no benefit.
    With the defaults this is the single-group optimizer of the paper's recipe.
    """
    groups = [
        {
            "params": list(model.backbone.parameters()),
            "lr": cfg.lr * cfg.backbone_lr_scale,
            "weight_decay": cfg.weight_decay,
        },
        {
            "params": list(model.head.parameters()),
            "lr": cfg.lr,
            "weight_decay": cfg.weight_decay if cfg.head_weight_decay else 0.0,
        },
    ]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr)
    raise ValueError(f"unknown optimizer {cfg.optimizer!r}; choose sgd or adamw")


def check_config(cfg: TrainConfig) -> None:
    """Refuse settings that cannot work, in one line each, before any data are read."""
    if cfg.head not in HEADS:
        raise ValueError(f"unknown head {cfg.head!r}; choose one of {', '.join(HEADS)}")
    if cfg.arch not in BACKBONES and not is_pretrained_arch(cfg.arch):
        raise ValueError(
            f"unknown architecture {cfg.arch!r}; choose one of {', '.join(BACKBONES)}, "
            "tv-<torchvision model> (e.g. tv-resnet18) or efficientnet-lite0"
        )
    if cfg.schedule not in ("step", "cosine"):
        raise ValueError(f"unknown schedule {cfg.schedule!r}; choose step or cosine")
    if cfg.optimizer not in ("sgd", "adamw"):
        raise ValueError(f"unknown optimizer {cfg.optimizer!r}; choose sgd or adamw")
    if cfg.epochs < 1 or cfg.batch_size < 1:
        raise ValueError("epochs and batch_size must be at least 1")
    if not 0 <= cfg.freeze_backbone_epochs <= cfg.epochs:
        raise ValueError("freeze_backbone_epochs must be between 0 and epochs")
    if cfg.recipe not in ("auto", "paper", "finetune"):
        raise ValueError(f"unknown recipe {cfg.recipe!r}; choose auto, paper or finetune")


@dataclass
class RunResult:
    run_dir: Path
    best_val_accuracy: float
    best_epoch: int
    seconds: float


@dataclass
class _Run:
    """Everything one training run holds while it runs; `train` moves it through the epochs."""

    cfg: TrainConfig
    run_dir: Path
    dist: Distributed
    data: Splits
    model: Classifier
    step_model: torch.nn.Module  # what the steps call: `model`, DDP-wrapped and/or compiled
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LambdaLR
    loader: BatchLoader | FileBatches
    loss_fn: torch.nn.Module
    amp: Precision
    meta: dict[str, Any]
    start_epoch: int = 0
    best_acc: float = -1.0
    best_epoch: int = -1
    elapsed: float = 0.0

    @property
    def last_path(self) -> Path:
        return self.run_dir / "last.pt"

    @property
    def best_path(self) -> Path:
        return self.run_dir / "best.pt"


def train(
    cfg: TrainConfig, run_dir: Path, resume: bool = False, progress: bool = True
) -> RunResult:
    """Train to `run_dir`; with `resume`, continue from `last.pt` if present (same config).

    Under `torchrun` (WORLD_SIZE > 1) this is one of the data-parallel processes: each takes
    `batch_size / world` images of every global batch, gradients are averaged (DDP), and only
    rank 0 writes checkpoints, history and logs.
    """
    check_config(cfg)
    run_dir = Path(run_dir)
    if (run_dir / "last.pt").exists() and not resume:
        raise FileExistsError(
            f"{run_dir} already holds a run; pass --resume to continue it or choose another --out"
        )
    run = _start_run(cfg, run_dir, resuming=resume and (run_dir / "last.pt").exists())
    for epoch in range(run.start_epoch, cfg.epochs):
        t0 = time.perf_counter()
        loss_sum, n = _train_epoch(run, epoch, progress)
        train_seconds = time.perf_counter() - t0
        if run.dist.is_main:
            _end_epoch(run, epoch, loss_sum, n, t0, train_seconds)
    _finish(run)
    return RunResult(run_dir, run.best_acc, run.best_epoch, run.elapsed)


def _start_run(cfg: TrainConfig, run_dir: Path, resuming: bool) -> _Run:
    """Data, model, optimizer, schedule and loader, in the order the seed expects; resumed
    from `last.pt` when `resuming`."""
    dist = Distributed.from_env(cfg.device)
    if dist.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = dist.device
    seed_everything(cfg.seed)
    data = load_dataset(cfg)
    mean, std = input_normalization(cfg, data)
    model = model_from_config(
        cfg, len(data.labels), data.shape, mean, std, weights=None if resuming else cfg.weights
    ).to(device)
    channels_last = cfg.channels_last and device.type in ("cpu", "cuda")
    if channels_last:
        model = model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    if not resuming:
        start_from_frozen_features(model, cfg, data, device, run_dir if dist.is_main else None)
    opt = make_optimizer(cfg, model)
    local_batch = dist.local_batch(cfg.batch_size)  # refuses a batch that does not split
    loader = _train_loader(cfg, data, dist, channels_last)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(cfg, len(loader)))
    # DDP first, then compile (the order torch documents); checkpoints save `model` itself.
    step_model = dist.wrap(model, find_unused=cfg.freeze_backbone_epochs > 0)
    if cfg.compile:
        step_model = torch.compile(step_model)  # type: ignore[assignment]
    amp = Precision.for_device(device, cfg.amp)
    log.info(
        "training on %s%s, %s, %d images/step per process",
        device,
        f" x {dist.world} processes" if dist.world > 1 else "",
        amp.name,
        local_batch,
    )
    run = _Run(
        cfg, run_dir, dist, data, model, step_model, opt, sched, loader,
        make_loss(cfg.head), amp, _checkpoint_meta(data, mean, std),
    )  # fmt: skip
    if resuming:
        _resume(run)
    return run


def _train_loader(
    cfg: TrainConfig, data: Splits, dist: Distributed, channels_last: bool
) -> BatchLoader | FileBatches:
    """This process's shard of the shuffled training batches: from files or from the array."""
    loader: BatchLoader | FileBatches
    if data.train_files is not None:
        assert data.preprocess is not None
        files = ImageFiles(data.train_files, data.train_y, data.preprocess, augment=cfg.augment)
        loader = FileBatches(
            files,
            cfg.batch_size,
            cfg.seed,
            dist.device,
            workers=cfg.workers,
            channels_last=channels_last,
            shard=(dist.rank, dist.world),
        )
    else:
        loader = BatchLoader(
            data.train_x,
            data.train_y,
            cfg.batch_size,
            shuffle=True,
            augment=cfg.augment,
            seed=cfg.seed,
            device=dist.device,
            channels_last=channels_last,
            drop_last=True,
            shard=(dist.rank, dist.world),
        )
    if len(loader) == 0:
        raise ValueError(
            f"{len(data.train_y)} training images make no batch of {cfg.batch_size}; "
            "lower --batch-size"
        )
    return loader


def _checkpoint_meta(data: Splits, mean: list[float], std: list[float]) -> dict[str, Any]:
    """What export needs besides the weights: labels, normalization, input geometry."""
    meta: dict[str, Any] = {
        "labels": data.labels,
        "mean": mean,
        "std": std,
        "shape": list(data.shape),
        "color_mode": data.color_mode,
    }
    if data.preprocess is not None:
        meta["preprocess"] = data.preprocess.model_dump(mode="json")
    return meta


def _resume(run: _Run) -> None:
    """Weights, optimizer, schedule, random states and progress from `last.pt`."""
    ck = torch.load(run.last_path, map_location=run.dist.device, weights_only=False)
    if TrainConfig.from_dict(ck["config"]).to_dict() != run.cfg.to_dict():
        raise ValueError(f"{run.last_path} was trained with a different config; refusing to resume")
    run.model.load_state_dict(ck["model"])
    run.opt.load_state_dict(ck["optimizer"])
    run.sched.load_state_dict(ck["scheduler"])
    run.loader.gen.set_state(ck["loader_rng"])
    torch.set_rng_state(ck["torch_rng"])
    if "scaler" in ck:
        run.amp.scaler.load_state_dict(ck["scaler"])
    run.start_epoch = ck["epoch"] + 1
    run.best_acc, run.best_epoch, run.elapsed = (
        ck["best_val_accuracy"],
        ck["best_epoch"],
        ck["seconds"],
    )
    log.info("resuming %s at epoch %d", run.run_dir, run.start_epoch)


def _train_epoch(run: _Run, epoch: int, progress: bool) -> tuple[float, int]:
    """One pass over this process's batches: (sum of the per-image losses, images seen)."""
    cfg, model = run.cfg, run.model
    model.train()
    backbone_frozen = epoch < cfg.freeze_backbone_epochs
    model.backbone.requires_grad_(not backbone_frozen)
    if backbone_frozen:
        model.backbone.eval()  # BatchNorm statistics stay the pretrained ones too
    elif cfg.freeze_batchnorm:
        set_batchnorm_eval(model.backbone)
    prepare = getattr(run.loss_fn, "prepare", None)
    total, n = 0.0, 0
    bar = tqdm(
        run.loader,
        desc=f"{run.run_dir.name} epoch {epoch + 1}/{cfg.epochs}",
        disable=not (progress and run.dist.is_main),
        leave=False,
    )
    for x, y in bar:
        if prepare is not None:  # DisMax: the batch's second half as 4-image mosaics
            x, y = prepare(x, y, len(run.data.labels))
        with run.amp.autocast():
            loss = run.loss_fn(run.step_model(x), y)
        run.opt.zero_grad(set_to_none=True)
        run.amp.scaler.scale(loss).backward()
        run.amp.scaler.step(run.opt)
        run.amp.scaler.update()
        run.sched.step()
        total += loss.item() * len(y)
        n += len(y)
        bar.set_postfix(loss=f"{total / n:.4f}")
    model.backbone.requires_grad_(True)
    run.dist.sync_buffers(model)
    return total, n


def _end_epoch(
    run: _Run, epoch: int, loss_sum: float, n: int, t0: float, train_seconds: float
) -> None:
    """Rank 0 after an epoch: validate, then `best.pt`, `last.pt` and the history line."""
    model, dist = run.model, run.dist
    val_acc = accuracy_of(model, run.data.val_x, run.data.val_y, dist.device)
    run.elapsed += time.perf_counter() - t0
    record = {
        "epoch": epoch + 1,
        "train_loss": loss_sum / max(n, 1),
        "val_accuracy": val_acc,
        "lr": run.sched.get_last_lr()[-1],
        "seconds": run.elapsed,
        "images_per_second": n * dist.world / max(train_seconds, 1e-9),
    }
    if hasattr(model.head, "distance_scale"):
        record["distance_scale"] = float(model.head.distance_scale.detach().abs())  # type: ignore[operator]
    log.info(
        "%s epoch %d: loss %.4f val acc %.4f (%.0fs)",
        run.run_dir.name, epoch + 1, record["train_loss"], val_acc, run.elapsed,
    )  # fmt: skip
    state = {
        "config": run.cfg.to_dict(),
        "meta": run.meta,
        "model": model.state_dict(),
        "epoch": epoch,
        "seconds": run.elapsed,
    }
    if val_acc > run.best_acc:
        run.best_acc, run.best_epoch = val_acc, epoch + 1
        _save_atomic({**state, "val_accuracy": val_acc}, run.best_path)
    _save_atomic(
        {
            **state,
            "optimizer": run.opt.state_dict(),
            "scheduler": run.sched.state_dict(),
            "scaler": run.amp.scaler.state_dict(),
            "loader_rng": run.loader.gen.get_state(),
            "torch_rng": torch.get_rng_state(),
            "best_val_accuracy": run.best_acc,
            "best_epoch": run.best_epoch,
        },
        run.last_path,
    )
    # History last: a line in it always has its checkpoint on disk, so a run killed at
    # any point resumes from the epoch its history ends with.
    with open(run.run_dir / "history.jsonl", "a") as history:
        history.write(json.dumps(record) + "\n")


def _finish(run: _Run) -> None:
    """After the last epoch: the cross-rank weight check, the frozen baseline, the group's end."""
    dist, model = run.dist, run.model
    if dist.world > 1:
        # DDP keeps replicas equal by construction; check it, since a silent divergence would
        # make the saved rank-0 weights a sample of one.
        spread = dist.weight_spread(model)
        if dist.is_main:
            (run.run_dir / "distributed.json").write_text(
                json.dumps({"world": dist.world, "max_weight_difference_across_ranks": spread})
            )
        log.info("%d processes: weights differ across ranks by at most %.3g", dist.world, spread)
    if run.cfg.frozen_baseline and dist.is_main:
        model.load_state_dict(torch.load(run.best_path, map_location=dist.device)["model"])
        summarize(model, run.best_epoch, run.data, dist.device, run.cfg.workers, run.run_dir)
    dist.close()


def last_record(run_dir: Path) -> dict[str, Any] | None:
    """The last line of a run's `history.jsonl` (its latest finished epoch), or None."""
    path = Path(run_dir) / "history.jsonl"
    lines = path.read_text().splitlines() if path.is_file() else []
    return json.loads(lines[-1]) if lines else None


def _save_atomic(obj: dict[str, Any], path: Path) -> None:
    """Write next to `path`, then rename: a kill mid-write leaves the previous file intact."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def serving_preprocess(meta: dict[str, Any], cfg: TrainConfig) -> Preprocess:
    """The preprocessing to serve a checkpoint with: exactly its evaluation preprocessing.

    Image-folder runs record it at training time (`meta["preprocess"]`); older runs and the
    array data sets give their input geometry. Mean/std are the model's own (inside the graph).
    """
    norm = {"mean": tuple(meta["mean"]), "std": tuple(meta["std"])}
    if "preprocess" in meta:
        return Preprocess.model_validate({**meta["preprocess"], **norm})
    if cfg.dataset == "folder" and cfg.data_dir:
        from training.data.datasets import folder_preprocess

        return folder_preprocess(Path(cfg.data_dir)).model_copy(update=norm)
    c, h, w = meta["shape"]
    return Preprocess(
        height=h,
        width=w,
        channels=c,
        color_mode=meta["color_mode"],
        resize_filter="bilinear",
        mean=norm["mean"],
        std=norm["std"],
    )


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
