"""Peer: the same model behind NVIDIA Triton Inference Server 2.51, through nvidia-pytriton.

nvidia-pytriton ships a real `tritonserver` binary; the model is served by Triton's *Python
backend* (a proxy model that hands each batch to the function bound here), not by Triton's
native onnxruntime backend, which the wheel does not include. Triton's dynamic batcher forms
the batches: up to 32 images, 500 us queue delay. One onnxruntime intra-op thread.

Two models, one per request form (`--model` picks the one bound):
  classifier_png    the PNG as a BYTES tensor, decoded with Pillow in the bound function;
  classifier_fp32   the decoded image as an FP32 [1, 28, 28] tensor (the client decodes).
Clients send the V2 protocol's binary-data extension (a JSON header, then the raw tensor).

Needs Python 3.13 (the backend stub embeds libpython 3.13; with 3.11 the bound model fails to
initialise). bench/peers/setup.sh builds its venv; bench/serve_bench.py starts

    BENCH_MODEL=.../model.onnx python bench/peers/triton_server.py --port PORT --model NAME
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from pytriton.decorators import batch
from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
from pytriton.triton import Triton, TritonConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench.peers import common

SESSION = common.session(threads=1)
THRESHOLD = common.threshold()


def _outputs(x: np.ndarray) -> dict[str, np.ndarray]:
    p, dist = common.run(SESSION, x)
    k = p.argmax(axis=1)
    return {
        "class_index": k.astype(np.int64)[:, None],
        "probability": p[np.arange(len(k)), k].astype(np.float32)[:, None],
        "min_distance": dist.astype(np.float32)[:, None],
        "is_ood": (dist > THRESHOLD)[:, None],
    }


@batch
def infer_png(image: np.ndarray) -> dict[str, np.ndarray]:
    return _outputs(np.stack([common.decode(bytes(row[0])) for row in image]))


@batch
def infer_fp32(image: np.ndarray) -> dict[str, np.ndarray]:
    return _outputs(image.astype(np.float32, copy=False))


MODELS = {
    "classifier_png": (infer_png, Tensor(name="image", dtype=np.bytes_, shape=(1,))),
    "classifier_fp32": (infer_fp32, Tensor(name="image", dtype=np.float32, shape=(1, 28, 28))),
}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--model", choices=sorted(MODELS), required=True)
    args = ap.parse_args()
    import socket

    def free() -> int:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return int(s.getsockname()[1])

    config = TritonConfig(
        http_address="127.0.0.1",
        http_port=args.port,
        grpc_address="127.0.0.1",
        grpc_port=free(),
        metrics_port=free(),
        allow_metrics=False,
        log_verbose=0,
    )
    fn, image = MODELS[args.model]
    with Triton(config=config) as triton:
        triton.bind(
            model_name=args.model,
            infer_func=fn,
            inputs=[image],
            outputs=[
                Tensor(name="class_index", dtype=np.int64, shape=(1,)),
                Tensor(name="probability", dtype=np.float32, shape=(1,)),
                Tensor(name="min_distance", dtype=np.float32, shape=(1,)),
                Tensor(name="is_ood", dtype=np.bool_, shape=(1,)),
            ],
            config=ModelConfig(
                max_batch_size=32,
                batcher=DynamicBatcher(max_queue_delay_microseconds=500),
            ),
            strict=False,
        )
        triton.serve()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
