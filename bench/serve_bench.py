"""Serving benchmark: `isomax serve` and its peers under wrk, against raw onnxruntime, one sitting.

    bash bench/peers/setup.sh                          # once: the peers' venvs (bench/out/peers)
    .venv/bin/python bench/serve_bench.py              # everything, about 8 minutes on 2 cores
    .venv/bin/python bench/serve_bench.py --only isomax --duration 3     # a quick look

What runs, in order, each server alone on the machine (started, checked, loaded, stopped):
  1. raw onnxruntime in this process (no HTTP, no decoding): images/s at batch 1 and 32 on all
     cores and at batch 32 on one thread; measured again at the end, and the ratios use the
     mean of the two batch-32 figures (so a machine that changed under the run shows);
  2. `isomax serve` with 1 and 2 workers: one PNG per request as the raw image/png body and as
     one multipart part, at 32 and 128 connections (`--full`: also 8 images per request and
     batching off);
  3. the peers, each set up the way its documentation recommends for a small CPU model, each
     with its own batching on (bench/peers/*, venvs from bench/peers/setup.sh; a peer whose
     venv is missing is skipped and listed as such): BentoML 1.4 (its quickstart default, and
     one onnxruntime thread with adaptive batching), Seldon MLServer (adaptive batching), Ray
     Serve (`@serve.batch`), NVIDIA Triton 2.51 through nvidia-pytriton (Triton's Python
     backend with its dynamic batcher: the PNG as a BYTES tensor, and the decoded FP32 tensor,
     both as binary data), and the naive FastAPI prototype (one run per request).
Every server's first answer is checked against raw onnxruntime on the same PNG (same class,
same min_distance) before it is loaded, so every row computes the same thing.

wrk runs with one thread; its CPU is recorded next to each result to show it is not the
bottleneck. Server CPU is that of every process the server started (its session). The load
average before and after is recorded: other processes on the machine skew everything.
Results: bench/results/serving.json and bench/results/serving.md (--out to change).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import re
import resource
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.standin_model import write_standin  # noqa: E402
from isomax.contract.manifest import Manifest  # noqa: E402
from tests import harness  # noqa: E402

OUT = REPO / "bench" / "out"
PEERS = OUT / "peers"  # one venv per peer (bench/peers/setup.sh)
RESULTS = REPO / "bench" / "results"
LUA = REPO / "bench" / "wrk_post.lua"
DEFAULT_MODEL = "fmnist-isomaxplus"
TRITON_OUTPUTS = ("class_index", "probability", "min_distance", "is_ood")


# -- model and inputs ------------------------------------------------------------------------


def pick_bundle() -> tuple[Path, str]:
    root = REPO / "models" / DEFAULT_MODEL
    versions = (
        [p for p in root.glob("*") if p.is_dir() and p.name.isdigit()] if root.is_dir() else []
    )
    if versions:
        return max(versions, key=lambda p: int(p.name)), "default bundle"
    return write_standin(OUT / "models"), "stand-in (default bundle absent)"


def test_png(bundle: Path) -> bytes:
    """A 28x28 gray PNG shaped like a Fashion-MNIST item (a bright blob on black)."""
    spec = Manifest.read(bundle).preprocess
    yy, xx = np.mgrid[: spec.height, : spec.width]
    blob = np.exp(-(((yy - spec.height / 2) / 7) ** 2 + ((xx - spec.width / 2) / 5) ** 2))
    img = np.clip(blob * 230 + np.random.default_rng(0).normal(0, 8, blob.shape), 0, 255)
    buf = io.BytesIO()
    Image.fromarray(img.astype(np.uint8)).convert(spec.color_mode).save(buf, "PNG")
    return buf.getvalue()


def png_array(png: bytes) -> np.ndarray:
    """The benchmark PNG as the model's float32 input [1, 1, 28, 28] (it is gray and 28x28)."""
    return np.asarray(Image.open(io.BytesIO(png)), dtype=np.float32)[None, None] / np.float32(255)


@dataclass(frozen=True)
class Body:
    """One request body, written to a file for wrk."""

    kind: str  # what the results call it
    path: Path
    content_type: str
    headers: tuple[tuple[str, str], ...] = ()
    images: int = 1

    def post(self, server: harness.Server, url_path: str) -> tuple[int, bytes]:
        return server.post(
            url_path, self.path.read_bytes(), self.content_type, 30, dict(self.headers)
        )


