"""Which HTTP server layer: requests/s of POST /classify under wrk for each candidate, same run.

    .venv/bin/python bench/http_layer_bench.py                 # 3 rounds x 8 s per layer
    .venv/bin/python bench/http_layer_bench.py --rounds 1 --duration 4

Candidates (the app and the model are the same; only the layer that parses HTTP changes):
  httptools  uvicorn's httptools protocol as it was: no head limit, no head or body timeout;
  limited    service/http_protocol.py, the same parser plus those limits (what `isomax serve` runs);
  h11        uvicorn's pure-Python h11 protocol, head bounded by h11_max_incomplete_event_size;
  granian    granian's Rust HTTP/1 server (ASGI interface), header read timeout set.
Rounds alternate the candidates (A B C D, A B C D, ...) so that a change in the machine's load
hits all of them alike; the median of the rounds is reported, with the load average. The figure
to compare is the server's CPU time per request (its processes' user + system time over the
run / requests answered): on a shared machine req/s swing with other jobs, CPU per request much
less. One 28x28
PNG per request as the raw body, 32 connections, one uvicorn/granian worker, wrk with one thread.
Results: bench/results/http_layer.json and bench/results/http_layer.md.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import statistics
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.serve_bench import cpu_seconds  # noqa: E402
from tests import harness  # noqa: E402

RESULTS = REPO / "bench" / "results"
LUA = REPO / "bench" / "wrk_post.lua"

UVICORN = """
import sys, uvicorn
from service import http_protocol
from service.app import app_from_env
http = sys.argv[2]
kw = {}
if http == "limited":
    http = http_protocol.LimitedHttpToolsProtocol
elif http == "h11":
    kw["h11_max_incomplete_event_size"] = 32 * 1024
uvicorn.run(app_from_env(), host="127.0.0.1", port=int(sys.argv[1]), http=http,
            log_level="warning", **kw)
"""


def loadavg() -> float:
    return float(Path("/proc/loadavg").read_text().split()[0])


def command(layer: str, port: int) -> list[str]:
    if layer == "granian":
        cmd = [
            str(Path(sys.executable).parent / "granian"), "--interface", "asgi", "--factory",
            "--host", "127.0.0.1", "--port", str(port), "--workers", "1", "--http", "1",
            "--http1-header-read-timeout", "10000", "--log-level", "warning",
            "service.app:app_from_env",
        ]  # fmt: skip
    else:
        cmd = [sys.executable, "-c", UVICORN, str(port), layer]
    return cmd


def wrk(port: int, body: Path, conns: int, seconds: int, pid: int) -> dict[str, Any]:
    cmd = ["wrk", "-t1", f"-c{conns}", f"-d{seconds}s", "--latency", "-s", str(LUA)]
    cmd += [f"http://127.0.0.1:{port}/classify", "--", str(body), "image/png"]
    cpu0 = cpu_seconds(pid)
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    cpu = cpu_seconds(pid) - cpu0
    total = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    p99 = re.search(r"^\s+99%\s+(\S+)", out, re.M)
    return {
        "rps": rps,
        # robust to other processes on the machine, unlike req/s
        "server_cpu_us_per_request": round(1e6 * cpu / max(total, 1), 1),
        "non_2xx": int(non2xx.group(1)) if non2xx else 0,
        "p99": p99.group(1) if p99 else None,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--duration", type=int, default=8)
    ap.add_argument("--connections", type=int, default=32)
    ap.add_argument("--layers", default="httptools,limited,h11,granian")
    args = ap.parse_args()
    layers = args.layers.split(",")

    out_dir = REPO / "bench" / "out"
    out_dir.mkdir(parents=True, exist_ok=True)
    body = out_dir / "http_layer.png"
    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8), "L").save(buf, "PNG")
    body.write_bytes(buf.getvalue())

    env = {k: v for k, v in os.environ.items() if not k.startswith("ISOMAX_")}
    env.update(ISOMAX_MODELS_DIR=str(REPO / "models"), ISOMAX_LOG_LEVEL="warning")
    runs: dict[str, list[dict[str, Any]]] = {layer: [] for layer in layers}
    load_before = loadavg()
    for r in range(args.rounds):
        for layer in layers:
            port = harness.free_port()
            log = out_dir / f"http_layer-{layer}.log"
            with harness.serve(command(layer, port), port, log, env=env) as server:
                pid = server.proc.pid
                wrk(port, body, args.connections, 2, pid)  # warm-up
                res = wrk(port, body, args.connections, args.duration, pid)
                res["load_1m"] = loadavg()
                runs[layer].append(res)
                print(f"round {r + 1} {layer:10s} {res}", flush=True)
    summary = {
        layer: {
            "median_rps": round(statistics.median(x["rps"] for x in rs), 1),
            "median_cpu_us_per_request": round(
                statistics.median(x["server_cpu_us_per_request"] for x in rs), 1
            ),
            "runs": rs,
        }
        for layer, rs in runs.items()
    }
    base = summary.get("httptools", {}).get("median_cpu_us_per_request")
    result = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "cpus": os.cpu_count(),
        "load_1m_before": load_before,
        "load_1m_after": loadavg(),
        "connections": args.connections,
        "duration_s": args.duration,
        "rounds": args.rounds,
        "layers": summary,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "http_layer.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        "# HTTP server layer: POST /classify, server CPU per request (one 28x28 PNG, raw body)",
        "",
        f"{result['date']}, {result['cpus']} CPUs, {args.connections} connections, "
        f"{args.rounds} rounds x {args.duration} s, median of rounds; load average "
        f"{load_before} before, {result['load_1m_after']} after (a shared machine: compare "
        "the layers with each other, not with other runs).",
        "",
        "| layer | server CPU us/request (median) | vs httptools | req/s (median) | req/s rounds |",
        "|---|---:|---:|---:|---|",
    ]
    for layer, s in summary.items():
        rel = f"{s['median_cpu_us_per_request'] / base:.2f}" if base else "-"
        each = ", ".join(f"{x['rps']:.0f}" for x in s["runs"])
        lines.append(
            f"| {layer} | {s['median_cpu_us_per_request']:.0f} | {rel} | {s['median_rps']:.0f} "
            f"| {each} |"
        )
    (RESULTS / "http_layer.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
