"""Tiny bundles for service tests, built with onnx.helper (the service never imports torch).

The graph is an IsoMax+ head on a random projection, small enough to build in milliseconds:

    image [N, C, H, W] in [0, 1] -> (x - 0.5) / 0.5 -> Flatten -> MatMul W [C*H*W, D]
      -> L2-normalize -> f;  prototypes P [K, D] L2-normalized
    D = sqrt(max(2 - 2 f.P^T, 0))      (= |f - p_k| for unit vectors), [N, K]
    logits = -ds * D,  min_distance = min_k D

Prototypes are the features of K fixed random "template" images, so a template plus a little
noise is in-distribution (small min_distance, classified as its template's class) and an
unrelated image is out-of-distribution. The calibration table comes from noisy templates.
"""

from __future__ import annotations

import io
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper
from PIL import Image

from isomax.contract.manifest import (
    Calibration,
    ClassCalibration,
    EvaluationMetrics,
    Manifest,
    OnnxSpec,
    OODMetrics,
    Preprocess,
    QuantilePoint,
    sha256_file,
)

LABELS = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip
DS = 10.0  # |d_s| of the head: logits = -DS * distance
OPSET = 17


def templates(k: int = 10, channels: int = 1, size: int = 28, seed: int = 0) -> np.ndarray:
    """K fixed uint8 images [K, C, H, W]: the 'classes' of the tiny model."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (k, channels, size, size), dtype=np.uint8)


def noisy(template: np.ndarray, rng: np.random.Generator, noise: float = 25.0) -> np.ndarray:
    """An in-distribution-like uint8 image: a template plus Gaussian noise."""
    x = template.astype(np.float64) + rng.normal(0.0, noise, template.shape)
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def tiny_graph(
    *,
    channels: int = 1,
    size: int = 28,
    num_classes: int = 10,
    dim: int = 16,
    seed: int = 0,
    with_distance: bool = True,
) -> onnx.ModelProto:
    rng = np.random.default_rng(seed + 1)
    n_in = channels * size * size
    w = (rng.standard_normal((n_in, dim)) / np.sqrt(n_in)).astype(np.float32)
    t = templates(num_classes, channels, size, seed).reshape(num_classes, n_in)
    feats = ((t.astype(np.float32) / 255.0 - 0.5) / 0.5) @ w
    protos = feats / np.linalg.norm(feats, axis=1, keepdims=True)

    inits = [
        numpy_helper.from_array(np.array(0.5, np.float32), "half"),
        numpy_helper.from_array(w, "W"),
        numpy_helper.from_array(protos.T.astype(np.float32).copy(), "P_T"),
        numpy_helper.from_array(np.array(-2.0, np.float32), "minus_two"),
        numpy_helper.from_array(np.array(2.0, np.float32), "two"),
        numpy_helper.from_array(np.array(0.0, np.float32), "zero"),
        numpy_helper.from_array(np.array(-DS, np.float32), "minus_ds"),
    ]
    nodes = [
        helper.make_node("Sub", ["image", "half"], ["centered"]),
        helper.make_node("Div", ["centered", "half"], ["normed"]),
        helper.make_node("Flatten", ["normed"], ["flat"], axis=1),
        helper.make_node("MatMul", ["flat", "W"], ["feat"]),
        helper.make_node("LpNormalization", ["feat"], ["unit"], axis=1, p=2),
        helper.make_node("MatMul", ["unit", "P_T"], ["cos"]),
        helper.make_node("Mul", ["cos", "minus_two"], ["m2cos"]),
        helper.make_node("Add", ["m2cos", "two"], ["sq"]),
        helper.make_node("Max", ["sq", "zero"], ["sq_pos"]),
        helper.make_node("Sqrt", ["sq_pos"], ["dist"]),
        helper.make_node("Mul", ["dist", "minus_ds"], ["logits"]),
    ]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", num_classes])]
    if with_distance:
        nodes.append(
            helper.make_node("ReduceMin", ["dist"], ["min_distance"], axes=[1], keepdims=0)
        )
        outputs.append(helper.make_tensor_value_info("min_distance", TensorProto.FLOAT, ["N"]))
    graph = helper.make_graph(
        nodes,
        "tiny_isomaxplus",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", channels, size, size])],
        outputs,
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def run_graph(model_path: Path, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Direct onnxruntime run: the reference the service's answers are compared with."""
    sess = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    logits, dist = sess.run(["logits", "min_distance"], {"image": x})
    return logits, dist


