"""Served scores: each one in the exported graph (ONNX vs torch vs numpy), calibrated the right
way round, judged by the one verdict rule, and served by the real service (/classify and v2)."""

from __future__ import annotations

import base64
import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from isomax.contract.decode import graph_input
from isomax.contract.manifest import Manifest, Preprocess
from isomax.contract.verdict import SERVED_SCORES, Thresholds
from service.app import create_app
from service.settings import Settings
from tests.service.bundles import png_bytes
from tests.service.conftest import wait_ready
from training.export import (
    BundleSpec,
    CalibrationSet,
    GraphSpec,
    OnnxPredictor,
    ServingGraph,
    export_bundle,
)
from training.loss import DisMaxLoss
from training.mahalanobis import extract_features, fit_mahalanobis
from training.models import build_model
from training.scores import entropic, mmles

SPEC = Preprocess(height=28, width=28, channels=1, color_mode="L")
LABELS = ("a", "b", "c")


def _data(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Three classes of images: bright left half, bright right half, bright centre."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 3
    x = rng.integers(0, 60, (n, 1, 28, 28)).astype(np.int64)
    x[y == 0, :, :, :14] += 150
    x[y == 1, :, :, 14:] += 150
    x[y == 2, :, 7:21, 7:21] += 150
    return np.clip(x, 0, 255).astype(np.uint8), y


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    torch.manual_seed(0)
    net = build_model("smallcnn", "dismax", 3, 1, [0.2], [0.3])
    x, y = _data(192, 0)
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    loss_fn = DisMaxLoss()
    for step in range(12):
        i = slice(64 * (step % 3), 64 * (step % 3 + 1))
        xb, tb = loss_fn.prepare(torch.from_numpy(x[i]).float() / 255, torch.from_numpy(y[i]), 3)
        opt.zero_grad()
        loss_fn(net(xb), tb).backward()
        opt.step()
    return net.eval()


@pytest.fixture(scope="module")
def fit(model):
    x, y = _data(300, 1)
    return fit_mahalanobis(extract_features(model, x), y, 3)


@pytest.fixture(scope="module")
def bundles(tmp_path_factory, model, fit) -> Path:
    """models/s-<score>/1 for every served score, calibrated on the same validation images."""
    root = tmp_path_factory.mktemp("models")
    val_x, val_y = _data(240, 2)
    for score in SERVED_SCORES:
        export_bundle(
            model,
            BundleSpec(f"s-{score.replace('_', '-')}", LABELS, SPEC, models_dir=root, version="1"),
            CalibrationSet(val_x, labels=val_y),
            GraphSpec(score=score, mahalanobis=fit if score == "mahalanobis" else None),
        )
    return root


def _bundle(root: Path, score: str) -> Path:
    return root / f"s-{score.replace('_', '-')}" / "1"


@pytest.mark.parametrize("score", list(SERVED_SCORES))
def test_each_served_score_onnx_equals_torch_and_numpy(bundles, model, fit, score):
    path = _bundle(bundles, score)
    m = Manifest.read(path)
    assert (m.calibration.score, m.calibration.in_distribution) == (score, SERVED_SCORES[score])
    x = graph_input(_data(37, 3)[0])
    out = OnnxPredictor(path / "model.onnx").outputs(x)
    graph = ServingGraph(model, score=score, mahalanobis=fit if score == "mahalanobis" else None)
    with torch.no_grad():
        want = dict(
            zip(
                graph.output_names,
                (t.numpy() for t in graph.eval()(torch.from_numpy(x))),
                strict=True,
            )
        )
    assert list(out) == list(graph.output_names)
    for name, value in want.items():
        tol = 1e-4 * max(1.0, float(np.abs(value).max())) if name == "mahalanobis" else 1e-4
        np.testing.assert_allclose(out[name], value, atol=tol, err_msg=name)
    served = out[score]
    reference = {
        "min_distance": out["min_distance"],
        "entropic": entropic(out["logits"]),
        "mmles": mmles(out["logits"]),
        "mahalanobis": fit.score(extract_features(model, x)),
    }[score]
    np.testing.assert_allclose(served, reference, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("score", list(SERVED_SCORES))
def test_class_thresholds_keep_the_target_either_way_round(bundles, score):
    path = _bundle(bundles, score)
    cal = Manifest.read(path).calibration
    val_x, _ = _data(240, 2)
    out = OnnxPredictor(path / "model.onnx").outputs(val_x)
    served, predicted = out[score], out["logits"].argmax(1)
    thresholds = Thresholds.lookup(cal)
    assert thresholds.in_distribution == SERVED_SCORES[score]
    flags = np.array(thresholds.judge(predicted.tolist(), served.tolist())[1])
    assert 1 - flags.mean() >= cal.target_tpr  # at least the target of validation kept
    assert 1 - flags.mean() < cal.target_tpr + 0.03  # and not much more (ties aside)
    t = np.array(thresholds.per_class)
    if SERVED_SCORES[score] == "higher":  # is_ood when the score is below its class threshold
        np.testing.assert_array_equal(flags, served < t[predicted])
        values = [p.value for p in cal.quantiles]
        assert values == sorted(values, reverse=True)  # keeping more: a lower threshold
    else:
        np.testing.assert_array_equal(flags, served > t[predicted])
        values = [p.value for p in cal.quantiles]
        assert values == sorted(values)


@pytest.fixture(scope="module")
def client(bundles) -> Iterator[TestClient]:
    app = create_app(Settings(models_dir=bundles, max_wait_ms=1))
    with TestClient(app) as c:
        wait_ready(c)
        yield c


@pytest.mark.parametrize("score", ["mmles", "mahalanobis", "entropic"])
def test_service_serves_the_named_score(client, bundles, score):
    path = _bundle(bundles, score)
    images = _data(5, 4)[0]
    images[4] = np.random.default_rng(0).integers(0, 256, (1, 28, 28))  # unlike the classes
    files = [png_bytes(im[0]) for im in images]
    out = OnnxPredictor(path / "model.onnx").outputs(images)
    rows = []
    for f in files:
        r = client.post(f"/classify?model={path.parent.name}", content=f,
                        headers={"content-type": "image/png"})  # fmt: skip
        assert r.status_code == 200, r.text
        rows.extend(r.json()["results"])
    np.testing.assert_allclose([r["score"] for r in rows], out[score], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose([r["min_distance"] for r in rows], out["min_distance"], atol=1e-6)
    higher = SERVED_SCORES[score] == "higher"
    for r in rows:
        assert r["is_ood"] == (
            r["score"] < r["threshold"] if higher else r["score"] > r["threshold"]
        )
    body = {"inputs": [{"name": "image_bytes", "datatype": "BYTES", "shape": [len(files)],
                        "data": [base64.b64encode(f).decode() for f in files]}]}  # fmt: skip
    v2 = client.post(f"/v2/models/{path.parent.name}/infer", json=body)
    assert v2.status_code == 200, v2.text
    outputs = {o["name"]: o["data"] for o in v2.json()["outputs"]}
    np.testing.assert_allclose(outputs[score], [r["score"] for r in rows], rtol=1e-6)
    assert outputs["is_ood"] == [r["is_ood"] for r in rows]


def test_min_distance_bundle_answers_without_a_score_field(client, bundles):
    f = png_bytes(_data(1, 5)[0][0, 0])
    r = client.post("/classify?model=s-min-distance", content=f,
                    headers={"content-type": "image/png"})  # fmt: skip
    (row,) = r.json()["results"]
    assert "score" not in row and list(row)[-3:] == ["min_distance", "threshold", "is_ood"]


def test_unknown_score_is_refused_at_readiness(tmp_path, bundles):
    bad = tmp_path / "odd" / "1"
    shutil.copytree(_bundle(bundles, "mmles"), bad)
    doc = json.loads((bad / "manifest.json").read_text())
    doc["name"], doc["calibration"]["score"] = "odd", "energy_v9"
    (bad / "manifest.json").write_text(json.dumps(doc))
    shutil.copytree(_bundle(bundles, "min_distance"), tmp_path / "good" / "1")
    good = json.loads((tmp_path / "good" / "1" / "manifest.json").read_text())
    good["name"] = "good"
    (tmp_path / "good" / "1" / "manifest.json").write_text(json.dumps(good))
    with TestClient(create_app(Settings(models_dir=tmp_path))) as c:
        c.app.service.registry.wait_loaded(30)  # type: ignore[attr-defined]
        ready = c.get("/readyz")
        assert ready.status_code == 503
        assert ready.json()["models"]["good"]["status"] == "ready"
        detail = ready.json()["models"]["odd"]["detail"]
        assert "'energy_v9', a score this service does not know" in detail
        assert "mahalanobis" in detail and "min_distance" in detail  # the ones it knows
