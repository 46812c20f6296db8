"""Overload: successful requests/s far past the queue limit, as a fraction of the peak.

    .venv/bin/python bench/overload_bench.py                       # this checkout
    .venv/bin/python bench/overload_bench.py --repo OTHER_CHECKOUT --label before

One `isomax serve` worker over the default bundle with ISOMAX_MAX_QUEUE_IMAGES=Q (default 256),
under wrk (one 28x28 PNG per request as the raw body) at a few connection counts up to 4 x Q.
Past Q, requests must be refused (503 + Retry-After) cheaply, so that the ones accepted are still
served at the peak rate: the figure of merit is

    ratio = successful req/s at 4 x Q connections / the best successful req/s of the lower counts

(1.0: overload costs nothing; the issue measured 0.035 at 2,048 connections with Q = 1,024,
i.e. 2 x Q). `--repo` runs another checkout's server (e.g. the code before the change) with this
script, so both are measured the same way in the same sitting. The machine's load average is
recorded: on a shared machine, compare runs of one sitting only. Each run also reports the
server's own p99 of its successful answers (`server_ok_p99_s_at_most`, a bucket bound of the
request-duration histogram): the difference to the client's p99 is time before the app read the
request (bench/overload_queues.py says where).
Results: bench/results/overload[-LABEL].json and .md.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import resource
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench import loadgen  # noqa: E402
from bench.serve_bench import cpu_seconds  # noqa: E402
from tests import harness  # noqa: E402

RESULTS = REPO / "bench" / "results"
LUA = REPO / "bench" / "wrk_post.lua"
FDS = 16384


def loadavg() -> float:
    return float(Path("/proc/loadavg").read_text().split()[0])


def _more_fds() -> None:
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(FDS, hard), hard))


def wrk(port: int, body: Path, conns: int, seconds: int, pid: int) -> dict[str, Any]:
    cmd = ["wrk", "-t2", f"-c{conns}", f"-d{seconds}s", "--timeout", "10s", "--latency"]
    cmd += ["-s", str(LUA), f"http://127.0.0.1:{port}/classify", "--", str(body), "image/png"]
    load = loadavg()
    cpu0 = cpu_seconds(pid)
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    cpu = cpu_seconds(pid) - cpu0
    total = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    wall = re.search(r"requests in ([\d.]+)(m?s)", out)
    secs = float(wall.group(1)) * (1.0 if wall.group(2) == "s" else 0.001) if wall else seconds
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    refused = int(non2xx.group(1)) if non2xx else 0
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    p99 = re.search(r"^\s+99%\s+(\S+)", out, re.M)
    return {
        "connections": conns,
        "answered": total,
        "refused_non_2xx": refused,
        "ok_rps": round((total - refused) / secs, 1),
        "p99": p99.group(1) if p99 else None,
        # less sensitive to other processes than req/s: CPU the server spent per answer
        "server_cpu_ms_per_answer": round(1000 * cpu / max(total, 1), 3),
        "socket_errors": dict(
            zip(("connect", "read", "write", "timeout"), map(int, sock.groups()), strict=True)
        )
        if sock
        else {},
        "load_1m": load,
    }


def answers(port: int, body: Path, conns: int, seconds: int, pid: int) -> dict[str, Any]:
    """bench/loadgen.py: successful answers/s and the p99 of successful answers alone (wrk's
    percentiles mix in the fast 503s)."""
    load = loadavg()
    cpu0 = cpu_seconds(pid)
    request = loadgen.post("/classify", body.read_bytes(), "image/png")
    r = loadgen.run("127.0.0.1", port, request, conns, seconds)
    total = sum(r["statuses"].values())
    r["ok_rps"] = r.pop("ok_per_s")
    r["server_cpu_ms_per_answer"] = round(1000 * (cpu_seconds(pid) - cpu0) / max(total, 1), 3)
    r["load_1m"] = load
    return r


def classify_buckets(port: int) -> dict[float, float]:
    """The server's own isomax_request_duration_seconds buckets of /classify (cumulative)."""
    _, body = harness.request("GET", f"http://127.0.0.1:{port}/metrics", timeout=30)
    out: dict[float, float] = {}
    pattern = r'^isomax_request_duration_seconds_bucket\{endpoint="/classify",le="([^"]+)"\} (\S+)'
    for m in re.finditer(pattern, body.decode(), re.M):
        out[float(m.group(1))] = float(m.group(2))
    return out