def write_bodies(png: bytes) -> dict[str, Body]:
    """Every request body the servers take, each carrying the same PNG (or its pixels)."""
    OUT.mkdir(parents=True, exist_ok=True)
    bodies: dict[str, Body] = {}

    def add(key: str, kind: str, data: bytes, ctype: str, **kw: Any) -> None:
        path = OUT / f"body-{key}"
        path.write_bytes(data)
        bodies[key] = Body(kind, path, ctype, **kw)

    add("raw", "raw image/png", png, "image/png")
    add("multipart", "multipart", *harness.multipart([("x.png", png)]))
    add("multipart-8", "multipart, 8 images", *harness.multipart([("x.png", png)] * 8), images=8)
    add("bentoml-images", "multipart (`images`)", *harness.multipart([("x.png", png)], "images"))
    import base64

    v2 = {
        "inputs": [
            {
                "name": "image",
                "shape": [1],
                "datatype": "BYTES",
                "parameters": {"content_type": "base64"},
                "data": [base64.b64encode(png).decode()],
            }
        ]
    }
    add("v2-json", "V2 JSON, PNG base64", json.dumps(v2).encode(), "application/json")
    for key, kind, datatype, shape, payload in (
        ("triton-png", "V2 binary, PNG as BYTES", "BYTES", [1, 1],
         struct.pack("<I", len(png)) + png),
        ("triton-fp32", "V2 binary, FP32 tensor", "FP32", [1, 1, 28, 28],
         png_array(png).tobytes()),
    ):  # fmt: skip
        header = json.dumps(
            {
                "inputs": [
                    {
                        "name": "image",
                        "shape": shape,
                        "datatype": datatype,
                        "parameters": {"binary_data_size": len(payload)},
                    }
                ],
                "outputs": [
                    {"name": n, "parameters": {"binary_data": False}} for n in TRITON_OUTPUTS
                ],
            }
        ).encode()
        add(key, kind, header + payload, "application/octet-stream",
            headers=(("Inference-Header-Content-Length", str(len(header))),))  # fmt: skip
    return bodies


# -- what each server answers ----------------------------------------------------------------


def answer_isomax(body: bytes) -> tuple[int, float]:
    r = json.loads(body)["results"][0]
    return r["class_index"], r["min_distance"]


def answer_flat(body: bytes) -> tuple[int, float]:
    r = json.loads(body)
    r = r[0] if isinstance(r, list) else r
    return r["class_index"], r["min_distance"]


def answer_v2(body: bytes) -> tuple[int, float]:
    outputs = {o["name"]: o["data"] for o in json.loads(body)["outputs"]}
    return int(outputs["class_index"][0]), float(outputs["min_distance"][0])


# -- raw onnxruntime -------------------------------------------------------------------------


def without_distance(model_path: Path, out: Path) -> Path:
    """The same graph with the min_distance output (and what only it needs) removed."""
    m = onnx.load(str(model_path))
    keep = [o for o in m.graph.output if o.name != "min_distance"]
    del m.graph.output[:]
    m.graph.output.extend(keep)
    needed = {o.name for o in keep}
    nodes = []
    for node in reversed(list(m.graph.node)):
        if any(o in needed for o in node.output):
            nodes.append(node)
            needed.update(node.input)
    del m.graph.node[:]
    m.graph.node.extend(reversed(nodes))
    onnx.checker.check_model(m)
    onnx.save(m, str(out))
    return out


def raw_ort(
    x1: np.ndarray, variants: dict[str, tuple[Path, int, int]], rounds: int = 6
) -> dict[str, int]:
    """Images/s of back-to-back session.run calls, per variant (model, batch, threads).

    The variants are measured in interleaved 0.5 s rounds and each keeps its best round, so
    that a burst of other load on the machine hits all of them alike instead of skewing one.
    """
    runs = {}
    for name, (model, batch, threads) in variants.items():
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        sess = ort.InferenceSession(str(model), opts, providers=["CPUExecutionProvider"])
        x = np.repeat(x1, batch, axis=0)
        for _ in range(10):
            sess.run(None, {"image": x})
        runs[name] = (sess, x)
    best = dict.fromkeys(variants, 0.0)
    for _ in range(rounds):
        for name, (sess, x) in runs.items():
            n, t0 = 0, time.perf_counter()
            while time.perf_counter() - t0 < 0.5:
                sess.run(None, {"image": x})
                n += 1
            best[name] = max(best[name], n * len(x) / (time.perf_counter() - t0))
    return {k: round(v) for k, v in best.items()}


