"""Data-parallel training under torchrun: two processes on the gloo backend (CPU).

- Both ranks end with identical weights (checked by the run itself, recorded in
  `distributed.json`), with the backbone and its BatchNorm layers training.
- With the same global batch, two processes train the same model as one process: compared with
  the backbone frozen, where the math is identical (BatchNorm statistics over each process's
  half batch would otherwise differ from the whole batch's), to 1e-5.
- A job killed after its first epoch and relaunched with --resume ends where an uninterrupted
  job does.
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


def test_a_killed_torchrun_job_resumes_to_the_uninterrupted_weights(tmp_path: Path) -> None:
    """Stop the whole job once epoch 1 is on disk, relaunch with --resume: the result equals
    a job that was never stopped (rank 0's checkpoint carries what every rank needs)."""
    import signal
    import time

    data = _folder(tmp_path / "data")
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    args = ["--epochs", "3"]
    _torchrun([*_args(data, straight, frozen=False), *args])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    job = subprocess.Popen(
        [*cmd, "-m", "isomax", *_args(data, resumed, frozen=False), *args],
        cwd=REPO,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    history = resumed / "history.jsonl"
    deadline = time.monotonic() + 300
    try:
        while not (history.is_file() and history.read_text().strip()):
            assert job.poll() is None and time.monotonic() < deadline, "job ended before epoch 1"
            time.sleep(0.05)
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
        job.wait(60)
    _torchrun([*_args(data, resumed, frozen=False), *args, "--resume"])
    lines = history.read_text().splitlines()
    assert [json.loads(x)["epoch"] for x in lines][-1] == 3
    a = torch.load(straight / "last.pt", weights_only=False)["model"]
    b = torch.load(resumed / "last.pt", weights_only=False)["model"]
    for name, value in a.items():
        torch.testing.assert_close(b[name], value, rtol=0, atol=TOLERANCE, msg=name)