def server_p99(before: dict[float, float], after: dict[float, float], ok: int) -> float | None:
    """The upper bound of the bucket holding the server-side p99 of the successful answers of a
    run: time from the app's start of a request to its response's end, so the difference to the
    client's p99 is time spent before the app read the request (socket buffers, the event loop,
    reconnecting). Assumes the 503s were faster than any 200 (they are answered before the body
    is read), so the 200s' p99 is the all-answers quantile 1 - 0.01 * ok / all."""
    delta = {le: after.get(le, 0.0) - before.get(le, 0.0) for le in after}
    total = delta.get(float("inf"), 0.0)
    if not total or not ok:
        return None
    rank = total - 0.01 * ok
    return next((le for le in sorted(delta) if delta[le] >= rank), None)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repo", type=Path, default=REPO, help="checkout whose server to run")
    ap.add_argument("--label", default="", help="suffix of the result files")
    ap.add_argument("--queue", type=int, default=256, help="ISOMAX_MAX_QUEUE_IMAGES")
    ap.add_argument("--duration", type=int, default=8)
    ap.add_argument("--connections", default="", help="comma-separated (default 32,Q/2,Q,4Q)")
    ap.add_argument(
        "--client",
        choices=["loadgen", "wrk"],
        default="loadgen",
        help="loadgen: p99 of successful answers (bench/loadgen.py); wrk: the earlier runs' client",
    )
    ap.add_argument("--env", action="append", default=[], metavar="K=V", help="server setting")
    args = ap.parse_args()
    q = args.queue
    conns = [int(c) for c in args.connections.split(",") if c] or [32, q // 2, q, 4 * q]

    out_dir = REPO / "bench" / "out"
    out_dir.mkdir(parents=True, exist_ok=True)
    body = out_dir / "overload.png"
    buf = io.BytesIO()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8), "L").save(buf, "PNG")
    body.write_bytes(buf.getvalue())

    env = {k: v for k, v in os.environ.items() if not k.startswith("ISOMAX_")}
    env.update(
        ISOMAX_MAX_QUEUE_IMAGES=str(q),
        ISOMAX_MAX_IMAGES_PER_REQUEST=str(min(64, q)),
        ISOMAX_LOG_LEVEL="warning",
        PYTHONPATH=str(args.repo),
    )
    env.update(dict(kv.split("=", 1) for kv in args.env))
    measure = answers if args.client == "loadgen" else wrk
    _more_fds()  # inherited by the server and by wrk: thousands of connections each
    port = harness.free_port()
    cmd = [sys.executable, "-m", "isomax", "serve", "--host", "127.0.0.1", "--port", str(port)]
    cmd += ["--models-dir", str(REPO / "models")]
    runs = []
    load_before = loadavg()
    log = out_dir / "overload-server.log"
    with harness.serve(cmd, port, log, env=env, cwd=args.repo, timeout=90) as server:
        pid = server.proc.pid
        measure(port, body, 32, 2, pid)  # warm-up
        for c in conns:
            before = classify_buckets(port)
            r = measure(port, body, c, args.duration, pid)
            ok = int(r.get("statuses", {}).get("200", 0)) if args.client == "loadgen" else 0
            r["server_ok_p99_s_at_most"] = server_p99(before, classify_buckets(port), ok)
            runs.append(r)
            print(json.dumps(r), flush=True)
            time.sleep(2)  # let refused connections drain
    peak = max(r["ok_rps"] for r in runs)
    at_4q = next((r["ok_rps"] for r in runs if r["connections"] == 4 * q), None)
    p99_4q = next((r.get("ok_p99_s") for r in runs if r["connections"] == 4 * q), None)
    commit = subprocess.run(
        ["git", "-C", str(args.repo), "rev-parse", "--short", "HEAD"],
        capture_output=True,
        text=True,
    ).stdout.strip()
    result = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "commit": commit,
        "label": args.label,
        "client": args.client,
        "server_env": dict(kv.split("=", 1) for kv in args.env),
        "cpus": os.cpu_count(),
        "queue_limit": q,
        "duration_s": args.duration,
        "load_1m_before": load_before,
        "load_1m_after": loadavg(),
        "runs": runs,
        "peak_ok_rps": peak,
        "ok_rps_at_4x_queue": at_4q,
        "ratio_4x_to_peak": round(at_4q / peak, 3) if peak and at_4q is not None else None,
        "ok_p99_s_at_4x_queue": p99_4q,
    }
    suffix = f"-{args.label}" if args.label else ""
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"overload{suffix}.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        f"# Overload ({args.label or 'this checkout'}, commit {commit})",
        "",
        f"{result['date']}, {result['cpus']} CPUs, ISOMAX_MAX_QUEUE_IMAGES={q}, one worker, "
        f"{args.duration} s per run, load average {load_before} before, "
        f"{result['load_1m_after']} after (shared machine).",
        "",
        "| connections | successful req/s | statuses | server CPU ms/answer | p99 | socket errors |",
        "|---:|---:|---|---:|---|---|",
    ]
    for r in runs:
        if args.client == "wrk":
            errs = ", ".join(f"{k} {v}" for k, v in r["socket_errors"].items() if v) or "-"
            statuses, p99 = f"{r['refused_non_2xx']} non-2xx", f"{r['p99']} (all answers)"
        else:
            errs = str(r["socket_errors"] or "-")
            statuses = ", ".join(f"{k}: {v}" for k, v in sorted(r["statuses"].items()))
            p99 = f"{r['ok_p99_s']} s (200s; server side <= {r['server_ok_p99_s_at_most']} s)"
        lines.append(
            f"| {r['connections']} | {r['ok_rps']:.0f} | {statuses} | "
            f"{r['server_cpu_ms_per_answer']} | {p99} | {errs} |"
        )
    lines += [
        "",
        f"Successful req/s at 4 x Q / peak: **{result['ratio_4x_to_peak']}**; p99 of successful "
        f"answers at 4 x Q: **{p99_4q} s**",
    ]
    (RESULTS / f"overload{suffix}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
