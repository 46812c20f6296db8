"""A stand-in bundle with the default model's shape and cost, for benchmarks without a trained one.

Same graph as training's `smallcnn` + IsoMax+ head exported (BatchNorm folded into the convs
and the feature layer): five 3x3 convs 32 | 32-64 | 64-64 with max-pooling after the first and
third, flattened 64x7x7 -> a 128-d feature layer with ReLU, then logits = -|d_s| * |f^ - p^_k|
and min_distance (0.50M parameters). Weights are random (He init), so the answers are
meaningless but the cost per image (~10M multiply-adds) is the real model's. Built with
onnx.helper: no torch.

    python bench/standin_model.py OUT_MODELS_DIR    # writes OUT/fmnist-standin/1/
"""

from __future__ import annotations

import argparse
import sys
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from isomax.contract.manifest import (
    Calibration,
    Manifest,
    OnnxSpec,
    Preprocess,
    QuantilePoint,
    sha256_file,
)

LABELS = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip
OPSET = 17


def smallcnn_graph(seed: int = 0, with_distance: bool = True) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    inits: list[onnx.TensorProto] = []
    nodes: list[onnx.NodeProto] = []

    def const(name: str, value: np.ndarray) -> str:
        inits.append(numpy_helper.from_array(value.astype(np.float32), name))
        return name

    x = "image"
    nodes.append(helper.make_node("Sub", [x, const("mean", np.array(0.2860))], ["centered"]))
    nodes.append(helper.make_node("Div", ["centered", const("std", np.array(0.3530))], ["normed"]))
    x = "normed"
    layers: list[tuple[int, int] | str] = [
        (1, 32),
        "pool",
        (32, 32),
        (32, 64),
        "pool",
        (64, 64),
        (64, 64),
    ]
    for i, layer in enumerate(layers):
        if layer == "pool":
            nodes.append(
                helper.make_node("MaxPool", [x], [f"pool{i}"], kernel_shape=[2, 2], strides=[2, 2])
            )
            x = f"pool{i}"
            continue
        cin, cout = layer  # type: ignore[misc]
        w = rng.standard_normal((cout, cin, 3, 3)) * np.sqrt(2.0 / (cin * 9))
        b = rng.standard_normal(cout) * 0.01
        nodes.append(
            helper.make_node(
                "Conv", [x, const(f"w{i}", w), const(f"b{i}", b)], [f"conv{i}"], pads=[1, 1, 1, 1]
            )
        )
        nodes.append(helper.make_node("Relu", [f"conv{i}"], [f"relu{i}"]))
        x = f"relu{i}"
    nodes.append(helper.make_node("Flatten", [x], ["flat"], axis=1))  # (N, 64 * 7 * 7)
    w = rng.standard_normal((64 * 7 * 7, 128)) * np.sqrt(2.0 / (64 * 7 * 7))
    nodes += [
        helper.make_node("MatMul", ["flat", const("w_feat", w)], ["feat_lin"]),
        helper.make_node(
            "Add", ["feat_lin", const("b_feat", rng.standard_normal(128) * 0.01)], ["feat_pre"]
        ),
        helper.make_node("Relu", ["feat_pre"], ["feat"]),
    ]
    protos = rng.standard_normal((len(LABELS), 128))
    protos /= np.linalg.norm(protos, axis=1, keepdims=True)
    nodes += [
        helper.make_node("LpNormalization", ["feat"], ["unit"], axis=1, p=2),
        helper.make_node("MatMul", ["unit", const("P_T", protos.T.copy())], ["cos"]),
        helper.make_node("Mul", ["cos", const("minus_two", np.array(-2.0))], ["m2cos"]),
        helper.make_node("Add", ["m2cos", const("two", np.array(2.0))], ["sq"]),
        helper.make_node("Max", ["sq", const("zero", np.array(0.0))], ["sq_pos"]),
        helper.make_node("Sqrt", ["sq_pos"], ["dist"]),
        helper.make_node("Mul", ["dist", const("minus_ds", np.array(-10.0))], ["logits"]),
    ]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", len(LABELS)])]
    if with_distance:
        nodes.append(
            helper.make_node("ReduceMin", ["dist"], ["min_distance"], axes=[1], keepdims=0)
        )
        outputs.append(helper.make_tensor_value_info("min_distance", TensorProto.FLOAT, ["N"]))
    graph = helper.make_graph(
        nodes,
        "smallcnn_isomaxplus_standin",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 1, 28, 28])],
        outputs,
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def write_standin(models_dir: Path, name: str = "fmnist-standin", version: str = "1") -> Path:
    bundle = Path(models_dir) / name / version
    bundle.mkdir(parents=True, exist_ok=True)
    onnx.save(smallcnn_graph(), str(bundle / "model.onnx"))
    sess = ort.InferenceSession(str(bundle / "model.onnx"), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(1).random((512, 1, 28, 28), dtype=np.float32)
    (dist,) = sess.run(["min_distance"], {"image": x})
    qs = [round(q, 3) for q in np.linspace(0.5, 0.99, 50)]
    values = np.maximum.accumulate(np.quantile(dist.astype(np.float64), qs))
    Manifest(
        name=name,
        version=version,
        created=datetime.now(UTC),
        description="benchmark stand-in: smallcnn + IsoMax+ shape, random weights",
        onnx=OnnxSpec(sha256=sha256_file(bundle / "model.onnx"), opset=OPSET),
        preprocess=Preprocess(
            height=28, width=28, channels=1, color_mode="L", mean=(0.2860,), std=(0.3530,)
        ),
        labels=LABELS,
        training={"architecture": "smallcnn", "loss": "isomaxplus", "note": "random weights"},
        calibration=Calibration(
            split="random",
            size=len(x),
            target_tpr=0.95,
            threshold=float(np.quantile(dist, 0.95)),
            quantiles=tuple(
                QuantilePoint(q=q, value=float(v)) for q, v in zip(qs, values, strict=True)
            ),
        ),
    ).write(bundle)
    return bundle


if __name__ == "__main__":
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("models_dir", type=Path)
    print(write_standin(ap.parse_args().models_dir))
