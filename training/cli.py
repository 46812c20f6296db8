"""Training subcommands of `isomax` (data, train, evaluate, export, reproduce)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from training.config import TrainConfig

log = logging.getLogger("isomax")


def _int_list(s: str) -> list[int]:
    return [int(v) for v in s.split(",") if v.strip()]


def _add_train_args(p: argparse.ArgumentParser) -> None:
    d = TrainConfig()
    p.add_argument("--arch", default=d.arch, help="smallcnn | resnet18 | resnet34 | densenet100")
    p.add_argument("--head", default=d.head, help="softmax | isomax | isomaxplus")
    p.add_argument("--dataset", default=d.dataset, help="fashion-mnist | cifar | folder")
    p.add_argument("--data-dir", default=None, help="where the data set lives (default: its usual place)")
    p.add_argument("--classes", type=_int_list, default=None, help="open set: train on these class indices, e.g. 0,1,2,3,4,5")
    p.add_argument("--val-size", type=int, default=d.val_size)
    p.add_argument("--limit-train", type=int, default=None, help="use only N training images (smoke runs)")
    p.add_argument("--epochs", type=int, default=d.epochs)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument("--no-augment", dest="augment", action="store_false")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--device", default=d.device, help="auto | cpu | cuda")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")


def _config(a: argparse.Namespace) -> TrainConfig:
    return TrainConfig(
        arch=a.arch, head=a.head, dataset=a.dataset, data_dir=a.data_dir, classes=a.classes,
        val_size=a.val_size, limit_train=a.limit_train, epochs=a.epochs, batch_size=a.batch_size,
        lr=a.lr, weight_decay=a.weight_decay, augment=a.augment, seed=a.seed, device=a.device,
        threads=a.threads,
    )  # fmt: skip


def cmd_train(a: argparse.Namespace) -> int:
    from training.train import train

    cfg = _config(a)
    from training.models import BACKBONES
    from training.head import HEADS

    if cfg.arch not in BACKBONES:
        raise ValueError(f"unknown architecture {cfg.arch!r}; choose one of {', '.join(BACKBONES)}")
    if cfg.head not in HEADS:
        raise ValueError(f"unknown head {cfg.head!r}; choose one of {', '.join(HEADS)}")
    out = Path(a.out) if a.out else Path("runs") / f"{cfg.dataset}-{cfg.arch}-{cfg.head}-s{cfg.seed}"
    result = train(cfg, out, resume=a.resume, progress=not a.quiet)
    print(json.dumps({"run_dir": str(result.run_dir), "best_val_accuracy": result.best_val_accuracy,
                      "best_epoch": result.best_epoch, "train_seconds": round(result.seconds, 1)}))  # fmt: skip
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="isomax", description="Train, evaluate and export IsoMax+ models.")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a model into a run directory")
    _add_train_args(p)
    p.add_argument("--out", default=None, help="run directory (default runs/<dataset>-<arch>-<head>-s<seed>)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_train)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    a = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if a.verbose else logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        return a.func(a)
    except (FileNotFoundError, FileExistsError, ValueError, RuntimeError) as e:
        print(f"isomax {a.command}: error: {e}", file=sys.stderr)
        return 2
