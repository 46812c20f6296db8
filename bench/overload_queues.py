"""Where a request waits under overload before the app sees it: the server port's socket queues.

    .venv/bin/python bench/overload_queues.py --queue 64 --connections 256 --duration 8

One `isomax serve` worker over the default bundle with ISOMAX_MAX_QUEUE_IMAGES=Q under
bench/loadgen.py (closed loop, a 28x28 PNG per request, a connection the server closes is
reopened). Every 0.2 s `ss` counts, on the server's port: the connections waiting in the listen
backlog (handshake done, not yet accepted: a reopened client has already written its request),
the accepted connections with request bytes the server has not read, and the client sockets with
answer bytes the client has not read (a slow client would show there). With the server's own
request-duration histogram (bench/overload_bench.py) this says whether the p99 of successful
answers is spent in the app or before it. Results: bench/results/overload-queues[-LABEL].json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench import loadgen  # noqa: E402
from bench.hostile_probe import _write_small_png, small_png  # noqa: E402
from bench.overload_bench import _more_fds, loadavg  # noqa: E402
from tests import harness  # noqa: E402


def queues(port: int) -> tuple[int, int, int, int]:
    """(accepted connections, listen backlog, server sockets with unread bytes, client ones)."""
    out = subprocess.run(
        ["ss", "-tnH", "state", "all", f"( sport = :{port} or dport = :{port} )"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    accepted = backlog = server_unread = client_unread = 0
    for line in out.splitlines():
        state, recv_q, _send_q, local, peer = line.split()[:5]
        if state == "LISTEN":
            backlog = int(recv_q)  # for a listening socket: connections not yet accepted
        elif state != "ESTAB":
            continue  # closing ones: nothing waits in them
        elif local.endswith(f":{port}"):
            accepted += 1
            server_unread += int(recv_q) > 0
        elif peer.endswith(f":{port}"):
            client_unread += int(recv_q) > 0
    return accepted, backlog, server_unread, client_unread


def measure(args: argparse.Namespace) -> dict[str, Any]:
    _more_fds()
    _write_small_png()
    port = harness.free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("ISOMAX_")}
    env.update(
        ISOMAX_MAX_QUEUE_IMAGES=str(args.queue), ISOMAX_MAX_IMAGES_PER_REQUEST=str(args.queue),
        ISOMAX_LOG_LEVEL="warning", PYTHONPATH=str(REPO),
    )  # fmt: skip
    cmd = [sys.executable, "-m", "isomax", "serve", "--host", "127.0.0.1", "--port", str(port)]
    cmd += ["--models-dir", str(REPO / "models")]
    request = loadgen.post("/classify", small_png(), "image/png")
    samples: list[tuple[int, int, int, int]] = []
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.2):
            samples.append(queues(port))

    log = REPO / "bench" / "out" / "overload-queues-server.log"
    with harness.serve(cmd, port, log, env=env, timeout=90):
        loadgen.run("127.0.0.1", port, request, 32, 2)  # warm-up
        load = loadavg()
        th = threading.Thread(target=sample)
        th.start()
        result = loadgen.run("127.0.0.1", port, request, args.connections, args.duration)
        stop.set()
        th.join()
    a = np.array(samples[2:-2] or samples)  # not the ramp-up and ramp-down
    names = ("accepted", "listen_backlog", "server_unread", "client_unread")
    return {
        "queue_limit": args.queue, "load_1m": load, **result,
        "socket_queues": {
            n: {"mean": round(float(a[:, i].mean()), 1), "max": int(a[:, i].max())}
            for i, n in enumerate(names)
        },
    }  # fmt: skip


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--queue", type=int, default=64)
    ap.add_argument("--connections", type=int, default=256)
    ap.add_argument("--duration", type=int, default=8)
    ap.add_argument("--label", default="")
    args = ap.parse_args()
    out = measure(args)
    out["date"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    print(json.dumps(out, indent=2))
    suffix = f"-{args.label}" if args.label else ""
    path = REPO / "bench" / "results" / f"overload-queues{suffix}.json"
    path.write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