# -- load and CPU ----------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system, with reaped children) of a server: every process it started.

    `harness.processes`: its session and their descendants, so uvicorn's workers, BentoML's
    and MLServer's worker processes, Ray's raylet and actors, tritonserver and its Python
    backend stubs all count.
    """
    total = 0
    for p in harness.processes(pid):
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += sum(int(f) for f in fields[11:15])  # utime stime cutime cstime
    return total / os.sysconf("SC_CLK_TCK")


def loadavg() -> list[float]:
    return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]


def _ms(value: str) -> float:
    m = re.match(r"([\d.]+)(us|ms|s)", value)
    if not m:
        return float("nan")
    x, unit = float(m.group(1)), m.group(2)
    return x / 1000 if unit == "us" else x * 1000 if unit == "s" else x


def wrk(url: str, body: Body, conns: int, seconds: float, pid: int) -> dict[str, Any]:
    cmd = ["wrk", "-t1", f"-c{conns}", f"-d{round(seconds)}s", "--timeout", "10s", "--latency"]
    cmd += ["-s", str(LUA), url, "--", str(body.path), body.content_type]
    cmd += [f"{k}: {v}" for k, v in body.headers]
    load = loadavg()[0]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu0, t0 = cpu_seconds(pid), time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    wall, cpu1 = time.perf_counter() - t0, cpu_seconds(pid)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    wrk_cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    lat = dict(re.findall(r"^\s+(50|99)%\s+(\S+)", out, re.M))
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    total = re.search(r"(\d+) requests in", out)
    refused = int(non2xx.group(1)) if non2xx else 0
    # Only 2xx answers count as served: a service shedding load (503) answers fast but serves
    # nothing, and `Requests/sec` counts those refusals too.
    ok_share = 1.0 - refused / int(total.group(1)) if total and int(total.group(1)) else 1.0
    answered = max(1.0, rps * ok_share * wall) * body.images
    return {
        "rps": round(rps, 1),
        "ok_rps": round(rps * ok_share, 1),
        "images_per_s": round(rps * ok_share * body.images, 1),
        "p50_ms": round(_ms(lat.get("50", "")), 2),
        "p99_ms": round(_ms(lat.get("99", "")), 2),
        "errors": refused + (sum(map(int, sock.groups())) if sock else 0),
        "wrk_cpu_pct": round(100 * wrk_cpu / wall, 1),
        "server_cpu_pct": round(100 * (cpu1 - cpu0) / wall, 1),
        "server_cpu_ms_per_image": round(1000 * (cpu1 - cpu0) / answered, 3),
        "load_average_1m": load,
    }


# -- the servers -----------------------------------------------------------------------------


@dataclass
class Target:
    """One server set-up: how to start it, where to POST, which bodies at which connections."""

    label: str
    group: str  # "isomax" or "peer"
    note: str  # how it is set up, for the results
    cmd: list[str]
    path: str
    runs: list[tuple[str, int]]  # (body key, connections)
    answer: Callable[[bytes], tuple[int, float]]
    env: dict[str, str] = field(default_factory=dict)
    port_args: Callable[[int], tuple[list[str], dict[str, str]]] = lambda p: (
        ["--port", str(p)],
        {},
    )
    start_timeout: float = 120.0
    missing: str | None = None  # why it cannot run here (venv absent)
    workers: int = 0  # isomax serve's worker processes: ready when each has its models ready


def peer_python(name: str) -> tuple[str, str | None]:
    venv = PEERS / name
    py = venv / "bin" / "python"
    if (venv / ".installed").is_file() and py.is_file():
        return str(py), None
    return str(py), f"no venv at {venv} (run bash bench/peers/setup.sh {name})"


def targets(args: argparse.Namespace, models_dir: Path, manifest: Manifest) -> list[Target]:
    py = sys.executable
    serve = [py, "-m", "isomax", "serve", "--host", harness.HOST, "--models-dir", str(models_dir)]
    serve += ["--models", manifest.name, "--device", "cpu"]
    single = [("raw", 32), ("raw", 128), ("multipart", 32), ("multipart", 128)]
    extra = [("multipart-8", 32), ("multipart-8", 128)] if args.full else []
    out = [
        Target("isomax serve, 1 worker", "isomax", "defaults", serve, "/classify",
               single + extra, answer_isomax, workers=1),
        Target("isomax serve, 2 workers", "isomax", "--workers 2", [*serve, "--workers", "2"],
               "/classify", single + extra, answer_isomax, workers=2),
    ]  # fmt: skip
    if args.full:
        out.append(
            Target("isomax serve, batching off", "isomax", "1 worker, --max-batch-size 1",
                   [*serve, "--max-batch-size", "1"], "/classify", single[:3], answer_isomax,
                   workers=1)
        )  # fmt: skip
    mp = [("multipart", 32), ("multipart", 128)]
    uvicorn = [py, "-m", "uvicorn", "bench.peers.fastapi_naive:app", "--host", harness.HOST]
    uvicorn += ["--log-level", "warning", "--no-access-log"]
    for threads, note in (("0", "onnxruntime's default threads"), ("1", "1 onnxruntime thread")):
        out.append(
            Target(f"naive FastAPI ({note})", "peer",
                   "UploadFile + PIL + one session.run per request, no batching",
                   uvicorn, "/classify", mp, answer_flat, env={"BENCH_THREADS": threads})
        )  # fmt: skip
    bento_py, missing = peer_python("bentoml")
    bento_env = {"BENTOML_HOME": str(OUT / "bentoml-home"), "BENTOML_DO_NOT_TRACK": "True"}
    for service, note, body in (
        ("Classifier", "quickstart default: onnxruntime's default threads, no batching",
         "multipart"),
        ("BatchedClassifier", "1 onnxruntime thread, adaptive batching (batchable=True, max 32)",
         "bentoml-images"),
    ):  # fmt: skip
        out.append(
            Target(f"BentoML 1.4 ({service})", "peer", note,
                   [bento_py, "-m", "bentoml", "serve", f"bench.peers.bentoml_service:{service}",
                    "--host", harness.HOST], "/classify", [(body, 32), (body, 128)],
                   answer_flat, env=bento_env, missing=missing)
        )  # fmt: skip
    ml_py, missing = peer_python("mlserver")
    for workers, note in (
        ("1", "its default: inference in 1 worker process (parallel_workers=1)"),
        ("0", "inference in the server process (parallel_workers=0), no IPC"),
    ):
        out.append(
            Target(f"Seldon MLServer 1.7 (parallel_workers={workers})", "peer",
                   f"custom runtime, adaptive batching (max 32, 2 ms), 1 onnxruntime thread; {note}",
                   [str(Path(ml_py).parent / "mlserver"), "start", "bench/peers/mlserver"],
                   "/v2/models/classifier/infer", [("v2-json", 32), ("v2-json", 128)], answer_v2,
                   env={"MLSERVER_PARALLEL_WORKERS": workers},
                   port_args=lambda p: ([], {
                       "MLSERVER_HTTP_PORT": str(p),
                       "MLSERVER_GRPC_PORT": str(harness.free_port()),
                       "MLSERVER_METRICS_PORT": str(harness.free_port()),
                       "MLSERVER_HOST": harness.HOST,
                   }), missing=missing)
        )  # fmt: skip
    ray_py, missing = peer_python("ray")
    out.append(
        Target("Ray Serve", "peer",
               "1 replica, @serve.batch (max 32, 2 ms), 1 onnxruntime thread, raw PNG body",
               [ray_py, "bench/peers/ray_serve.py"], "/classify", [("raw", 32), ("raw", 128)],
               answer_flat, env={"RAY_USAGE_STATS_ENABLED": "0"}, start_timeout=180,
               missing=missing)
    )  # fmt: skip
    triton_py, missing = peer_python("triton")
    for model, body, what in (("classifier_png", "triton-png", "PNG as BYTES, Pillow decode"),
                              ("classifier_fp32", "triton-fp32", "FP32 tensor")):  # fmt: skip
        out.append(
            Target(f"Triton 2.51, Python backend ({what})", "peer",
                   "nvidia-pytriton, dynamic batcher (max 32, 500 us), 1 onnxruntime thread",
                   [triton_py, "bench/peers/triton_server.py", "--model", model],
                   f"/v2/models/{model}/infer", [(body, 32), (body, 128)], answer_v2,
                   start_timeout=180, missing=missing)
        )  # fmt: skip
    if args.only:
        wanted = [w.strip().lower() for w in args.only.split(",")]
        out = [t for t in out if any(w in t.label.lower() for w in wanted)]
    return out


def expected_answer(model: Path, png: bytes) -> tuple[int, float]:
    sess = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    logits, dist = sess.run(["logits", "min_distance"], {"image": png_array(png)})
    return int(logits[0].argmax()), float(dist[0])


def run_target(
    t: Target, bodies: dict[str, Body], env: dict[str, str], args: argparse.Namespace,
    expected: tuple[int, float],
) -> list[dict[str, Any]]:  # fmt: skip
    port = harness.free_port()
    extra_args, extra_env = t.port_args(port)
    first = bodies[t.runs[0][0]]

    every_worker = harness.every_worker_ready(t.workers) if t.workers else None

    def ready(server: harness.Server) -> bool:
        if every_worker is not None and not every_worker(server):
            return False  # one worker's 200 says nothing about the others
        return first.post(server, t.path)[0] == 200

    log = OUT / "logs" / (re.sub(r"\W+", "_", t.label).strip("_") + ".log")
    rows = []
    with harness.serve(
        [*t.cmd, *extra_args], port, log, env={**env, **t.env, **extra_env},
        ready=ready, timeout=t.start_timeout,
    ) as server:  # fmt: skip
        _status, answer = first.post(server, t.path)
        got = t.answer(answer)
        same = got[0] == expected[0] and abs(got[1] - expected[1]) <= 1e-4
        if not same:
            print(f"  ! {t.label}: answered {got}, raw onnxruntime {expected}", flush=True)
        url = server.url + t.path
        wrk(url, first, 32, 2, server.proc.pid)  # warm-up
        for key, conns in t.runs:
            body = bodies[key]
            r = wrk(url, body, conns, args.duration, server.proc.pid)
            r = {"server": t.label, "group": t.group, "setup": t.note, "request": body.kind,
                 "connections": conns, "images_per_request": body.images,
                 "answer_matches_onnxruntime": same, **r}  # fmt: skip
            rows.append(r)
            print(f"  {body.kind:28} c={conns:<3} {r['images_per_s']:8.0f} images/s  "
                  f"p50 {r['p50_ms']:7.2f} p99 {r['p99_ms']:7.2f} ms  "
                  f"cpu {r['server_cpu_ms_per_image']:.3f} ms/image  errors {r['errors']}",
                  flush=True)  # fmt: skip
    return rows


# -- the run ---------------------------------------------------------------------------------


def main() -> int:
    global PEERS
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--duration", type=float, default=8.0, help="seconds per wrk run")
    ap.add_argument("--full", action="store_true", help="also 8-image requests, batching off")
    ap.add_argument("--only", help="comma-separated parts of server labels to run (e.g. isomax)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--name", default="serving", help="results file name (NAME.json, NAME.md)")
    ap.add_argument(
        "--peers-dir", type=Path, help="the peers' venvs (default bench/out/peers, from setup.sh)"
    )
    args = ap.parse_args()
    if args.peers_dir is not None:
        PEERS = args.peers_dir.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    cores = len(os.sched_getaffinity(0))
    load_before = loadavg()

    bundle, source = pick_bundle()
    manifest = Manifest.read(bundle)
    model_path = bundle / manifest.onnx.file
    print(f"model: {manifest.name}:{manifest.version} ({source}); load {load_before}", flush=True)
    png = test_png(bundle)
    x1 = png_array(png)
    bodies = write_bodies(png)
    expected = expected_answer(model_path, png)

    no_dist = without_distance(model_path, OUT / "model_no_min_distance.onnx")
    variants = {
        "batch1_images_per_s": (model_path, 1, cores),
        "batch32_images_per_s": (model_path, 32, cores),
        "batch32_1thread_images_per_s": (model_path, 32, 1),
        "no_min_distance_batch1_images_per_s": (no_dist, 1, cores),
        "no_min_distance_batch32_images_per_s": (no_dist, 32, cores),
    }
    raw_start = raw_ort(x1, variants)
    print("raw onnxruntime:", raw_start, flush=True)

    env = harness.service_env(
        BENCH_MODEL=str(model_path), BENCH_THRESHOLD=str(manifest.calibration.threshold)
    )
    rows: list[dict[str, Any]] = []
    skipped: dict[str, str] = {}
    for t in targets(args, bundle.parent.parent, manifest):
        if t.missing:
            print(f"{t.label}: skipped, {t.missing}", flush=True)
            skipped[t.label] = t.missing
            continue
        print(f"{t.label} ({t.note})", flush=True)
        try:
            rows += run_target(t, bodies, env, args, expected)
        except (
            RuntimeError,
            TimeoutError,
            subprocess.CalledProcessError,
            ValueError,
            KeyError,
        ) as e:
            print(f"  ! {t.label} failed: {e}", flush=True)
            skipped[t.label] = f"failed: {str(e)[-500:]}"

    raw_end = raw_ort(x1, {k: variants[k] for k in ("batch32_images_per_s",)})
    print("raw onnxruntime at the end:", raw_end, flush=True)
    ref = (raw_start["batch32_images_per_s"] + raw_end["batch32_images_per_s"]) / 2
    for r in rows:
        r["vs_raw_onnxruntime"] = round(r["images_per_s"] / ref, 3)

    result = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "seconds": round(time.monotonic() - started),
        "machine": {
            "cpu": next(
                (
                    line.split(":", 1)[1].strip()
                    for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name")
                ),
                platform.processor(),
            ),
            "cores": cores,
            "python": platform.python_version(),
            "onnxruntime": ort.__version__,
            "load_average_before": load_before,
            "load_average_after": loadavg(),
        },
        "model": {"name": manifest.name, "version": manifest.version, "source": source},
        "wrk": f"wrk 4.1, 1 thread, --latency; {args.duration:.0f} s per run after 2 s warm-up",
        "raw_onnxruntime": {
            "start": raw_start,
            "end": raw_end,
            "batch32_images_per_s_reference": round(ref),
        },
        "runs": rows,
        "skipped": skipped,
        "summary": summary(rows),
    }
    (args.out / f"{args.name}.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / f"{args.name}.md").write_text(markdown(result))
    print((args.out / f"{args.name}.md").read_text())
    return 0


def summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The issue's goals, read off the rows: ratios to raw onnxruntime and to the best peer."""

    def pick(server: str, request: str, conns: int) -> dict[str, Any] | None:
        return next(
            (r for r in rows if r["server"] == server and r["request"] == request
             and r["connections"] == conns), None,
        )  # fmt: skip

    out: dict[str, Any] = {}
    for workers in (1, 2):
        label = f"isomax serve, {workers} worker" + ("s" if workers > 1 else "")
        for request in ("raw image/png", "multipart"):
            r32, r128 = pick(label, request, 32), pick(label, request, 128)
            key = f"{workers}w_{'raw' if request.startswith('raw') else 'multipart'}"
            if r32:
                out[f"{key}_32_vs_raw_onnxruntime"] = r32["vs_raw_onnxruntime"]
            if r128:
                out[f"{key}_128_p99_ms"] = r128["p99_ms"]
    single = [r for r in rows if r["images_per_request"] == 1]
    for conns in (32, 128):
        peers = [r for r in single if r["group"] == "peer" and r["connections"] == conns]
        if not peers:
            continue
        best = max(peers, key=lambda r: r["images_per_s"])
        out[f"best_peer_{conns}"] = {
            k: best[k]
            for k in ("server", "request", "images_per_s", "p99_ms", "server_cpu_ms_per_image")
        }
        for workers in (1, 2):
            label = f"isomax serve, {workers} worker" + ("s" if workers > 1 else "")
            ours = [r for r in single if r["server"] == label and r["connections"] == conns]
            if ours:
                top = max(ours, key=lambda r: r["images_per_s"])
                out[f"{workers}w_vs_best_peer_{conns}"] = {
                    "images_per_s": round(top["images_per_s"] / best["images_per_s"], 2),
                    "cpu_per_image": round(
                        best["server_cpu_ms_per_image"] / top["server_cpu_ms_per_image"], 2
                    ),
                }
    return out


