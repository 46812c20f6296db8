"""A tiny real run through the command line: train -> export -> a bundle the service accepts."""

from __future__ import annotations

import json

import numpy as np
import pytest

from isomax.contract.manifest import Manifest
from isomax.contract.verdict import SERVED_SCORES
from training.cli import main
from training.data import fmnist

pytestmark = pytest.mark.skipif(
    not fmnist.DEFAULT_DIR.is_dir(), reason="needs apt-get install dataset-fashion-mnist"
)


# A few hundred images, one epoch: every train call in this module uses the same config.
TINY_TRAIN = ["train", "--limit-train", "300", "--val-size", "200", "--epochs", "1"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "r"
    assert main([*TINY_TRAIN, "--out", str(out), "--quiet"]) == 0
    return out


def test_train_writes_checkpoints_and_history(run_dir):
    assert (run_dir / "best.pt").is_file() and (run_dir / "last.pt").is_file()
    history = [json.loads(line) for line in (run_dir / "history.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in history] == [1]
    assert 0.0 <= history[0]["val_accuracy"] <= 1.0 and np.isfinite(history[0]["train_loss"])


def test_second_train_into_same_dir_is_refused_and_resume_is_a_no_op(run_dir, capsys):
    before = (run_dir / "best.pt").read_bytes()
    assert main([*TINY_TRAIN, "--out", str(run_dir)]) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert (run_dir / "best.pt").read_bytes() == before
    resume = [*TINY_TRAIN, "--out", str(run_dir), "--resume", "--quiet"]
    assert main(resume) == 0  # already finished: nothing more to do
    assert len((run_dir / "history.jsonl").read_text().splitlines()) == 1


def test_export_produces_a_bundle_the_manifest_schema_accepts(run_dir, tmp_path, capsys):
    models = tmp_path / "models"
    args = [
        "export",
        str(run_dir),
        "--name",
        "tiny",
        "--models-dir",
        str(models),
        "--ood",
        "mnist,uniform-noise",
    ]
    assert main(args) == 0
    m = Manifest.read(models / "tiny" / "1")
    assert m.labels == tuple(fmnist.LABELS)
    assert (m.preprocess.height, m.preprocess.width, m.preprocess.color_mode) == (28, 28, "L")
    assert m.training["head"] == "isomaxplus" and m.training["limit_train"] == 300
    assert set(m.metrics.accuracy) == {"val", "test"}
    assert set(m.metrics.flagged) == {"test", "mnist", "uniform-noise"}
    assert 0.0 <= m.metrics.flagged["test"] <= 1.0
    # The served score is chosen by the rule (`--score auto`, the default) from validation and
    # pseudo-OOD only; its rows sit beside the model's own scores.
    served = m.calibration.score
    assert served in SERVED_SCORES
    extra = set() if served == "min_distance" else {served, f"{served}_class"}
    assert (
        set(m.metrics.ood) == {"mnist", "uniform-noise"}
        and set(m.metrics.ood["mnist"])
        == {
            "mds",
            "mds_class",
            "es",
            "es_class",
            "mps",
        }
        | extra
    )
    assert m.calibration.size == 200 and m.calibration.threshold > 0
    # One threshold per predicted class; 200 images over 10 classes is under the 50-image
    # minimum for most of them, which then fall back to the global threshold.
    per_class = m.calibration.per_class
    assert per_class is not None and len(per_class) == 10
    assert sum(c.size for c in per_class) == 200
    for c in per_class:
        assert c.pooled == (c.size < 50)
        assert c.pooled or c.threshold != m.calibration.threshold
    # Temperature scaling, fitted on the validation split; ECE on test before and after it.
    assert m.calibration.temperature is not None and m.calibration.temperature > 0
    ece = m.metrics.calibration_error["test"]
    assert ece.bins == 15 and 0 <= ece.after <= 1 and 0 <= ece.before <= 1
    out = capsys.readouterr().out
    assert "calibration error (ECE, 15 bins) on test" in out
    assert f'served score picked on validation + pseudo-OOD: {{"score": "{served}"' in out
    assert (run_dir / "export" / "tiny-1-reliability.png").stat().st_size > 10_000
    # A second export of the same version is refused and overwrites nothing.
    before = (models / "tiny" / "1" / "manifest.json").read_text()
    assert main([*args, "--version", "1"]) == 2
    assert "already exists" in capsys.readouterr().err
    assert (models / "tiny" / "1" / "manifest.json").read_text() == before


@pytest.mark.parametrize(
    "args, message",
    [
        (["train", "--arch", "vgg99"], "unknown architecture 'vgg99'"),
        (["train", "--head", "arcface"], "unknown head 'arcface'"),
        (["train", "--data-dir", "/nonexistent/fmnist"], "apt-get install dataset-fashion-mnist"),
        (["export", "/nonexistent/run"], "train first"),
        (["reproduce", "--heads", "softmax,bogus"], "unknown head"),
    ],
)
def test_bad_input_gets_a_clear_error(args, message, tmp_path, capsys):
    assert main([*args, "--out", str(tmp_path / "o")] if args[0] == "train" else args) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o" / "last.pt").exists()
