"""Data-parallel training under torchrun: two processes on the gloo backend (CPU).

- Both ranks end with identical weights (checked by the run itself, recorded in
  `distributed.json`), with the backbone and its BatchNorm layers training.
- With the same global batch, two processes train the same model as one process: compared with
  the backbone frozen, where the math is identical (BatchNorm statistics over each process's
  half batch would otherwise differ from the whole batch's), to 1e-5.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from training.cli import main

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
TOLERANCE = 1e-5


def _folder(root: Path) -> Path:
    rng = np.random.default_rng(0)
    for split, n in (("train", 16), ("val", 4)):
        for k, cls in enumerate(("dark", "light")):
            d = root / split / cls
            d.mkdir(parents=True)
            for i in range(n):
                arr = np.clip(rng.normal(70 + 110 * k, 40, (40, 40, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(arr).save(d / f"{i}.png")
    return root


def _args(data: Path, out: Path, frozen: bool) -> list[str]:
    args = ["train", "--quiet", "--dataset", "folder", "--data-dir", str(data)]
    args += ["--epochs", "2", "--batch-size", "8", "--lr", "0.05", "--workers", "0"]
    args += ["--threads", "1", "--out", str(out)]
    return args + (["--freeze-backbone-epochs", "2"] if frozen else [])


def _torchrun(args: list[str]) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [*cmd, "-m", "isomax", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def _head(run: Path) -> dict[str, torch.Tensor]:
    state = torch.load(run / "last.pt", weights_only=False)["model"]
    return {k: v for k, v in state.items() if k.startswith("head.")}


def test_two_processes_train_like_one_with_the_same_global_batch(tmp_path: Path) -> None:
    data = _folder(tmp_path / "data")
    _torchrun(_args(data, tmp_path / "ddp-frozen", frozen=True))
    assert main(_args(data, tmp_path / "one-frozen", frozen=True)) == 0
    two, one = _head(tmp_path / "ddp-frozen"), _head(tmp_path / "one-frozen")
    assert set(two) == {"head.prototypes", "head.distance_scale"}
    for k in two:
        torch.testing.assert_close(two[k], one[k], rtol=0, atol=TOLERANCE)
    # The head really trained (so agreeing is not trivially true).
    assert float(one["head.distance_scale"].abs()) != 1.0


def test_ranks_hold_identical_weights_after_full_training(tmp_path: Path) -> None:
    data = _folder(tmp_path / "data")
    run = tmp_path / "ddp"
    _torchrun(_args(data, run, frozen=False))
    record = json.loads((run / "distributed.json").read_text())
    assert record == {"world": 2, "max_weight_difference_across_ranks": 0.0}
    history = [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in history] == [1, 2]  # rank 0 alone wrote the history
