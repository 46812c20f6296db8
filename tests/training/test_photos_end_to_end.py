"""Bring your own images, end to end: a folder of real photographs -> fine-tune the pretrained
EfficientNet-Lite0 with the IsoMax+ head -> export -> a real `isomax serve` -> POST JPEGs.

In-distribution photos must get their class; photos of kinds never trained on must be flagged
far more often. Small on purpose (64 px, 80 training images, 2 epochs, batch 16) so it fits CI;
otherwise it is the README's short command, the fine-tuning recipe being the default for
pretrained weights. The run's record shows the frozen backbone's figures beside its own.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest

from isomax.contract.manifest import Manifest
from tests import harness
from training.cli import main
from training.data.sample_photos import ID_PHOTOS, make_photo_folder
from training.models.pretrained import LITE_MEAN, LITE_STD
from training.pseudo_ood import BASELINE_SETS

pytestmark = [pytest.mark.slow, pytest.mark.e2e]


def test_fine_tune_export_serve_classify(tmp_path: Path) -> None:
    data = make_photo_folder(tmp_path / "photos", train=16, val=8, test=6, ood=4, seed=0)
    run, models = tmp_path / "run", tmp_path / "models"
    train = shlex.split(
        "train --quiet --dataset folder --arch efficientnet-lite0 --weights imagenet "
        "--image-size 64 --epochs 2 --batch-size 16 --workers 1 --threads 2"
    )
    assert main([*train, "--data-dir", str(data), "--out", str(run)]) == 0
    history = [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]
    assert len(history) == 2
    _check_run_record(run)
    ood = f"other-photos={data / 'ood'}"
    export = ["export", str(run), "--models-dir", str(models), "--name", "photos"]
    assert main([*export, "--ood-folder", ood]) == 0
    manifest = Manifest.read(models / "photos" / "1")
    pre = manifest.preprocess
    assert (pre.height, pre.width, pre.resize_mode) == (64, 64, "center_crop")
    # The manifest's normalization is the one inside the graph: the backbone's own.
    assert pre.mean == pytest.approx(LITE_MEAN) and pre.std == pytest.approx(LITE_STD)
    assert manifest.labels == tuple(sorted(ID_PHOTOS))

    with harness.isomax_serve(models, tmp_path / "server.log") as server:

        def verdicts(paths: list[Path]) -> list[dict]:
            out = []
            for p in paths:
                status, body = server.post("/classify", p.read_bytes(), "image/jpeg")
                assert status == 200, body
                out.append(json.loads(body)["results"][0])
            return out

        test_paths = sorted((data / "test").rglob("*.jpg"))
        ood_paths = sorted((data / "ood").rglob("*.jpg"))
        ids = verdicts(test_paths)
        oods = verdicts(ood_paths)
    correct = sum(r["label"] == p.parent.name for r, p in zip(ids, test_paths, strict=True))
    assert correct / len(ids) >= 0.9, [
        (r["label"], p.parent.name) for r, p in zip(ids, test_paths, strict=True)
    ]
    id_flagged = sum(r["is_ood"] for r in ids) / len(ids)
    ood_flagged = sum(r["is_ood"] for r in oods) / len(oods)
    assert id_flagged <= 0.25
    assert ood_flagged >= id_flagged + 0.5, (id_flagged, ood_flagged)


def _check_run_record(run: Path) -> None:
    """summary.json: the frozen backbone's linear probe and Mahalanobis AUROC on validation vs
    every pseudo-OOD set, beside the trained model's figures on the same sets."""
    summary = json.loads((run / "summary.json").read_text())
    sets = set(BASELINE_SETS)
    assert summary["pseudo_ood"]["sets"] == list(BASELINE_SETS)
    frozen, trained = summary["frozen_backbone"], summary["trained"]
    assert 0.5 <= frozen["linear_probe_val_accuracy"] <= 1.0
    assert set(frozen["mahalanobis_auroc"]) == sets | {"mean", "min"}
    assert set(trained["mds_auroc"]) == set(trained["mahalanobis_auroc"]) == sets | {"mean", "min"}
    history = [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]
    assert trained["val_accuracy"] == pytest.approx(history[trained["epoch"] - 1]["val_accuracy"])
    for figures in (frozen["mahalanobis_auroc"], trained["mds_auroc"]):
        assert all(0.0 <= v <= 1.0 for v in figures.values())
