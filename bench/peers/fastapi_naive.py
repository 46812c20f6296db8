"""The peer a user would write first: FastAPI + UploadFile + PIL + one onnxruntime run per request.

No batching, the model call blocks the event loop, multipart only. Run the same way as the
service in bench/serve_bench.py:

    BENCH_MODEL=models/x/1/model.onnx uvicorn bench.peers.fastapi_naive:app --port 8100

BENCH_THREADS=1 gives onnxruntime one intra-op thread instead of its default (one per core,
spinning while idle), which on 2 shared cores is the first thing a user would tune.
"""

from __future__ import annotations

import io
import os

import numpy as np
import onnxruntime as ort
from fastapi import FastAPI, File, UploadFile
from PIL import Image

LABELS = [str(i) for i in range(10)]
options = ort.SessionOptions()
options.intra_op_num_threads = int(os.environ.get("BENCH_THREADS", "0"))
session = ort.InferenceSession(
    os.environ["BENCH_MODEL"], options, providers=["CPUExecutionProvider"]
)
threshold = float(os.environ.get("BENCH_THRESHOLD", "0.5"))
app = FastAPI()


@app.post("/classify")
async def classify(file: UploadFile = File(...)) -> dict:  # noqa: B008
    data = await file.read()
    img = Image.open(io.BytesIO(data)).convert("L").resize((28, 28))
    x = np.asarray(img, dtype=np.float32)[None, None] / 255.0
    logits, dist = session.run(["logits", "min_distance"], {"image": x})
    p = np.exp(logits[0] - logits[0].max())
    p /= p.sum()
    k = int(p.argmax())
    d = float(dist[0])
    return {
        "class_index": k,
        "label": LABELS[k],
        "probability": float(p[k]),
        "min_distance": d,
        "is_ood": d > threshold,
    }
