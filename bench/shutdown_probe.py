"""What clients see when `isomax serve` gets SIGTERM under load, for docs/serving.md.

    .venv/bin/python bench/shutdown_probe.py                      # this checkout
    .venv/bin/python bench/shutdown_probe.py --repo OTHER_CHECKOUT --label before

One worker over the default bundle; C client threads each send up to R POST /classify (one
28x28 PNG), half on a keep-alive connection (reopened when the server closes it), half on a
fresh connection per request; SIGTERM arrives after `--after-s`. Every request's outcome is
counted: an HTTP status, `reset` (ECONNRESET/EPIPE after the request was written: the client
cannot tell whether it was served), `eof` (closed with no answer), `refused` (ECONNREFUSED on
connect: nothing was sent, safe to retry elsewhere). A client stops at its first refusal (the
server is gone). Also recorded: the window (ms after SIGTERM) in which resets were written,
the exit status, and the tracebacks in the server log.
Results: bench/results/shutdown[-LABEL].json.
"""

from __future__ import annotations

import argparse
import collections
import errno
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.hostile_probe import _write_small_png, small_png, write_result  # noqa: E402
from tests import harness  # noqa: E402

RESULTS = REPO / "bench" / "results"


def _request(body: bytes, keep_alive: bool) -> bytes:
    conn = "keep-alive" if keep_alive else "close"
    return (
        f"POST /classify HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
        f"Content-Length: {len(body)}\r\nConnection: {conn}\r\n\r\n"
    ).encode() + body


def _read_answer(sock: socket.socket) -> tuple[int, bool]:
    """(status, the server keeps the connection) of one response (status 0: EOF)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            return 0, False
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").lower().split("\r\n")
    length = next((int(x.split(":")[1]) for x in lines if x.startswith("content-length")), 0)
    while len(rest) < length:
        chunk = sock.recv(65536)
        if not chunk:
            return 0, False
        rest += chunk
    return int(lines[0].split()[1]), not any(x == "connection: close" for x in lines)


def client(port: int, n: int, keep_alive: bool, sigterm: list[float], out: list) -> None:
    """Send up to `n` requests; append (outcome, ms after SIGTERM or None, keep_alive) each."""
    req = _request(small_png(), keep_alive)
    sock: socket.socket | None = None
    for _ in range(n):
        written: float | None = None
        try:
            if sock is None:
                try:
                    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
                except ConnectionRefusedError:
                    out.append(("refused", _since(sigterm, time.monotonic()), keep_alive))
                    return
            written = time.monotonic()
            sock.sendall(req)
            status, keep = _read_answer(sock)
            out.append((status or "eof", _since(sigterm, written), keep_alive))
            if not keep:
                sock.close()
                sock = None
        except OSError as e:
            kind = "reset" if e.errno in (errno.ECONNRESET, errno.EPIPE) else type(e).__name__
            out.append((kind, _since(sigterm, written or time.monotonic()), keep_alive))
            if sock is not None:
                sock.close()
            sock = None
    if sock is not None:
        sock.close()


def _since(sigterm: list[float], t: float) -> float | None:
    return round((t - sigterm[0]) * 1000, 1) if sigterm else None


def run(args: argparse.Namespace) -> dict[str, Any]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ISOMAX_")}
    env.update(ISOMAX_LOG_LEVEL="info", PYTHONPATH=str(args.repo))
    port = harness.free_port()
    cmd = [sys.executable, "-m", "isomax", "serve", "--host", "127.0.0.1", "--port", str(port)]
    cmd += ["--models-dir", str(REPO / "models")]
    log = REPO / "bench" / "out" / f"shutdown-server{args.label}.log"
    _write_small_png()
    server = harness.start(cmd, port, log, env=env, cwd=args.repo, timeout=90)
    load = float(Path("/proc/loadavg").read_text().split()[0])
    sigterm: list[float] = []
    results: list = []
    threads = [
        threading.Thread(target=client, args=(port, args.requests, i % 2 == 0, sigterm, results))
        for i in range(args.clients)
    ]
    for t in threads:
        t.start()
    time.sleep(args.after_s)
    sigterm.append(time.monotonic())
    server.proc.send_signal(signal.SIGTERM)
    for t in threads:
        t.join()
    try:
        code = server.proc.wait(60)
    finally:
        harness.stop(server)
    counts = collections.Counter(f"{'keep-alive' if ka else 'fresh'} {k}" for k, _, ka in results)
    resets = [ms for k, ms, _ in results if k in ("reset", "eof") and ms is not None]
    text = log.read_text(errors="replace")
    return {
        "clients": args.clients, "requests_per_client": args.requests,
        "sigterm_after_s": args.after_s, "load_1m": load,
        "outcomes": dict(sorted(counts.items())),
        "after_sigterm": dict(sorted(collections.Counter(
            str(k) for k, ms, _ in results if ms is not None and ms >= 0).items())),
        "reset_or_eof_written_ms": [min(resets), max(resets)] if resets else None,
        "exit_status": code,
        "log_tracebacks": text.count("Traceback"),
        "log_exception_in_asgi": text.count("Exception in ASGI application"),
    }  # fmt: skip


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repo", type=Path, default=REPO)
    ap.add_argument("--label", default="")
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--after-s", type=float, default=1.0, help="SIGTERM this long into the run")
    ap.add_argument("--runs", type=int, default=1)
    args = ap.parse_args()
    out: dict[str, Any] = {"runs": [run(args) for _ in range(args.runs)]}
    for r in out["runs"]:
        print(r, flush=True)
    write_result(out, "shutdown", args.label, args.repo)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
