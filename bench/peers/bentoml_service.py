"""Peer: the same model behind BentoML 1.4, two ways.

  Classifier          as its quickstart shows: one image per call, onnxruntime's default
                      thread pool, no batching (what a first version looks like);
  BatchedClassifier   as its docs recommend for a CPU model: one onnxruntime intra-op thread
                      and adaptive batching (`batchable=True`, up to 32 images per run), and
                      no access log line per request (the service logs none either).

Not part of the package (BentoML is not a dependency): bench/peers/setup.sh builds its venv and
bench/serve_bench.py starts

    BENCH_MODEL=.../model.onnx python -m bentoml serve bench.peers.bentoml_service:Classifier

POST /classify takes a multipart part named `file` (Classifier) or `images` (BatchedClassifier).
"""

from __future__ import annotations

import bentoml
import numpy as np
from PIL.Image import Image

from bench.peers import common


@bentoml.service(workers=1)
class Classifier:
    def __init__(self) -> None:
        self.session = common.session(threads=0)
        self.threshold = common.threshold()

    @bentoml.api
    def classify(self, file: Image) -> dict:
        p, dist = common.run(self.session, common.to_array(file)[None])
        return common.answers(p, dist, self.threshold)[0]


@bentoml.service(workers=1, logging={"access": {"enabled": False}})
class BatchedClassifier:
    def __init__(self) -> None:
        self.session = common.session(threads=1)
        self.threshold = common.threshold()

    @bentoml.api(batchable=True, max_batch_size=32)
    def classify(self, images: list[Image]) -> list[dict]:
        x = np.stack([common.to_array(img) for img in images])
        p, dist = common.run(self.session, x)
        return common.answers(p, dist, self.threshold)