def write_bundle(
    root: Path,
    name: str = "tiny",
    version: str = "1",
    *,
    channels: int = 1,
    target_tpr: float = 0.95,
    seed: int = 0,
    labels: tuple[str, ...] = LABELS,
    class_thresholds: bool = False,
) -> Path:
    """Write `root/name/version/{model.onnx, manifest.json}` and return the bundle directory.

    `class_thresholds`: the calibration also holds one threshold and table per predicted class.
    """
    bundle = Path(root) / name / version
    bundle.mkdir(parents=True, exist_ok=True)
    model = tiny_graph(channels=channels, num_classes=len(labels), seed=seed)
    onnx_path = bundle / "model.onnx"
    onnx.save(model, str(onnx_path))

    # Calibration on noisy templates (the tiny model's "validation split").
    rng = np.random.default_rng(seed + 2)
    t = templates(len(labels), channels, 28, seed)
    cal = np.stack([noisy(t[i % len(labels)], rng) for i in range(500)])
    logits, dist = run_graph(onnx_path, cal.astype(np.float32) / np.float32(255.0))
    qs = [round(q, 3) for q in np.linspace(0.5, 0.99, 50)] + [0.995, 0.999]

    def table(d: np.ndarray) -> tuple[QuantilePoint, ...]:
        values = np.maximum.accumulate(np.quantile(d.astype(np.float64), qs))
        return tuple(QuantilePoint(q=q, value=float(v)) for q, v in zip(qs, values, strict=True))

    threshold = float(np.quantile(dist.astype(np.float64), target_tpr))
    per_class = None
    if class_thresholds:
        predicted = logits.argmax(1)
        per_class = tuple(
            ClassCalibration(
                size=int((predicted == c).sum()),
                pooled=False,
                threshold=float(np.quantile(dist[predicted == c].astype(np.float64), target_tpr)),
                quantiles=table(dist[predicted == c]),
            )
            for c in range(len(labels))
        )
    ood = OODMetrics(auroc=0.99, tnr_at_tpr95=0.97, dtacc=0.96, aupr_in=0.99, aupr_out=0.98)
    manifest = Manifest(
        name=name,
        version=version,
        created=datetime(2026, 1, 1, tzinfo=UTC),
        source_commit="0" * 40,
        description="tiny test bundle",
        onnx=OnnxSpec(sha256=sha256_file(onnx_path), opset=OPSET),
        preprocess=Preprocess(
            height=28,
            width=28,
            channels=channels,
            color_mode="L" if channels == 1 else "RGB",
            resize_filter="bilinear",
            mean=(0.5,),
            std=(0.5,),
        ),
        labels=labels,
        training={"architecture": "random-projection", "loss": "isomaxplus", "seed": seed},
        metrics=EvaluationMetrics(
            accuracy={"val": 0.9, "test": 0.89}, ood={"noise": {"min_distance": ood}}
        ),
        calibration=Calibration(
            split="val",
            size=len(cal),
            target_tpr=target_tpr,
            threshold=threshold,
            quantiles=table(dist),
            min_class_size=None if per_class is None else 1,
            per_class=per_class,
        ),
    )
    manifest.write(bundle)
    return bundle


def png_bytes(arr: np.ndarray, **save: object) -> bytes:
    """uint8 [C, H, W] or [H, W] -> PNG bytes."""
    a = arr[0] if arr.ndim == 3 and arr.shape[0] == 1 else arr
    if a.ndim == 3:
        a = a.transpose(1, 2, 0)
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, "PNG", **save)
    return buf.getvalue()


def sample_images(n_id: int = 6, n_ood: int = 4, seed: int = 5) -> list[tuple[str, bytes]]:
    """(filename, PNG) pairs: noisy templates (in-distribution) then unrelated images."""
    rng = np.random.default_rng(seed)
    t = templates()
    out = []
    for i in range(n_id):
        out.append((f"id{i}.png", png_bytes(noisy(t[i % len(t)], rng, noise=10.0))))
    for i in range(n_ood):
        pattern = np.full((28, 28), 255 * (i % 2), np.uint8)
        pattern[:: 2 + i, :] = 128  # stripes: nothing like a template
        out.append((f"ood{i}.png", png_bytes(pattern)))
    return out
