"""Export: ONNX parity with torch, bundles the manifest schema accepts, and nothing overwritten."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from isomax.contract.manifest import Manifest, Preprocess, sha256_file
from training.export import (
    BundleSpec,
    CalibrationSet,
    GraphSpec,
    OnnxPredictor,
    ParityError,
    ServingGraph,
    check_parity,
    export_bundle,
    export_onnx,
)
from training.head import IsoMaxPlusHead
from training.loss import IsoMaxPlusLoss

SPEC = Preprocess(height=8, width=8, channels=1, color_mode="L")


class UserNet(nn.Module):
    """A model the project does not define: its last nn.Linear swapped for IsoMaxPlusHead."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(256, 16), nn.ReLU()
        )
        self.fc = IsoMaxPlusHead(16, 3)

    def forward(self, x):
        return self.fc(self.body(x))


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (64, 1, 8, 8), dtype=np.uint8)


@pytest.fixture(scope="module")
def trained(images) -> UserNet:
    torch.manual_seed(0)
    net = UserNet()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    x = torch.from_numpy(images).float() / 255
    y = torch.from_numpy(images.reshape(64, -1).mean(1) > 127).long() + (torch.arange(64) % 2)
    for _ in range(5):
        opt.zero_grad()
        IsoMaxPlusLoss()(net(x), y).backward()
        opt.step()
    return net.eval()


@pytest.fixture(scope="module")
def bundle(tmp_path_factory, trained, images):
    models = tmp_path_factory.mktemp("models")
    path = export_bundle(
        trained,
        BundleSpec("user-net", ["a", "b", "c"], SPEC, models_dir=models, training={"note": "test"}),
        CalibrationSet(images),
        GraphSpec(mean=[0.5], std=[0.25]),
    )
    return path


def test_bundle_layout_and_manifest(bundle):
    assert bundle.name == "1" and bundle.parent.name == "user-net"
    assert sorted(p.name for p in bundle.iterdir()) == ["manifest.json", "model.onnx"]
    m = Manifest.read(bundle)
    assert m.onnx.sha256 == sha256_file(bundle / "model.onnx")
    assert m.labels == ("a", "b", "c")
    assert m.calibration.size == 64 and m.calibration.target_tpr == 0.95
    assert m.training == {"note": "test"}


def test_graph_contract(bundle):
    g = onnx.load(str(bundle / "model.onnx"))
    assert [i.name for i in g.graph.input] == ["image"]
    assert [o.name for o in g.graph.output] == ["logits", "min_distance"]
    assert g.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # dynamic batch
    assert not any(
        t.data_location == onnx.TensorProto.EXTERNAL for t in g.graph.initializer
    )  # one file


@pytest.mark.parametrize("n", [1, 7, 33])
def test_onnx_matches_torch_with_normalization_inside(bundle, trained, images, n):
    z, d = OnnxPredictor(bundle / "model.onnx")(images[:n])
    x = (torch.from_numpy(images[:n]).float() / 255 - 0.5) / 0.25
    with torch.no_grad():
        tz = trained(x)
        td = trained.fc.distances(trained.body(x)).min(1).values
    assert z.shape == (n, 3) and d.shape == (n,)
    assert np.abs(z - tz.numpy()).max() <= 1e-4
    assert np.abs(d - td.numpy()).max() <= 1e-4
    assert np.array_equal(
        z.argmax(1), np.argmin(trained.fc.distances(trained.body(x)).detach().numpy(), 1)
    )


def test_calibrated_threshold_keeps_target_on_calibration_split(bundle, images):
    m = Manifest.read(bundle)
    _, d = OnnxPredictor(bundle / "model.onnx")(images)
    kept = float((d <= m.calibration.threshold).mean())
    assert 0.95 <= kept <= 0.95 + 1 / len(images) + 1e-9


def test_existing_bundle_is_never_overwritten(bundle, trained, images):
    before = (bundle / "model.onnx").read_bytes()
    with pytest.raises(FileExistsError, match="already exists"):
        export_bundle(
            trained,
            BundleSpec("user-net", ["a", "b", "c"], SPEC, bundle.parent.parent, version="1"),
            CalibrationSet(images),
        )
    assert (bundle / "model.onnx").read_bytes() == before
    assert sorted(p.name for p in bundle.parent.iterdir()) == ["1"]  # no temp dir left


def test_parity_failure_refuses_and_leaves_nothing(tmp_path, trained, images):
    graph = ServingGraph(trained, [0.5], [0.25])
    export_onnx(graph, tmp_path / "m.onnx", torch.rand(2, 1, 8, 8))
    check_parity(graph, tmp_path / "m.onnx", images)  # passes as exported
    with torch.no_grad():
        trained_copy = UserNet()
        trained_copy.load_state_dict(trained.state_dict())
        trained_copy.fc.prototypes.add_(0.5)  # torch now differs from the file
    with pytest.raises(ParityError, match="differ"):
        check_parity(ServingGraph(trained_copy, [0.5], [0.25]), tmp_path / "m.onnx", images)


def test_models_without_a_distance_head_are_refused(tmp_path, images):
    with pytest.raises(ValueError, match="IsoMaxPlusHead"):
        export_bundle(
            nn.Sequential(nn.Flatten(), nn.Linear(64, 3)),
            BundleSpec("lin", ["a", "b", "c"], SPEC, models_dir=tmp_path),
            CalibrationSet(images),
        )
    assert not (tmp_path / "lin" / "1").exists()


def test_label_count_mismatch_is_refused(tmp_path, trained, images):
    with pytest.raises(ValueError, match="3 logits but 2 labels"):
        export_bundle(
            trained,
            BundleSpec("bad", ["a", "b"], SPEC, models_dir=tmp_path),
            CalibrationSet(images),
        )
    assert not (tmp_path / "bad").exists()  # no temp dir, and no empty models/<name>/ either


def test_manifest_records_the_normalization_inside_the_graph(bundle, tmp_path, images):
    """The preprocess passed in said mean 0 / std 1; the graph normalizes with 0.5 / 0.25, and
    the manifest must say what the graph does. A model that normalizes itself (mean/std
    buffers, like training's Classifier) is read the same way."""
    assert SPEC.mean == (0.0,) and SPEC.std == (1.0,)
    m = Manifest.read(bundle)
    assert m.preprocess.mean == (0.5,) and m.preprocess.std == (0.25,)

    from training.models import build_model

    torch.manual_seed(0)
    model = build_model("smallcnn", "isomaxplus", 3, 1, [0.3], [0.2], image_size=8)
    path = export_bundle(
        model.eval(),
        BundleSpec("self-normalizing", ["a", "b", "c"], SPEC, models_dir=tmp_path),
        CalibrationSet(images),
    )
    pre = Manifest.read(path).preprocess
    assert pre.mean == pytest.approx((0.3,)) and pre.std == pytest.approx((0.2,))
