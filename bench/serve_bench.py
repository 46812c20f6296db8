"""Serving benchmark: `isomax serve` under wrk vs raw onnxruntime and peers, same machine and run.

    .venv/bin/python bench/serve_bench.py                      # ~4 minutes on 2 cores
    .venv/bin/python bench/serve_bench.py --quick              # fewer configurations
    .venv/bin/python bench/serve_bench.py --bentoml-python /tmp/bentovenv/bin/python

What runs, in order, each on an otherwise idle server process:
  1. raw onnxruntime in this process (no HTTP, no decoding): images/s at batch 1 and 32, with all
     cores, for the model with and without its min_distance output (the cost of the OOD score);
  2. `isomax serve` (uvicorn) under wrk: raw image/png bodies and multipart/form-data, one and
     eight images per request, 32 and 128 connections; with 1 and 2 workers; and with batching
     off (max_batch_size=1) to show what batching buys;
  3. peers, run the same way with the same PNG: the naive FastAPI prototype
     (bench/peers/fastapi_naive.py) and, when a Python with BentoML 1.4 is given, BentoML.

The model is the default bundle (models/fmnist-isomaxplus, newest version) when it exists, else
a stand-in with its architecture and cost (bench/standin_model.py). wrk runs with one thread;
its CPU use is recorded next to each result to show it is not the bottleneck. The load average
before and after is recorded: other processes on the machine skew everything.
Results: bench/results/serving.json and bench/results/serving.md.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import re
import resource
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager, suppress
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

OUT = REPO / "bench" / "out"
RESULTS = REPO / "bench" / "results"
LUA = REPO / "bench" / "wrk_post.lua"
DEFAULT_MODEL = "fmnist-isomaxplus"
BOUNDARY = "isomaxbenchboundary"


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
    mode = spec.color_mode
    buf = io.BytesIO()
    Image.fromarray(img.astype(np.uint8)).convert(mode).save(buf, "PNG")
    return buf.getvalue()


def multipart(png: bytes, n: int) -> bytes:
    part = (
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="x{{i}}.png"\r\n'
        "Content-Type: image/png\r\n\r\n"
    )
    body = b"".join(part.format(i=i).encode() + png + b"\r\n" for i in range(n))
    return body + f"--{BOUNDARY}--\r\n".encode()


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
    variants: dict[str, tuple[Path, int, int]], rounds: int = 6, seconds: float = 0.5
) -> dict[str, int]:
    """Images/s of back-to-back session.run calls, per variant (model, batch, threads).

    The variants are measured in interleaved rounds and each keeps its best round, so that a
    burst of other load on the machine hits all of them alike instead of skewing one.
    """
    runs = {}
    for name, (model_path, batch, threads) in variants.items():
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        sess = ort.InferenceSession(str(model_path), opts, providers=["CPUExecutionProvider"])
        shape = sess.get_inputs()[0].shape
        channels = shape[1] if len(shape) == 4 and isinstance(shape[1], int) else 1
        x = np.random.default_rng(0).random((batch, channels, 28, 28), dtype=np.float32)
        for _ in range(10):
            sess.run(None, {"image": x})
        runs[name] = (sess, x)
    best = dict.fromkeys(variants, 0.0)
    for _ in range(rounds):
        for name, (sess, x) in runs.items():
            n, t0 = 0, time.perf_counter()
            while time.perf_counter() - t0 < seconds:
                sess.run(None, {"image": x})
                n += 1
            best[name] = max(best[name], n * len(x) / (time.perf_counter() - t0))
    return {k: round(v) for k, v in best.items()}


# -- servers and load ------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def descendants(pid: int) -> list[int]:
    """pid and every process below it (uvicorn workers, BentoML's process tree)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        with suppress(OSError):
            todo += [int(c) for c in Path(f"/proc/{p}/task/{p}/children").read_text().split()]
    return out


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process tree."""
    total = 0.0
    for p in descendants(pid):
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except OSError:
            pass
    return total


@contextmanager
def server(cmd: list[str], port: int, env: dict[str, str], log: Path):
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"{cmd[:4]} exited: {log.read_text()[-2000:]}")
            try:
                status = _get_status(port, "/readyz")
                if status in (200, 404):  # peers have no /readyz: 404 means up
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"{cmd[:4]} not ready: {log.read_text()[-2000:]}")
            time.sleep(0.2)
        yield proc
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _get_status(port: int, path: str) -> int:
    with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        head = s.recv(64).decode("latin-1")
    m = re.match(r"HTTP/1\.[01] (\d+)", head)
    return int(m.group(1)) if m else 0


def _ms(value: str) -> float:
    m = re.match(r"([\d.]+)(us|ms|s)", value)
    if not m:
        return float("nan")
    x, unit = float(m.group(1)), m.group(2)
    return x / 1000 if unit == "us" else x * 1000 if unit == "s" else x


def wrk(url: str, body: Path, ctype: str, conns: int, seconds: float, pid: int) -> dict[str, Any]:
    cmd = ["wrk", "-t1", f"-c{conns}", f"-d{round(seconds)}s", "--timeout", "10s", "--latency"]
    cmd += ["-s", str(LUA), url]
    cmd += ["--", str(body), ctype]
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
    return {
        "rps": round(rps, 1),
        "p50_ms": round(_ms(lat.get("50", "")), 2),
        "p99_ms": round(_ms(lat.get("99", "")), 2),
        "non_2xx": int(non2xx.group(1)) if non2xx else 0,
        "socket_errors": sum(map(int, sock.groups())) if sock else 0,
        "wrk_cpu_pct": round(100 * wrk_cpu / wall, 1),
        "server_cpu_pct": round(100 * (cpu1 - cpu0) / wall, 1),
        "server_cpu_ms_per_request": round(1000 * (cpu1 - cpu0) / max(1.0, rps * wall), 3),
        "load_average_1m": load,
    }


def loadavg() -> list[float]:
    return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]


# -- the run ---------------------------------------------------------------------------------


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--duration", type=float, default=8.0, help="seconds per wrk run")
    ap.add_argument("--quick", action="store_true", help="only the headline configurations")
    ap.add_argument("--bentoml-python", help="a Python with bentoml 1.4 installed (optional peer)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    py = sys.executable
    cores = len(os.sched_getaffinity(0))
    load_before = loadavg()

    bundle, source = pick_bundle()
    manifest = Manifest.read(bundle)
    model_path = bundle / manifest.onnx.file
    print(f"model: {manifest.name}:{manifest.version} ({source}); load {load_before}", flush=True)

    # 1. Raw onnxruntime, and the cost of min_distance.
    no_dist = without_distance(model_path, OUT / "model_no_min_distance.onnx")
    raw = raw_ort(
        {
            "batch1_images_per_s": (model_path, 1, cores),
            "batch32_images_per_s": (model_path, 32, cores),
            "batch32_1thread_images_per_s": (model_path, 32, 1),
            "no_min_distance_batch1_images_per_s": (no_dist, 1, cores),
            "no_min_distance_batch32_images_per_s": (no_dist, 32, cores),
        }
    )
    print("raw onnxruntime:", raw, flush=True)

    png = test_png(bundle)
    bodies = {
        "raw": (OUT / "one.png", png, "image/png", 1),
        "multipart": (
            OUT / "one.multipart",
            multipart(png, 1),
            f"multipart/form-data; boundary={BOUNDARY}",
            1,
        ),
        "multipart-8": (
            OUT / "eight.multipart",
            multipart(png, 8),
            f"multipart/form-data; boundary={BOUNDARY}",
            8,
        ),
    }
    for path, data, _, _ in bodies.values():
        path.write_bytes(data)

    models_dir = bundle.parent.parent
    base_env = {k: v for k, v in os.environ.items() if not k.startswith("ISOMAX_")}
    serve = [py, "-m", "isomax", "serve", "--host", "127.0.0.1", "--models-dir", str(models_dir)]
    serve += ["--models", manifest.name, "--log-level", "warning", "--device", "cpu"]
    # (label, command extra, kinds x connections)
    full = [
        ("raw", 32),
        ("raw", 128),
        ("multipart", 32),
        ("multipart", 128),
        ("multipart-8", 32),
        ("multipart-8", 128),
    ]
    configs: list[tuple[str, list[str], list[tuple[str, int]]]] = [
        ("isomax serve (1 worker)", [], full),
        (
            "isomax serve (2 workers)",
            ["--workers", "2"],
            full if not args.quick else [("raw", 32), ("multipart", 32)],
        ),
    ]
    if not args.quick:
        configs.append(
            ("isomax serve, batching off (1 worker, max_batch_size=1)", ["--max-batch-size", "1"],
             [("raw", 32), ("raw", 128), ("multipart", 32)])
        )  # fmt: skip

    rows: list[dict[str, Any]] = []

    def run_all(
        label: str,
        cmd: list[str],
        port: int,
        env: dict[str, str],
        runs: list[tuple[str, int]],
        path: str,
    ) -> None:
        log = OUT / (re.sub(r"\W+", "_", label) + ".log")
        with server(cmd, port, env, log) as proc:
            url = f"http://127.0.0.1:{port}{path}"
            wrk(url, bodies["multipart"][0], bodies["multipart"][2], 32, 2, proc.pid)  # warm-up
            for kind, conns in runs:
                path_, _, ctype, n_img = bodies[kind]
                r = wrk(url, path_, ctype, conns, args.duration, proc.pid)
                r.update(server=label, request=kind, images_per_request=n_img, connections=conns)
                r["images_per_s"] = round(r["rps"] * n_img, 1)
                r["server_cpu_ms_per_image"] = round(r.pop("server_cpu_ms_per_request") / n_img, 3)
                r["vs_raw_onnxruntime"] = round(r["images_per_s"] / raw["batch32_images_per_s"], 3)
                rows.append(r)
                print(json.dumps(r), flush=True)

    for label, extra, runs in configs:
        port = free_port()
        run_all(label, [*serve, "--port", str(port), *extra], port, base_env, runs, "/classify")

    # 3. Peers, multipart with the same PNG.
    peer_env = {
        **base_env,
        "BENCH_MODEL": str(model_path),
        "BENCH_THRESHOLD": str(manifest.calibration.threshold),
    }
    peer_runs = [("multipart", 32), ("multipart", 128)]
    for label, threads in (("", "0"), (", 1 onnxruntime thread", "1")):
        port = free_port()
        uvicorn = [py, "-m", "uvicorn", "bench.peers.fastapi_naive:app", "--host", "127.0.0.1"]
        uvicorn += ["--port", str(port), "--log-level", "warning", "--no-access-log"]
        env = {**peer_env, "BENCH_THREADS": threads}
        run_all(f"peer: naive FastAPI prototype{label}", uvicorn, port, env, peer_runs, "/classify")
    if args.bentoml_python:
        port = free_port()
        bento = [
            args.bentoml_python,
            "-m",
            "bentoml",
            "serve",
            "bench.peers.bentoml_service:Classifier",
            "--port",
            str(port),
            "--host",
            "127.0.0.1",
        ]
        run_all(
            "peer: BentoML",
            bento,
            port,
            peer_env,
            peer_runs,
            "/classify",
        )

    result = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
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
        "wrk": f"wrk 4.1 (Debian), 1 thread, --latency; {args.duration:.0f} s per run",
        "raw_onnxruntime": raw,
        "min_distance_cost": {
            "batch1": round(
                1 - raw["batch1_images_per_s"] / raw["no_min_distance_batch1_images_per_s"], 3
            ),
            "batch32": round(
                1 - raw["batch32_images_per_s"] / raw["no_min_distance_batch32_images_per_s"], 3
            ),
        },
        "runs": rows,
    }
    (args.out / "serving.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "serving.md").write_text(markdown(result))
    print((args.out / "serving.md").read_text())
    return 0


def markdown(r: dict[str, Any]) -> str:
    m, raw = r["machine"], r["raw_onnxruntime"]
    lines = [
        "# Serving benchmark",
        "",
        f"{r['date']}; {m['cpu']}, {m['cores']} cores; Python {m['python']}, onnxruntime "
        f"{m['onnxruntime']}; load average before {m['load_average_before']}, after "
        f"{m['load_average_after']}.",
        f"Model: {r['model']['name']}:{r['model']['version']} ({r['model']['source']}).",
        f"Load generator: {r['wrk']}.",
        "",
        "## Raw onnxruntime (in process, no HTTP, no decoding)",
        "",
        "Best of 6 interleaved 0.5 s rounds per row.",
        "",
        "| | images/s |",
        "| --- | ---: |",
        f"| batch 1, {m['cores']} threads | {raw['batch1_images_per_s']} |",
        f"| batch 32, {m['cores']} threads | {raw['batch32_images_per_s']} |",
        f"| batch 32, 1 thread | {raw['batch32_1thread_images_per_s']} |",
        f"| batch 1, without min_distance | {raw['no_min_distance_batch1_images_per_s']} |",
        f"| batch 32, without min_distance | {raw['no_min_distance_batch32_images_per_s']} |",
        "",
        f"Cost of the min_distance output: {100 * r['min_distance_cost']['batch1']:.1f}% of "
        f"throughput at batch 1, {100 * r['min_distance_cost']['batch32']:.1f}% at batch 32 "
        "(negative = within noise).",
        "",
        "## HTTP (wrk)",
        "",
        "| server | request | conns | requests/s | images/s | p50 ms | p99 ms "
        "| vs raw ORT b32 | errors | wrk CPU | server CPU | server CPU ms/image | load |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for x in r["runs"]:
        lines.append(
            f"| {x['server']} | {x['request']} | {x['connections']} | {x['rps']:.0f} | "
            f"{x['images_per_s']:.0f} | {x['p50_ms']} | {x['p99_ms']} | "
            f"{x['vs_raw_onnxruntime']:.2f} | "
            f"{x['non_2xx'] + x['socket_errors']} | {x['wrk_cpu_pct']}% | {x['server_cpu_pct']}% | "
            f"{x['server_cpu_ms_per_image']} | {x['load_average_1m']} |"
        )
    lines += [
        "",
        "requests: `raw` = one PNG as an image/png body; `multipart` = one PNG as a multipart part "
        "named `file`; `multipart-8` = eight PNGs in one multipart request. CPU columns: % of one "
        f"core, averaged over the run (the machine has {m['cores']}); server CPU ms/image is the "
        "server's CPU time (all processes and threads) per image answered, which depends less on "
        "other load than the rates do; load = 1-minute load average when the run started.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
