"""A failed export leaves nothing behind: no temp dir, no empty `models/<name>/`.

An empty `models/<name>/` is not harmless: the service scans it as a model without a
version. The failure here is the one users met: metrics the manifest refuses.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from pydantic import ValidationError
from torch import nn

from isomax.contract.manifest import EvaluationMetrics, Preprocess
from training.export import BundleSpec, CalibrationSet, OnnxPredictor, export_bundle
from training.head import IsoMaxPlusHead

SPEC = Preprocess(height=8, width=8, channels=1, color_mode="L")


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 8), nn.ReLU(), IsoMaxPlusHead(8, 3)).eval()


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (32, 1, 8, 8), dtype=np.uint8)


def _refused_metrics(predictor: OnnxPredictor, cal: object) -> EvaluationMetrics:
    ood = {"auroc": 1.0, "tnr_at_tpr95": 1.0, "dtacc": 1.0, "aupr_in": 1.0}
    return EvaluationMetrics.model_validate(
        {"ood": {"other": {"mds": {**ood, "aupr_out": 1.0000000000000002}}}}
    )


def _export(models: Path, images: np.ndarray, **kw) -> Path:
    return export_bundle(
        _net(),
        BundleSpec("photos", ["a", "b", "c"], SPEC, models_dir=models),
        CalibrationSet(images),
        **kw,
    )


def test_failed_first_export_leaves_no_model_directory(tmp_path: Path, images) -> None:
    models = tmp_path / "models"
    models.mkdir()
    with pytest.raises(ValidationError, match="aupr_out"):
        _export(models, images, evaluate=_refused_metrics)
    assert list(models.iterdir()) == []


def test_failed_export_removes_the_models_directory_it_created(tmp_path: Path, images) -> None:
    with pytest.raises(ValidationError):
        _export(tmp_path / "new" / "models", images, evaluate=_refused_metrics)
    assert list(tmp_path.iterdir()) == []


def test_failed_next_version_keeps_the_existing_ones(tmp_path: Path, images) -> None:
    first = _export(tmp_path, images)
    with pytest.raises(ValidationError):
        _export(tmp_path, images, evaluate=_refused_metrics)
    assert sorted(p.name for p in (tmp_path / "photos").iterdir()) == [first.name]
    assert sorted(p.name for p in first.iterdir()) == ["manifest.json", "model.onnx"]
