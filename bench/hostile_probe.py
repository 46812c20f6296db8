"""Hostile-client probes with numbers, for the before/after record in docs/serving.md.

    .venv/bin/python bench/hostile_probe.py                          # this checkout
    .venv/bin/python bench/hostile_probe.py --repo OTHER_CHECKOUT --label before

Against one `isomax serve` worker over the default bundle, default settings:
  header    a request with one 16 MB header line: status and seconds to the answer, and the
            slowest of /healthz requests sent meanwhile on other connections;
  png16     a 16-bit 5000x5000 PNG (~50 KB on the wire, 50 MB decoded): status, seconds, and
            how much the server's peak resident memory (VmHWM) grew;
  slowloris 50 connections sending one header byte every 2 s: how many the server still holds
            open after 20 s.
The tests (tests/service/test_hostile_clients.py) assert the behaviour; this records magnitudes.
Results: bench/results/hostile[-LABEL].json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
import zlib
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from isomax import harness  # noqa: E402

RESULTS = REPO / "bench" / "results"


def status_of(sock: socket.socket) -> int:
    data = b""
    while b"\r\n" not in data:
        chunk = sock.recv(4096)
        if not chunk:
            return 0
        data += chunk
    return int(data.split(b" ", 2)[1])


def get(port: int, path: str) -> int:
    with socket.create_connection(("127.0.0.1", port), timeout=60) as s:
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        return status_of(s)


def peak_rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


def png_gray16(side: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return len(data).to_bytes(4, "big") + kind + data + crc.to_bytes(4, "big")

    ihdr = side.to_bytes(4, "big") * 2 + bytes([16, 0, 0, 0, 0])
    comp = zlib.compressobj(9)
    row = b"\x00" * (2 * side + 1)
    idat = b"".join(comp.compress(row) for _ in range(side)) + comp.flush()
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def probe_header(port: int, size: int) -> dict[str, Any]:
    worst = 0.0
    stop = threading.Event()

    def health() -> None:
        nonlocal worst
        while not stop.is_set():
            t = time.perf_counter()
            get(port, "/healthz")
            worst = max(worst, time.perf_counter() - t)
            time.sleep(0.02)

    th = threading.Thread(target=health)
    th.start()
    t0 = time.perf_counter()
    status = 0
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=120) as s:
            head = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: "
            with contextlib.suppress(OSError):
                s.sendall(head + b"a" * size + b"\r\n\r\n")
            status = status_of(s)
    except OSError:
        pass
    elapsed = time.perf_counter() - t0
    stop.set()
    th.join()
    return {
        "header_bytes": size,
        "status": status,
        "seconds": round(elapsed, 3),
        "worst_healthz_s": round(worst, 3),
    }


def probe_png16(port: int, pid: int) -> dict[str, Any]:
    body = png_gray16(5000)
    before = peak_rss_kib(pid)
    t0 = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port), timeout=120) as s:
        head = (
            "POST /classify HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        )
        s.sendall(head.encode() + body)
        status = status_of(s)
    return {
        "wire_bytes": len(body),
        "status": status,
        "seconds": round(time.perf_counter() - t0, 3),
        "peak_rss_growth_mib": round((peak_rss_kib(pid) - before) / 1024, 1),
    }


def probe_slowloris(port: int, n: int = 50, seconds: float = 20.0) -> dict[str, Any]:
    socks = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(n)]
    for s in socks:
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
    t0 = time.monotonic()
    i = 0
    while time.monotonic() - t0 < seconds:
        for s in socks:
            with contextlib.suppress(OSError):
                s.sendall(b"X-%d: y\r\n" % i)
        i += 1
        time.sleep(2)
    still_open = 0
    for s in socks:
        s.setblocking(False)
        try:
            data = s.recv(65536)
            # an answer (408) followed by the close, or the close alone
            still_open += 0 if data == b"" or data.startswith(b"HTTP/1.1 408") else 1
        except BlockingIOError:
            still_open += 1  # nothing to read: the server holds it open
        except OSError:
            pass
        s.close()
    return {"connections": n, "seconds": seconds, "still_open": still_open}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repo", type=Path, default=REPO)
    ap.add_argument("--label", default="")
    ap.add_argument("--header-bytes", type=int, default=16 * 1024 * 1024)
    args = ap.parse_args()
    env = {k: v for k, v in os.environ.items() if not k.startswith("ISOMAX_")}
    env.update(ISOMAX_LOG_LEVEL="warning", PYTHONPATH=str(args.repo))
    port = harness.free_port()
    cmd = [sys.executable, "-m", "isomax", "serve", "--host", "127.0.0.1", "--port", str(port)]
    cmd += ["--models-dir", str(REPO / "models")]
    out: dict[str, Any] = {}
    log = REPO / "bench" / "out" / "hostile-server.log"
    with harness.serve(cmd, port, log, env=env, cwd=args.repo, timeout=90) as server:
        out["load_1m_before"] = float(Path("/proc/loadavg").read_text().split()[0])
        out["header"] = probe_header(port, args.header_bytes)
        print(out["header"], flush=True)
        out["png16"] = probe_png16(port, server.proc.pid)
        print(out["png16"], flush=True)
        out["slowloris"] = probe_slowloris(port)
        print(out["slowloris"], flush=True)
    out["date"] = datetime.now(UTC).isoformat(timespec="seconds")
    out["commit"] = subprocess.run(
        ["git", "-C", str(args.repo), "rev-parse", "--short", "HEAD"],
        capture_output=True,
        text=True,
    ).stdout.strip()
    suffix = f"-{args.label}" if args.label else ""
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"hostile{suffix}.json").write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
