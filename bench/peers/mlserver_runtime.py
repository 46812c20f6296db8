"""Peer: the same model behind Seldon MLServer 1.7 (what Alibi Detect users deploy with).

A custom runtime, the way MLServer's docs write one, with MLServer's adaptive batching on
(bench/peers/mlserver/model-settings.json: up to 32 images, 2 ms window, like the service's
defaults) and one onnxruntime intra-op thread. The request is the Open Inference Protocol
(V2) over REST: one BYTES input holding the PNG, base64 in JSON (MLServer's REST API has no
binary extension); the answer is four outputs per image.

bench/peers/setup.sh builds its venv; bench/serve_bench.py starts, from the repository root,

    BENCH_MODEL=.../model.onnx MLSERVER_HTTP_PORT=... mlserver start bench/peers/mlserver
"""

from __future__ import annotations

import numpy as np
from mlserver import MLModel
from mlserver.codecs import Base64Codec, NumpyCodec
from mlserver.types import InferenceRequest, InferenceResponse

from bench.peers import common


class Classifier(MLModel):
    async def load(self) -> bool:
        self.session = common.session(threads=1)
        self.threshold = common.threshold()
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        pngs = Base64Codec.decode_input(payload.inputs[0])
        x = np.stack([common.decode(png) for png in pngs])
        p, dist = common.run(self.session, x)
        k = p.argmax(axis=1)
        outputs = {
            "class_index": k.astype(np.int64),
            "probability": p[np.arange(len(k)), k].astype(np.float32),
            "min_distance": dist.astype(np.float32),
            "is_ood": dist > self.threshold,
        }
        return InferenceResponse(
            model_name=self.name,
            outputs=[NumpyCodec.encode_output(name, v) for name, v in outputs.items()],
        )
