"""What `isomax export` tells a user: our lines without third-party noise, and true numbers."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.training.test_export_failure import _export
from training.cli import threshold_summary
from training.evaluate import markdown_table
from training.export import OnnxPredictor

ROOT = Path(__file__).resolve().parents[2]

LOG_LINES = """
import logging
from training.cli import configure_logging
configure_logging({verbose})
noisy = logging.getLogger("onnxscript.optimizer")
noisy.setLevel(logging.INFO)  # a library that sets its own level: the root level cannot hide it
noisy.info("Replaced initializer x")
logging.getLogger("onnx_ir.passes").info("Removed 62 unused nodes")
logging.getLogger("onnxscript").warning("a third-party warning")
logging.getLogger("training.export").info("ONNX parity: ours")
"""


def _log(verbose: bool) -> str:
    proc = subprocess.run(
        [sys.executable, "-c", LOG_LINES.format(verbose=verbose)],
        cwd=ROOT,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return proc.stderr


def test_third_party_info_is_quiet_by_default_and_back_with_verbose() -> None:
    quiet = _log(False)
    assert "ONNX parity: ours" in quiet and "a third-party warning" in quiet
    assert "Replaced initializer" not in quiet and "unused nodes" not in quiet
    loud = _log(True)
    assert "Replaced initializer" in loud and "unused nodes" in loud


def test_no_ood_table_without_an_ood_set() -> None:
    report = {"scores": ["mds"], "ood": {}, "accuracy": {"test": 0.5}}
    text = markdown_table(report)
    assert "| OOD set" not in text and "No OOD set was scored" in text
    report["ood"] = {"other": {"mds": {"auroc": 0.9, "tnr_at_tpr95": 0.5}}}
    assert "| other | 90.0 | 50.0 |" in markdown_table(report)


def test_small_calibration_split_summary_is_true(tmp_path: Path, caplog) -> None:
    images = np.random.default_rng(1).integers(0, 256, (19, 1, 8, 8), dtype=np.uint8)
    with caplog.at_level(logging.INFO, logger="training.export"):
        bundle = _export(tmp_path, images)
    _, dist = OnnxPredictor(bundle / "model.onnx")(images)
    from isomax.contract.manifest import Manifest

    cal = Manifest.read(bundle).calibration
    kept = int(np.sum(dist <= cal.threshold))
    assert kept == 19  # 95% of 19 images is 18.05: the threshold keeps all of them
    (line,) = [r.getMessage() for r in caplog.records if "wrote bundle" in r.getMessage()]
    assert f"keeps {kept} of 19 validation images (100.0%, target 95%)" in line
    summary = threshold_summary(bundle)
    assert summary.startswith("thresholds: every class uses the global threshold")
    assert "fewer than 50 validation images" in summary
    assert cal.per_class is not None
    for label, c in zip(("a", "b", "c"), cal.per_class, strict=True):
        assert f"{label} ({c.size})" in summary


@pytest.mark.parametrize("pooled", [(), ("b",)])
def test_summary_names_only_the_classes_that_fall_back(tmp_path: Path, pooled) -> None:
    from isomax.contract.manifest import Manifest

    images = np.random.default_rng(2).integers(0, 256, (40, 1, 8, 8), dtype=np.uint8)
    bundle = _export(tmp_path, images)
    m = Manifest.read(bundle)
    assert m.calibration.per_class is not None
    per_class = tuple(
        c.model_copy(update={"pooled": label in pooled})
        for label, c in zip(m.labels, m.calibration.per_class, strict=True)
    )
    cal = m.calibration.model_copy(update={"per_class": per_class})
    m.model_copy(update={"calibration": cal}).write(bundle)
    summary = threshold_summary(bundle)
    if pooled:
        assert "1 of 3 classes use the global threshold" in summary and "b (" in summary
        assert "a (" not in summary
    else:
        assert "every class has its own" in summary


def test_ood_table_shows_the_served_score_beside_the_models_own() -> None:
    """A bundle serving Mahalanobis is scored under `mahalanobis` and `mahalanobis_class` too;
    the printed table must carry them, not only the model's own scores."""
    cell = {"auroc": 0.9, "tnr_at_tpr95": 0.5}
    served = {"auroc": 0.99, "tnr_at_tpr95": 0.97}
    report = {
        "scores": ["mds"],
        "accuracy": {"test": 0.9},
        "ood": {"mnist": {"mds": cell, "mahalanobis": served, "mahalanobis_class": served}},
    }
    head, _, row = markdown_table(report).splitlines()[2:5]
    assert "MAHALANOBIS auroc" in head and "MAHALANOBIS_CLASS tnr_at_tpr95" in head
    assert row == "| mnist | 90.0 | 50.0 | 99.0 | 97.0 | 99.0 | 97.0 |"
