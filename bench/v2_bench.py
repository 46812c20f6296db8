"""Open Inference Protocol v2 REST vs POST /classify: what the protocol costs per request.

    .venv/bin/python bench/v2_bench.py            # ~2 minutes on 2 cores
    .venv/bin/python bench/v2_bench.py --seconds 3 --connections 16

One `isomax serve` (default bundle, CPU, one worker) under wrk, the same Fashion-MNIST-sized PNG
in every request, 1 and 8 images per request, sent as:
  - POST /classify: the raw PNG body (1 image) or multipart (8 images);
  - v2 infer, `image_bytes` (the encoded files, decoded by the server like /classify), as binary
    tensor data or as base64 in JSON;
  - v2 infer, `image` (FP32 pixels decoded by the client), as binary tensor data or JSON.
All requests ask for every output (binary outputs for binary requests, JSON for JSON ones).
Then, in-process (no HTTP, no other server): the CPU per one-image request of /classify and v2
infer called as ASGI apps, and the cost of the v2 framing alone (`parse_request` of a binary
request's JSON header, `response_body` of its outputs).
The question it answers: would gRPC v2 earn its place? A gRPC request carries the same tensor
bytes as a binary REST one, without the JSON header; the gap between REST binary and /classify
bounds what any leaner framing could gain. The load average is recorded: other processes on
the machine skew every number. Results: bench/results/v2.json and bench/results/v2.md.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import re
import struct
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from isomax.contract.decode import decode  # noqa: E402
from isomax.contract.manifest import Manifest  # noqa: E402
from tests import harness  # noqa: E402

MODEL = "fmnist-isomaxplus"
RESULTS = REPO / "bench" / "results"
LUA = REPO / "bench" / "wrk_post.lua"
BOUNDARY = "isomaxv2benchboundary"
OUTPUTS = ["logits", "min_distance", "class_index", "threshold", "is_ood"]


def sample_png() -> bytes:
    from tests.service.bundles import sample_images

    return sample_images(1, 0)[0][1]


def v2_body(
    inputs: dict[str, Any], blob: bytes | None, binary_out: bool
) -> tuple[bytes, int | None]:
    doc = {"inputs": [inputs], "outputs": [
        {"name": n, "parameters": {"binary_data": binary_out}} for n in OUTPUTS]}  # fmt: skip
    head = json.dumps(doc).encode()
    return (head, None) if blob is None else (head + blob, len(head))


def bodies(png: bytes, pixels: np.ndarray, n: int) -> dict[str, tuple[str, bytes, str, int | None]]:
    """name -> (path, body, content type, Inference-Header-Content-Length)."""
    files = [png] * n
    x = np.repeat(pixels[None], n, axis=0).astype("<f4")
    out: dict[str, tuple[str, bytes, str, int | None]] = {}
    if n == 1:
        out["classify raw PNG"] = ("/classify", png, "image/png", None)
    else:
        parts = b"".join(
            f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="{i}.png"\r\n'
            f"Content-Type: image/png\r\n\r\n".encode()
            + f
            + b"\r\n"
            for i, f in enumerate(files)
        )
        out["classify multipart"] = (
            "/classify", parts + f"--{BOUNDARY}--\r\n".encode(),
            f"multipart/form-data; boundary={BOUNDARY}", None,
        )  # fmt: skip
    infer = f"/v2/models/{MODEL}/infer"
    blob = b"".join(struct.pack("<I", len(f)) + f for f in files)
    spec = {"name": "image_bytes", "datatype": "BYTES", "shape": [n]}
    body, hl = v2_body({**spec, "parameters": {"binary_data_size": len(blob)}}, blob, True)
    out["v2 image_bytes binary"] = (infer, body, "application/octet-stream", hl)
    b64 = [base64.b64encode(f).decode() for f in files]
    body, hl = v2_body({**spec, "data": b64}, None, False)
    out["v2 image_bytes JSON base64"] = (infer, body, "application/json", hl)
    spec = {"name": "image", "datatype": "FP32", "shape": list(x.shape)}
    raw = x.tobytes()
    body, hl = v2_body({**spec, "parameters": {"binary_data_size": len(raw)}}, raw, True)
    out["v2 image FP32 binary"] = (infer, body, "application/octet-stream", hl)
    body, hl = v2_body({**spec, "data": x.reshape(-1).tolist()}, None, False)
    out["v2 image FP32 JSON"] = (infer, body, "application/json", hl)
    return out


def wrk(url: str, body: bytes, ctype: str, header_length: int | None, args: argparse.Namespace,
        tmp: Path) -> dict[str, float]:  # fmt: skip
    path = tmp / "body.bin"
    path.write_bytes(body)
    cmd = ["wrk", "-t1", f"-c{args.connections}", f"-d{args.seconds}s", "--latency", "-s", str(LUA)]
    if header_length is not None:
        cmd += ["-H", f"Inference-Header-Content-Length: {header_length}"]
    cmd += [url, "--", str(path), ctype]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=args.seconds + 60).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    p50 = re.search(r"50%\s+([\d.]+)(us|ms|s)", out)
    scale = {"us": 1e-3, "ms": 1.0, "s": 1e3}
    return {
        "requests_per_s": rps,
        "p50_ms": float(p50.group(1)) * scale[p50.group(2)] if p50 else float("nan"),
        "non_2xx": int(non2xx.group(1)) if non2xx else 0,
    }


def framing_cost(png: bytes, n: int = 20000) -> dict[str, float]:
    """Microseconds to parse a one-image binary request and to write its binary response."""
    import timeit

    from service.v2.tensors import OutputTensor, parse_request, response_body

    blob = struct.pack("<I", len(png)) + png
    body, hl = v2_body({"name": "image_bytes", "datatype": "BYTES", "shape": [1],
                        "parameters": {"binary_data_size": len(blob)}}, blob, True)  # fmt: skip
    outs = [
        (OutputTensor("logits", "FP32", np.zeros((1, 10), np.float32)), True),
        (OutputTensor("min_distance", "FP32", np.zeros(1, np.float32)), True),
        (OutputTensor("class_index", "INT64", np.zeros(1, np.int64)), True),
        (OutputTensor("threshold", "FP64", np.zeros(1)), True),
        (OutputTensor("is_ood", "BOOL", np.zeros(1, bool)), True),
    ]
    parse = timeit.timeit(lambda: parse_request(body, str(hl)), number=n) / n
    write = timeit.timeit(lambda: response_body({"model_name": MODEL}, outs), number=n) / n
    return {"parse_request_us": parse * 1e6, "response_body_us": write * 1e6}


def asgi_cost(png: bytes, models: Path, n: int = 500, rounds: int = 3) -> dict[str, float]:
    """CPU microseconds per one-image request, /classify vs v2 infer, called as ASGI apps.

    Sequential requests (so the model thread's time is included); the best of `rounds`.
    """
    import asyncio

    from service.app import create_app
    from service.settings import Settings

    blob = struct.pack("<I", len(png)) + png
    body, hl = v2_body({"name": "image_bytes", "datatype": "BYTES", "shape": [1],
                        "parameters": {"binary_data_size": len(blob)}}, blob, True)  # fmt: skip
    cases = {
        "classify": ("/classify", png, [(b"content-type", b"image/png")]),
        "v2": (f"/v2/models/{MODEL}/infer", body,
               [(b"inference-header-content-length", str(hl).encode())]),
    }  # fmt: skip

    async def call(app: Any, path: str, data: bytes, headers: list[tuple[bytes, bytes]]) -> None:
        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
                 "method": "POST", "scheme": "http", "path": path, "raw_path": path.encode(),
                 "root_path": "", "query_string": b"", "client": ("127.0.0.1", 1),
                 "server": ("127.0.0.1", 8000),
                 "headers": [(b"content-length", str(len(data)).encode()), *headers]}  # fmt: skip
        messages = [{"type": "http.request", "body": data, "more_body": False}]
        status: list[int] = []

        async def receive() -> dict[str, Any]:
            return messages.pop() if messages else {"type": "http.disconnect"}

        async def send(m: dict[str, Any]) -> None:
            if m["type"] == "http.response.start":
                status.append(m["status"])

        await app(scope, receive, send)
        assert status == [200], (path, status)

    async def run() -> dict[str, float]:
        app = create_app(Settings(models_dir=models, models=(MODEL,), device="cpu", max_wait_ms=0))
        best = {name: float("inf") for name in cases}
        async with app.router.lifespan_context(app):
            while not app.service.registry.ready:
                await asyncio.sleep(0.05)
            for _ in range(rounds):
                for name, (path, data, headers) in cases.items():
                    t0 = time.process_time()
                    for _ in range(n):
                        await call(app, path, data, headers)
                    best[name] = min(best[name], (time.process_time() - t0) / n * 1e6)
        return {f"{k}_cpu_us": v for k, v in best.items()}

    return asyncio.run(run())


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=int, default=6)
    p.add_argument("--connections", type=int, default=32)
    args = p.parse_args()
    models = REPO / "models"
    version = max((d.name for d in (models / MODEL).iterdir() if d.name.isdigit()), key=int)
    spec = Manifest.read(models / MODEL / version).preprocess
    png = sample_png()
    pixels = decode(png, spec).astype(np.float32)
    port = harness.free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("ISOMAX_")}
    env.update(ISOMAX_DEVICE="cpu", ISOMAX_LOG_LEVEL="warning")
    cmd = [sys.executable, "-m", "isomax", "serve", "--host", "127.0.0.1", "--port", str(port),
           "--models-dir", str(models), "--models", MODEL]  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    results: list[dict[str, Any]] = []
    load_before = os.getloadavg()
    log = REPO / "bench" / "out" / "v2-server.log"
    with tempfile.TemporaryDirectory() as tmp, harness.serve(cmd, port, log, env=env):
        for n in (1, 8):
            for name, (path, body, ctype, hl) in bodies(png, pixels, n).items():
                r: dict[str, Any] = dict(wrk(base + path, body, ctype, hl, args, Path(tmp)))
                r.update(config=name, images_per_request=n, body_bytes=len(body))
                r["images_per_s"] = r["requests_per_s"] * n
                results.append(r)
                print(f"{n} img  {name:28} {r['requests_per_s']:8.0f} req/s  "
                      f"p50 {r['p50_ms']:6.2f} ms  {len(body):7d} B  non-2xx {r['non_2xx']}")  # fmt: skip
    framing = framing_cost(png)
    asgi = asgi_cost(png, models)
    print(framing, asgi)
    meta = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "cpus": os.cpu_count(),
        "load_before": load_before,
        "load_after": os.getloadavg(),
        "seconds": args.seconds,
        "connections": args.connections,
        "model": f"{MODEL}:{version}",
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    doc = {"meta": meta, "results": results, "framing": framing, "in_process": asgi}
    (RESULTS / "v2.json").write_text(json.dumps(doc, indent=1))
    lines = [
        "# v2 REST vs /classify (bench/v2_bench.py)",
        "",
        f"{meta['date']}, {meta['cpus']} CPUs, load average before "
        f"{', '.join(f'{x:.1f}' for x in load_before)}, after "
        f"{', '.join(f'{x:.1f}' for x in meta['load_after'])}; wrk 1 thread, "
        f"{args.connections} connections, {args.seconds} s per row; one worker, CPU.",
        "",
        "| images/request | request | body bytes | requests/s | images/s | p50 ms | non-2xx |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in results:
        lines.append(
            f"| {r['images_per_request']} | {r['config']} | {r['body_bytes']} | "
            f"{r['requests_per_s']:.0f} | {r['images_per_s']:.0f} | {r['p50_ms']:.2f} | "
            f"{r['non_2xx']} |"
        )
    lines += [
        "",
        "In-process, one image per request, CPU per request (best of 3 x 500 sequential calls "
        f"as ASGI apps, model thread included): /classify {asgi['classify_cpu_us']:.0f} us, "
        f"v2 infer (binary BYTES) {asgi['v2_cpu_us']:.0f} us. The v2 framing alone: "
        f"parse_request {framing['parse_request_us']:.1f} us, response_body "
        f"{framing['response_body_us']:.1f} us.",
    ]
    (RESULTS / "v2.md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
