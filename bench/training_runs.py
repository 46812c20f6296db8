"""What the training benchmarks share: the `isomax` CLI run from this checkout, a folder run,
its history, timed fine-tuning steps and the machine line.

Used by bench/photos_bench.py and bench/finetune_bench.py (one implementation of each).
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def isomax(*args: str) -> None:
    """`python -m isomax ARGS` with this checkout's packages first on the path."""
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "PYTHONPATH": path}
    subprocess.run([sys.executable, "-m", "isomax", *args], cwd=ROOT, check=True, env=env)


def train_folder(folder: Path, run: Path, *args: str) -> None:
    """`isomax train` on an image folder (`--dataset folder`) into `run`, no progress bar."""
    isomax(
        "train", "--quiet", "--dataset", "folder", "--data-dir", str(folder),
        *args, "--out", str(run),
    )  # fmt: skip


def history(run: Path) -> list[dict[str, Any]]:
    """The run's `history.jsonl`, one record per finished epoch."""
    return [json.loads(x) for x in (run / "history.jsonl").read_text().splitlines()]


def step_seconds(model: Any, loss_fn: Any, opt: Any, x: Any, y: Any, steps: int) -> list[float]:
    """Seconds of each of `steps` fine-tuning steps (forward, backward, optimizer step) on one
    batch, after one untimed step that warms up allocators and kernels."""
    times = []
    for i in range(steps + 1):
        t0 = time.perf_counter()
        loss = loss_fn(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if i:
            times.append(time.perf_counter() - t0)
    return times


def machine() -> str:
    return f"{os.cpu_count()} CPU cores ({platform.machine()}), no GPU"
