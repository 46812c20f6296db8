"""gRPC v2 vs REST v2 with binary tensors: does gRPC earn its place? Server CPU per request.

    .venv/bin/pip install 'tritonclient[grpc]'      # grpcio + protobuf: bench only, not a dependency
    .venv/bin/python bench/v2_grpc_bench.py          # ~1 minute on 2 cores

Two servers, one after the other, each in its own process on the default bundle (CPU, one
event loop):
  - REST: `isomax serve` (uvicorn), POST /v2/models/<model>/infer with binary tensor data;
  - gRPC: this script with --serve-grpc: the same app (`create_app`: registry, batcher, limits)
    behind a grpc.aio server that answers KServe's GRPCInferenceService.ModelInfer with the same
    service/v2 code (`model_input`, `run`); only the framing differs.
The load is Triton's own clients (tritonclient.http / tritonclient.grpc), a few threads each
sending one-image requests (`image_bytes`, every output) in a loop. What is compared is the
*server's* CPU time per request (from /proc), so the Python clients' own cost, which differs
between the two client libraries, does not enter; requests/s is recorded too. The load average
is recorded: other processes on the machine skew every number.
Results: bench/results/v2_grpc.json and bench/results/v2_grpc.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

MODEL = "fmnist-isomaxplus"
RESULTS = REPO / "bench" / "results"
OUTPUTS = ["logits", "min_distance", "class_index", "threshold", "is_ood"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process, from /proc (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# -- the gRPC server -----------------------------------------------------------------------------


def serve_grpc(port: int) -> None:
    """KServe's GRPCInferenceService.ModelInfer over the service's own app and v2 code."""
    import grpc
    from tritonclient.grpc import service_pb2, service_pb2_grpc

    from service.app import create_app
    from service.pipeline import Body, Taken, serve
    from service.settings import Settings
    from service.state import current
    from service.v2.infer import model_input
    from service.v2.infer import outputs as v2_outputs
    from service.v2.tensors import NUMPY, InferRequest, InputTensor, RequestedOutput

    app = create_app(Settings(models_dir=REPO / "models", models=(MODEL,), device="cpu"))

    class Servicer(service_pb2_grpc.GRPCInferenceServiceServicer):  # type: ignore[misc]
        async def ModelInfer(self, request: Any, context: Any) -> Any:
            state = current(app)
            model = state.registry.resolve(request.model_name, request.model_version or None)
            inputs = [
                InputTensor(t.name, t.datatype, list(t.shape), None, raw, {})
                for t, raw in zip(request.inputs, request.raw_input_contents, strict=True)
            ]
            outputs = [RequestedOutput(o.name, True) for o in request.outputs] or None
            req = InferRequest(request.id or None, inputs, outputs, True)

            async def take(body: Any, model: Any) -> Any:  # the tensors came with the call
                x, wanted, files = await model_input(req, model, state.settings)
                return Taken(x, files, wanted)

            served = await serve(state, model, Body(_no_body, state.bodies), take)
            head, tensors = v2_outputs(req, model, served.taken.request, served)
            response = service_pb2.ModelInferResponse(
                model_name=head["model_name"], model_version=head["model_version"]
            )
            for out, _ in tensors:
                t = response.outputs.add()
                t.name, t.datatype = out.name, out.datatype
                t.shape.extend(out.array.shape)
                data = np.ascontiguousarray(out.array, dtype=NUMPY[out.datatype]).tobytes()
                response.raw_output_contents.append(data)
            return response

    async def _no_body() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def main() -> None:
        async with app.router.lifespan_context(app):
            while not app.service.registry.ready:
                await asyncio.sleep(0.05)
            server = grpc.aio.server()
            service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(Servicer(), server)
            server.add_insecure_port(f"127.0.0.1:{port}")
            await server.start()
            print("ready", flush=True)
            await server.wait_for_termination()

    asyncio.run(main())


# -- the load --------------------------------------------------------------------------------


def load(kind: str, url: str, png: bytes, threads: int, seconds: float) -> int:
    """Requests answered by `threads` clients of `kind` in `seconds`."""
    if kind == "grpc":
        import tritonclient.grpc as client_lib
    else:
        import tritonclient.http as client_lib  # type: ignore[no-redef]
    counts = [0] * threads
    stop = time.monotonic() + seconds

    def worker(i: int) -> None:
        client = client_lib.InferenceServerClient(url)
        image = client_lib.InferInput("image_bytes", [1], "BYTES")
        image.set_data_from_numpy(np.array([png], dtype=np.object_))
        outputs = [client_lib.InferRequestedOutput(n) for n in OUTPUTS]
        while time.monotonic() < stop:
            result = client.infer(MODEL, [image], outputs=outputs)
            assert result.as_numpy("is_ood").shape == (1,)
            counts[i] += 1
        client.close()

    pool = [threading.Thread(target=worker, args=(i,)) for i in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    return sum(counts)


def measure(kind: str, args: argparse.Namespace, png: bytes) -> dict[str, Any]:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("ISOMAX_")}
    env.update(ISOMAX_DEVICE="cpu", ISOMAX_LOG_LEVEL="warning")
    if kind == "grpc":
        cmd = [sys.executable, __file__, "--serve-grpc", str(port)]
        url = f"127.0.0.1:{port}"
    else:
        cmd = [sys.executable, "-m", "isomax", "serve", "--host", "127.0.0.1", "--port",
               str(port), "--models-dir", str(REPO / "models"), "--models", MODEL]  # fmt: skip
        url = f"127.0.0.1:{port}"
    with subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, text=True) as server:
        try:
            deadline = time.monotonic() + 60
            if kind == "grpc":
                assert server.stdout is not None
                assert server.stdout.readline().strip() == "ready"
            else:
                while True:
                    try:
                        with urllib.request.urlopen(f"http://{url}/readyz", timeout=2) as r:
                            if r.status == 200:
                                break
                    except OSError:
                        time.sleep(0.2)
                    if time.monotonic() > deadline:
                        raise RuntimeError("server not ready")
            load(kind, url, png, args.threads, 2.0)  # warm-up
            cpu0 = cpu_seconds(server.pid)
            n = load(kind, url, png, args.threads, args.seconds)
            cpu = cpu_seconds(server.pid) - cpu0
        finally:
            server.terminate()
    return {
        "protocol": kind,
        "requests": n,
        "requests_per_s": n / args.seconds,
        "server_cpu_us_per_request": cpu / n * 1e6,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--threads", type=int, default=4)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--serve-grpc", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.serve_grpc:
        serve_grpc(args.serve_grpc)
        return 0
    from tests.service.bundles import sample_images

    png = sample_images(1, 0)[0][1]
    load_before = os.getloadavg()
    results = []
    for _ in range(args.rounds):
        for kind in ("rest", "grpc"):
            r = measure(kind, args, png)
            results.append(r)
            print(f"{kind:5} {r['requests_per_s']:7.0f} req/s  server CPU "
                  f"{r['server_cpu_us_per_request']:6.0f} us/request")  # fmt: skip
    meta = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "cpus": os.cpu_count(),
        "load_before": load_before,
        "load_after": os.getloadavg(),
        "seconds": args.seconds,
        "threads": args.threads,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    doc = {"meta": meta, "results": results}
    (RESULTS / "v2_grpc.json").write_text(json.dumps(doc, indent=1))
    lines = [
        "# gRPC v2 vs REST v2 with binary tensors (bench/v2_grpc_bench.py)",
        "",
        f"{meta['date']}, {meta['cpus']} CPUs, load average before "
        f"{', '.join(f'{x:.1f}' for x in load_before)}, after "
        f"{', '.join(f'{x:.1f}' for x in meta['load_after'])}; {args.threads} client threads "
        f"(tritonclient), {args.seconds:.0f} s per row, one image per request, every output.",
        "",
        "| protocol | requests/s | server CPU per request (us) |",
        "| --- | --- | --- |",
    ]
    for r in results:
        lines.append(
            f"| {r['protocol']} | {r['requests_per_s']:.0f} | "
            f"{r['server_cpu_us_per_request']:.0f} |"
        )
    (RESULTS / "v2_grpc.md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
