"""Peer: the same model behind Ray Serve, with `@serve.batch`.

One replica (one CPU), one onnxruntime intra-op thread, `@serve.batch` with up to 32 images
and a 2 ms window (the service's defaults), `max_ongoing_requests` high enough for a batch to
fill. The request is the PNG as the raw body, the answer JSON. Ray Serve's HTTP proxy runs in
its own actor process and hands each request to the replica.

bench/peers/setup.sh builds its venv; bench/serve_bench.py starts, from the repository root,

    BENCH_MODEL=.../model.onnx python bench/peers/ray_serve.py --port PORT
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from pathlib import Path

import numpy as np
import ray
from ray import serve
from starlette.requests import Request

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench.peers import common


@serve.deployment(num_replicas=1, max_ongoing_requests=256)
class Classifier:
    def __init__(self) -> None:
        self.session = common.session(threads=1)
        self.threshold = common.threshold()

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.002)
    async def classify(self, pngs: list[bytes]) -> list[dict[str, object]]:
        x = np.stack([common.decode(png) for png in pngs])
        p, dist = common.run(self.session, x)
        return common.answers(p, dist, self.threshold)

    async def __call__(self, request: Request) -> dict[str, object]:
        return await self.classify(await request.body())


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    args = ap.parse_args()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": args.port})
    serve.run(Classifier.bind(), name="classifier", route_prefix="/classify")
    print(f"ray serve: ready on port {args.port}", flush=True)
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    signal.signal(signal.SIGINT, lambda *_: done.set())
    done.wait()
    serve.shutdown()
    ray.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
