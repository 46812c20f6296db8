"""Peer: the same model behind BentoML 1.4, written the way its quickstart shows.

Not part of the package (BentoML is not a dependency): install it in a throwaway venv and run
through bench/serve_bench.py --bentoml-python VENV/bin/python, which starts

    BENCH_MODEL=.../model.onnx python -m bentoml serve bench.peers.bentoml_service:Classifier

POST /classify takes a multipart part named `file`, like the service.
"""

from __future__ import annotations

import os

import bentoml
import numpy as np
import onnxruntime as ort
from PIL.Image import Image


@bentoml.service(workers=1)
class Classifier:
    def __init__(self) -> None:
        self.session = ort.InferenceSession(
            os.environ["BENCH_MODEL"], providers=["CPUExecutionProvider"]
        )
        self.threshold = float(os.environ.get("BENCH_THRESHOLD", "0.5"))

    @bentoml.api
    def classify(self, file: Image) -> dict:
        x = np.asarray(file.convert("L").resize((28, 28)), dtype=np.float32)[None, None] / 255.0
        logits, dist = self.session.run(["logits", "min_distance"], {"image": x})
        p = np.exp(logits[0] - logits[0].max())
        p /= p.sum()
        k = int(p.argmax())
        d = float(dist[0])
        return {
            "class_index": k,
            "probability": float(p[k]),
            "min_distance": d,
            "is_ood": d > self.threshold,
        }
