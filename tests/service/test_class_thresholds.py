"""Class thresholds: each image is judged against the threshold of its predicted class."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from isomax.contract.manifest import Manifest
from tests.service.bundles import sample_images, write_bundle
from tests.service.conftest import app_client, wait_ready
from tests.service.expected import assert_results_equal, expected_results

IMAGES = sample_images()


@pytest.fixture(scope="module")
def per_class_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("per-class")
    write_bundle(root, "tiny", "1", seed=0, class_thresholds=True)
    return root


def _files(images: list[tuple[str, bytes]]) -> list[tuple[str, tuple[str, bytes, str]]]:
    return [("file", (name, data, "image/png")) for name, data in images]


def test_each_image_gets_its_predicted_class_threshold(per_class_dir: Path) -> None:
    bundle = per_class_dir / "tiny/1"
    cal = Manifest.read(bundle).calibration
    per_class = cal.class_thresholds_for(cal.target_tpr)
    assert per_class is not None and len(set(per_class)) == len(per_class)
    with app_client(models_dir=per_class_dir) as c:
        wait_ready(c)
        got = c.post("/classify", files=_files(IMAGES)).json()["results"]
    assert_results_equal(got, expected_results(bundle, IMAGES))
    for r in got:
        assert r["threshold"] == per_class[r["class_index"]]
        assert r["is_ood"] == (r["min_distance"] > r["threshold"])
    assert len({r["threshold"] for r in got}) > 1  # several classes, several thresholds


def test_models_and_metrics_show_the_class_thresholds(per_class_dir: Path) -> None:
    manifest = Manifest.read(per_class_dir / "tiny/1")
    want = manifest.calibration.class_thresholds_for(0.9)
    assert want is not None
    with app_client(models_dir=per_class_dir, target_tpr={"tiny": 0.9}) as c:
        wait_ready(c)
        (info,) = c.get("/models").json()["models"]
        assert info["class_thresholds"] == dict(zip(manifest.labels, want, strict=True))
        assert info["calibration"]["per_class"] is True
        registry = c.app.service.metrics.registry  # type: ignore[attr-defined]
        for label, t in zip(manifest.labels, want, strict=True):
            sample = registry.get_sample_value(
                "isomax_ood_class_threshold", {"model": "tiny", "label": label}
            )
            assert sample == pytest.approx(t)
        got = c.post("/classify", files=_files(IMAGES)).json()["results"]
        assert all(r["threshold"] == want[r["class_index"]] for r in got)


def test_class_thresholds_can_be_switched_off(per_class_dir: Path) -> None:
    bundle = per_class_dir / "tiny/1"
    with app_client(models_dir=per_class_dir, class_thresholds=False) as c:
        wait_ready(c)
        got = c.post("/classify", files=_files(IMAGES)).json()["results"]
        (info,) = c.get("/models").json()["models"]
    assert_results_equal(got, expected_results(bundle, IMAGES, class_thresholds=False))
    assert {r["threshold"] for r in got} == {Manifest.read(bundle).calibration.threshold}
    assert info["class_thresholds"] is None


def test_a_bundle_whose_class_thresholds_miss_labels_is_not_served(tmp_path: Path) -> None:
    bundle = write_bundle(tmp_path, "tiny", "1", class_thresholds=True)
    data = json.loads((bundle / "manifest.json").read_text())
    data["labels"] = data["labels"][:-1]
    (bundle / "manifest.json").write_text(json.dumps(data))
    with app_client(models_dir=tmp_path) as c:
        deadline = time.monotonic() + 30
        while (info := c.get("/models").json()["models"][0])["status"] == "loading":
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert info["status"] == "failed"
        assert "per_class has 10 entries for 9 labels" in info["error"]
        assert c.get("/readyz").status_code == 503
