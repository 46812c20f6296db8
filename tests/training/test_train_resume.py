"""A run killed mid-checkpoint resumes to the same weights as a run that never stopped."""

from __future__ import annotations

import json

import pytest
import torch

import training.train as train_module
from training.config import TrainConfig
from training.data import fmnist

pytestmark = pytest.mark.skipif(
    not fmnist.DEFAULT_DIR.is_dir(), reason="needs apt-get install dataset-fashion-mnist"
)

CFG = TrainConfig(limit_train=300, val_size=200, epochs=2, batch_size=64, threads=1)


def _epochs(run_dir) -> list[int]:
    lines = (run_dir / "history.jsonl").read_text().splitlines()
    return [json.loads(line)["epoch"] for line in lines]


def test_kill_while_saving_keeps_history_and_checkpoint_in_step(tmp_path, monkeypatch):
    real_save = torch.save
    calls = {"last": 0}

    def dying_save(obj, path, *args, **kwargs):
        if str(path).endswith("last.pt.tmp"):
            calls["last"] += 1
            if calls["last"] == 2:  # the second epoch's checkpoint: half a file, then death
                with open(path, "wb") as f:
                    f.write(b"partial")
                raise KeyboardInterrupt
        return real_save(obj, path, *args, **kwargs)

    interrupted = tmp_path / "interrupted"
    monkeypatch.setattr(train_module.torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        train_module.train(CFG, interrupted, progress=False)
    monkeypatch.setattr(train_module.torch, "save", real_save)

    # The history claims only what the last complete checkpoint holds.
    assert _epochs(interrupted) == [1]
    assert torch.load(interrupted / "last.pt", weights_only=False)["epoch"] == 0

    train_module.train(CFG, interrupted, resume=True, progress=False)
    assert _epochs(interrupted) == [1, 2]
    assert not (interrupted / "last.pt.tmp").exists()

    straight = tmp_path / "straight"
    train_module.train(CFG, straight, progress=False)
    resumed_weights = torch.load(interrupted / "last.pt", weights_only=False)["model"]
    straight_weights = torch.load(straight / "last.pt", weights_only=False)["model"]
    for name, value in straight_weights.items():
        assert torch.equal(resumed_weights[name], value), name
