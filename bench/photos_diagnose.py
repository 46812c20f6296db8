"""Why validation accuracy collapses when the backbone unfreezes: one `isomax train` run on the
benchmark folder (`bench/photos_bench.py make`), each epoch's checkpoint kept and examined.

For every epoch: validation accuracy as training reports it (eval mode, BatchNorm running
statistics), the same weights with the BatchNorm statistics recomputed on the training images
(eval transform, no augmentation: "precise BN"), the mean |running mean/var - batch statistics|
gap, and the head's distance scale. If the recomputed accuracy stays high while the reported one
collapses, the weights are fine and the running statistics are what is stale.

    python bench/photos_diagnose.py NAME -- <isomax train arguments>
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.photos_bench import COMMON, FOLDER, OUT  # noqa: E402


def _train_keeping_epochs(run: Path, args: list[str]) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "isomax", "train", "--quiet", "--dataset", "folder"]
    cmd += ["--data-dir", str(FOLDER), *COMMON, *args, "--out", str(run)]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env)
    seen = 0
    while True:
        done = proc.poll() is not None
        path = run / "history.jsonl"
        lines = [x for x in path.read_text().splitlines() if x.strip()] if path.is_file() else []
        # last.pt is written before its history line, so it is that epoch's state.
        for n in range(seen + 1, len(lines) + 1):
            shutil.copy(run / "last.pt", run / f"epoch{n}.pt")
        seen = len(lines)
        if done:
            break
        time.sleep(0.5)
    if proc.returncode:
        raise SystemExit(proc.returncode)


@torch.no_grad()
def _recompute_bn(model, images: np.ndarray, batch: int = 200) -> None:
    """Running statistics = the exact mean/var over `images` (momentum None: cumulative)."""
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    for i in range(0, len(images), batch):
        model(torch.from_numpy(images[i : i + batch]).float() / 255.0)
    model.eval()


def examine(run: Path) -> list[dict]:
    from training.data.folders import load_image_folder
    from training.train import accuracy_of, load_checkpoint

    out = []
    history = [json.loads(x) for x in (run / "history.jsonl").read_text().splitlines()]
    device = torch.device("cpu")
    train_x = None
    for n, h in enumerate(history, 1):
        model, cfg, meta = load_checkpoint(run / f"epoch{n}.pt")
        from training.train import serving_preprocess

        spec = serving_preprocess(meta, cfg)
        if train_x is None:
            train_x = load_image_folder(FOLDER / "train", spec)[0][::5]
            val_x, val_y, _ = load_image_folder(FOLDER / "val", spec)
        reported = accuracy_of(model, val_x, val_y, device)
        _recompute_bn(model, train_x)
        recomputed = accuracy_of(model, val_x, val_y, device)
        out.append(
            {
                "epoch": n,
                "val_accuracy_reported": round(reported, 4),
                "val_accuracy_bn_recomputed": round(recomputed, 4),
                "history_val_accuracy": h["val_accuracy"],
                "distance_scale": h.get("distance_scale"),
                "train_loss": h["train_loss"],
            }
        )
        print(json.dumps(out[-1]), flush=True)
    return out


def main() -> None:
    name, args = sys.argv[1], sys.argv[2:]
    if args and args[0] == "--":
        args = args[1:]
    torch.set_num_threads(2)
    run = OUT / "diagnose" / name
    if not (run / "history.jsonl").is_file():
        _train_keeping_epochs(run, args)
    result = {"args": args, "epochs": examine(run)}
    (run / "diagnosis.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