def headline(runs: list[dict[str, Any]]) -> list[str]:
    """One table row per server: its best single-image request form at 32 and 128 connections."""
    lines = []
    for server in dict.fromkeys(x["server"] for x in runs):
        best = {}
        for conns in (32, 128):
            rows = [x for x in runs if x["server"] == server and x["connections"] == conns
                    and x["images_per_request"] == 1]  # fmt: skip
            if rows:
                best[conns] = max(rows, key=lambda x: x["images_per_s"])
        if 32 not in best:
            continue
        cells = [
            f"{best[c]['images_per_s']:.0f}, {best[c]['p99_ms']:.0f}" if c in best else "-"
            for c in (32, 128)
        ]
        lines.append(
            f"| {server} ({best[32]['request']}) | {cells[0]} | {cells[1]} | "
            f"{best[32]['vs_raw_onnxruntime']:.2f} | {best[32]['server_cpu_ms_per_image']} |"
        )
    return lines


def markdown(r: dict[str, Any]) -> str:
    m, raw = r["machine"], r["raw_onnxruntime"]
    s = raw["start"]
    lines = [
        "# Serving benchmark",
        "",
        f"{r['date']}, {r['seconds']} s in all; {m['cpu']}, {m['cores']} cores; Python "
        f"{m['python']}, onnxruntime {m['onnxruntime']}; load average before "
        f"{m['load_average_before']}, after {m['load_average_after']}.",
        f"Model: {r['model']['name']}:{r['model']['version']} ({r['model']['source']}).",
        f"Load generator: {r['wrk']}. Produced by `bench/serve_bench.py`.",
        "",
        "## Raw onnxruntime (in process, no HTTP, no decoding)",
        "",
        "Best of 6 interleaved 0.5 s rounds per row; batch 32 measured again at the end.",
        "",
        f"| batch 1, {m['cores']} threads | batch 32, {m['cores']} threads | batch 32, 1 thread "
        "| batch 32 at the end | reference (mean of the batch-32 figures) |",
        "| ---: | ---: | ---: | ---: | ---: |",
        f"| {s['batch1_images_per_s']} | {s['batch32_images_per_s']} | "
        f"{s['batch32_1thread_images_per_s']} | {raw['end']['batch32_images_per_s']} | "
        f"{raw['batch32_images_per_s_reference']} |",
        "",
        "The same graph without the `min_distance` output (the cost of the OOD score): "
        f"{s['no_min_distance_batch1_images_per_s']} images/s at batch 1, "
        f"{s['no_min_distance_batch32_images_per_s']} at batch 32.",
        "",
        "## Headline: one PNG per request, each server's best request form",
        "",
        "| server | 32 connections: images/s, p99 ms | 128 connections: images/s, p99 ms "
        "| vs raw ORT b32 (32 conns) | server CPU ms/image |",
        "| --- | --- | --- | ---: | ---: |",
        *headline(r["runs"]),
        "",
        "## HTTP (wrk), one 28x28 PNG per request unless said otherwise",
        "",
        "| server | request | conns | images/s | p50 ms | p99 ms | vs raw ORT b32 | errors "
        "| server CPU ms/image | server CPU | wrk CPU | load |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for x in r["runs"]:
        mark = "" if x["answer_matches_onnxruntime"] else " (answer differs!)"
        lines.append(
            f"| {x['server']}{mark} | {x['request']} | {x['connections']} | "
            f"{x['images_per_s']:.0f} | {x['p50_ms']} | {x['p99_ms']} | "
            f"{x['vs_raw_onnxruntime']:.2f} | {x['errors']} | {x['server_cpu_ms_per_image']} | "
            f"{x['server_cpu_pct']}% | {x['wrk_cpu_pct']}% | {x['load_average_1m']} |"
        )
    setups = {x["server"]: x["setup"] for x in r["runs"]}
    lines += ["", "## Set-ups", ""]
    lines += [f"- {k}: {v}" for k, v in setups.items()]
    lines += [f"- {k}: not run, {v}" for k, v in r["skipped"].items()]
    lines += ["", "## Summary", "", "```", json.dumps(r["summary"], indent=2), "```", ""]
    lines += [
        "CPU columns: % of one core, averaged over the run (the machine has "
        f"{m['cores']}); server CPU ms/image is the CPU time of every process of the server "
        "per image answered, which depends less on other load than the rates do; load = "
        "1-minute load average when the run started. Every server's answer was checked "
        "against raw onnxruntime (same class, min_distance within 1e-4) before the runs.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
