"""What every peer does with an image and the model's outputs, in one place (standard library,
numpy, Pillow and onnxruntime only, so it imports in every peer's venv).

The decode is the plain one a user writes (`Image.open(...).convert("L")`, / 255), which for
the benchmark's 28x28 gray PNG gives the same array as the service's manifest-driven decode;
the answer carries what the service's does: class, its probability, min_distance and the
OOD verdict against the model's calibrated threshold.
"""

from __future__ import annotations

import io
import os

import numpy as np
import onnxruntime as ort
from PIL import Image


def session(threads: int) -> ort.InferenceSession:
    """The model of $BENCH_MODEL; `threads` intra-op threads (0: onnxruntime's default)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    return ort.InferenceSession(
        os.environ["BENCH_MODEL"], options, providers=["CPUExecutionProvider"]
    )


def threshold() -> float:
    return float(os.environ.get("BENCH_THRESHOLD", "0.5"))


def decode(png: bytes) -> np.ndarray:
    """PNG bytes -> float32 [1, 28, 28] in [0, 1]."""
    return to_array(Image.open(io.BytesIO(png)))


def to_array(img: Image.Image) -> np.ndarray:
    """An opened image -> float32 [1, 28, 28] in [0, 1]."""
    img = img.convert("L")
    if img.size != (28, 28):
        img = img.resize((28, 28))
    return np.asarray(img, dtype=np.float32)[None] / np.float32(255.0)


def run(sess: ort.InferenceSession, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """x [n, 1, 28, 28] -> (probabilities [n, K], min_distance [n])."""
    logits, dist = sess.run(["logits", "min_distance"], {"image": x})
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True), dist


def answers(p: np.ndarray, dist: np.ndarray, t: float) -> list[dict[str, object]]:
    """One JSON-ready answer per image."""
    k = p.argmax(axis=1)
    return [
        {
            "class_index": int(k[i]),
            "probability": float(p[i, k[i]]),
            "min_distance": float(dist[i]),
            "is_ood": bool(dist[i] > t),
        }
        for i in range(len(k))
    ]
