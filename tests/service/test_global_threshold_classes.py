"""`/models` says which classes the global threshold judges (too few validation images)."""

from __future__ import annotations

from pathlib import Path

from isomax.contract.manifest import Manifest
from tests.service.bundles import LABELS, write_bundle
from tests.service.conftest import app_client, wait_ready


def _pool(bundle: Path, classes: set[int]) -> Manifest:
    """Rewrite the manifest as calibrate() does for classes with too few validation images."""
    m = Manifest.read(bundle)
    cal = m.calibration
    assert cal.per_class is not None
    per_class = tuple(
        c.model_copy(
            update={"pooled": True, "threshold": cal.threshold, "quantiles": cal.quantiles}
        )
        if i in classes
        else c
        for i, c in enumerate(cal.per_class)
    )
    m = m.model_copy(
        update={
            "calibration": cal.model_copy(update={"per_class": per_class, "min_class_size": 50})
        }
    )
    m.write(bundle)
    return Manifest.read(bundle)  # still valid


def _info(models_dir: Path, **settings: object) -> dict:
    with app_client(models_dir=models_dir, **settings) as c:
        wait_ready(c)
        (info,) = c.get("/models").json()["models"]
    return info


def test_pooled_classes_are_listed_and_the_rest_have_their_own(tmp_path: Path) -> None:
    _pool(write_bundle(tmp_path, "tiny", "1", class_thresholds=True), {1, 3})
    info = _info(tmp_path)
    assert info["global_threshold_classes"] == [LABELS[1], LABELS[3]]
    assert info["calibration"]["min_class_size"] == 50
    for label in (LABELS[1], LABELS[3]):
        assert info["class_thresholds"][label] == info["threshold"]


def test_every_class_uses_the_global_threshold_without_class_thresholds(tmp_path: Path) -> None:
    write_bundle(tmp_path / "a", "tiny", "1", class_thresholds=True)
    off = _info(tmp_path / "a", class_thresholds=False)
    assert off["class_thresholds"] is None and off["global_threshold_classes"] == list(LABELS)
    write_bundle(tmp_path / "b", "tiny", "1")
    plain = _info(tmp_path / "b")
    assert plain["global_threshold_classes"] == list(LABELS)
    assert plain["calibration"]["min_class_size"] is None
    own = _info(tmp_path / "a")
    assert own["global_threshold_classes"] == []
