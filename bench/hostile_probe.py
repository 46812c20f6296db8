"""Hostile-client probes with numbers, for the before/after record in bench/results/serving-log.md.

    .venv/bin/python bench/hostile_probe.py                          # this checkout
    .venv/bin/python bench/hostile_probe.py --repo OTHER_CHECKOUT --label before

Against one `isomax serve` worker over the default bundle, default settings:
  header    a request with one 16 MB header line: status and seconds to the answer, and the
            slowest of /healthz requests sent meanwhile on other connections;
  png16     a 16-bit 5000x5000 PNG (~50 KB on the wire, 50 MB decoded): status, seconds, and
            how much the server's peak resident memory (VmHWM) grew;
  slowloris 50 connections sending one header byte every 2 s: how many the server still holds
            open after 20 s.
Round two (issue 24):
  boundary  a multipart body with a 300-character boundary: the status (400, not 500);
  trickle   8 sockets declaring 32 MiB multipart bodies, one byte each every 10 s: the status
            and seconds of a normal request every second meanwhile;
  tiff      4 uploads at once of a 1 x 1,000,000 TIFF in 1,000,000 strips: their statuses and
            the slowest /healthz meanwhile;
  fds       the server under nofile 1024, an attacker holding 1,100 connections and reopening
            each one the server closes: how many of the probes sent meanwhile are answered 200;
  rgba      16 concurrent 3237x3237 RGBA PNGs (just under the 40 MiB decoded limit), 8 rounds:
            idle, peak and held (3 s after each round) resident memory.
`--probes` picks some (default: all).
The tests (tests/service/test_hostile_clients.py) assert the behaviour; this records magnitudes.
Results: bench/results/hostile[-LABEL].json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import socket
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests import harness  # noqa: E402
from tests.service.hostile_files import png_rgba, tiff_strips  # noqa: E402

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


def _status_kib(pid: int, field: str) -> int:
    """A `/proc/PID/status` memory field (`VmHWM`, `VmRSS`) in KiB; 0 when absent."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    return 0


def peak_rss_kib(pid: int) -> int:
    return _status_kib(pid, "VmHWM")


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
    def big_header() -> tuple[int, float]:
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
        return status, time.perf_counter() - t0

    (status, elapsed), worst = with_healthz(port, big_header)
    return {
        "header_bytes": size,
        "status": status,
        "seconds": round(elapsed, 3),
        "worst_healthz_s": worst,
    }


def probe_png16(port: int, pid: int) -> dict[str, Any]:
    body = png_gray16(5000)
    before = peak_rss_kib(pid)
    status, seconds = post(port, body, "image/png", timeout=120)
    return {
        "wire_bytes": len(body),
        "status": status,
        "seconds": seconds,
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


def rss_mib(pid: int) -> float:
    return _status_kib(pid, "VmRSS") / 1024


def post(port: int, body: bytes, ctype: str, timeout: float = 60) -> tuple[int, float]:
    """(status, seconds) of one POST /classify on a new connection (0: no answer)."""
    t0 = time.perf_counter()
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
            head = (
                f"POST /classify HTTP/1.1\r\nHost: x\r\nContent-Type: {ctype}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
            )
            s.sendall(head.encode() + body)
            status = status_of(s)
    except OSError:
        status = 0
    return status, round(time.perf_counter() - t0, 3)


def small_png() -> bytes:
    return (REPO / "bench" / "out" / "overload.png").read_bytes()


def probe_boundary(port: int) -> dict[str, Any]:
    b = "b" * 300
    body = (
        (
            f'--{b}\r\nContent-Disposition: form-data; name="file"; filename="a.png"\r\n'
            f"Content-Type: image/png\r\n\r\n"
        ).encode()
        + small_png()
        + f"\r\n--{b}--\r\n".encode()
    )
    status, secs = post(port, body, f"multipart/form-data; boundary={b}")
    return {"boundary_chars": 300, "status": status, "seconds": secs}


def probe_trickle(port: int, n: int = 8, seconds: float = 30.0) -> dict[str, Any]:
    head = (
        "POST /classify HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=xx\r\n"
        f"Content-Length: {32 * 1024 * 1024}\r\n\r\n"
    ).encode()
    socks = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(n)]
    for s in socks:
        s.sendall(head + b"-")
    last_byte = time.monotonic()

    def keep_holding() -> None:  # one more byte every 10 s
        nonlocal last_byte
        if time.monotonic() - last_byte >= 10:
            for s in socks:
                with contextlib.suppress(OSError):
                    s.sendall(b"-")
            last_byte = time.monotonic()

    probes = probe_for(port, seconds, every=1, timeout=15, before_each=keep_holding)
    for s in socks:
        s.close()
    return {"holders": n, "seconds": seconds, **probes}


def probe_for(
    port: int,
    seconds: float,
    every: float,
    timeout: float,
    before_each: Callable[[], None] | None = None,
) -> dict[str, Any]:
    """A small PNG posted every `every` s for `seconds`: how many, how many answered 200, the
    statuses seen and the slowest 200 (None without one)."""
    probes: list[tuple[int, float]] = []
    t0 = time.monotonic()
    while time.monotonic() - t0 < seconds:
        if before_each is not None:
            before_each()
        probes.append(post(port, small_png(), "image/png", timeout=timeout))
        time.sleep(every)
    ok = [t for st, t in probes if st == 200]
    return {
        "probes": len(probes), "answered_200": len(ok),
        "statuses": sorted({st for st, _ in probes}), "slowest_200_s": max(ok) if ok else None,
    }  # fmt: skip


def concurrently(n: int, one: Callable[[int], Any]) -> list[Any]:
    """`one(i)` for i in 0..n-1, each in a thread of its own, all at once; their results."""
    out: list[Any] = [None] * n

    def run(i: int) -> None:
        out[i] = one(i)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


def with_healthz(port: int, work: Any) -> tuple[Any, float]:
    """Run `work()` while /healthz is polled: (its result, the slowest /healthz seconds)."""
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
    try:
        result = work()
    finally:
        stop.set()
        th.join()
    return result, round(worst, 3)


def probe_tiff(port: int, pid: int) -> dict[str, Any]:
    body = tiff_strips(1_000_000)
    before = peak_rss_kib(pid)

    def four() -> list[tuple[int, float]]:
        return concurrently(4, lambda _: post(port, body, "image/tiff", timeout=120))

    answers, worst = with_healthz(port, four)
    return {
        "wire_bytes": len(body), "answers": answers, "worst_healthz_s": worst,
        "peak_rss_growth_mib": round((peak_rss_kib(pid) - before) / 1024, 1),
    }  # fmt: skip


def probe_fds(port: int, n: int = 1100, seconds: float = 30.0) -> dict[str, Any]:
    """An attacker keeping `n` connections open, reopening each that the server closes."""
    stop = threading.Event()
    opened = 0

    def attacker() -> None:
        nonlocal opened
        socks: list[socket.socket] = []
        while not stop.is_set():
            socks = [s for s in socks if s.fileno() >= 0]
            while len(socks) < n and not stop.is_set():
                try:
                    socks.append(socket.create_connection(("127.0.0.1", port), timeout=2))
                    opened += 1
                except OSError:
                    break
            for s in socks:  # drop the ones the server closed
                s.setblocking(False)
                try:
                    if s.recv(1) == b"":
                        s.close()
                except BlockingIOError:
                    pass
                except OSError:
                    s.close()
            time.sleep(0.2)
        for s in socks:
            s.close()

    th = threading.Thread(target=attacker)
    th.start()
    time.sleep(3)
    probes = probe_for(port, seconds, every=0.5, timeout=5)
    stop.set()
    th.join()
    del probes["statuses"]
    return {"attacker_connections": n, "attacker_opened": opened, **probes}


def _rgba_round(port: int, pid: int, body: bytes, n: int) -> dict[str, Any]:
    """`n` uploads of `body` at once: statuses, peak RSS, RSS 3 s after the last answer."""
    peak = 0.0
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, rss_mib(pid))
            time.sleep(0.01)

    sampler = threading.Thread(target=sample)
    sampler.start()
    statuses = [r[0] for r in concurrently(n, lambda _: post(port, body, "image/png", timeout=120))]
    time.sleep(3)
    done.set()
    sampler.join()
    return {"statuses": sorted(set(statuses)), "peak_mib": round(peak, 1),
            "held_mib": round(rss_mib(pid), 1)}  # fmt: skip


def probe_rgba(port: int, pid: int, rounds: int = 8, n: int = 16) -> dict[str, Any]:
    body = png_rgba(3237)
    idle = rss_mib(pid)
    out = [_rgba_round(port, pid, body, n) for _ in range(rounds)]
    return {
        "wire_bytes": len(body), "idle_mib": round(idle, 1), "rounds": out,
        "peak_mib": max(r["peak_mib"] for r in out),
        "held_over_idle_mib": round(max(r["held_mib"] for r in out) - idle, 1),
    }  # fmt: skip


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repo", type=Path, default=REPO)
    ap.add_argument("--label", default="")
    ap.add_argument("--header-bytes", type=int, default=16 * 1024 * 1024)
    ap.add_argument("--probes", default="header,png16,slowloris,boundary,trickle,tiff,fds,rgba")
    ap.add_argument("--nofile", type=int, default=1024, help="the server's nofile (fds probe)")
    ap.add_argument("--env", action="append", default=[], metavar="K=V", help="server setting")
    args = ap.parse_args()
    probes = set(args.probes.split(","))
    env = {k: v for k, v in os.environ.items() if not k.startswith("ISOMAX_")}
    env.update(ISOMAX_LOG_LEVEL="warning", PYTHONPATH=str(args.repo))
    env.update(dict(kv.split("=", 1) for kv in args.env))
    port = harness.free_port()
    cmd = [sys.executable, "-m", "isomax", "serve", "--host", "127.0.0.1", "--port", str(port)]
    cmd += ["--models-dir", str(REPO / "models")]
    out: dict[str, Any] = {}
    log = REPO / "bench" / "out" / "hostile-server.log"
    _write_small_png()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(args.nofile, hard), hard))  # the server's
    with harness.serve(cmd, port, log, env=env, cwd=args.repo, timeout=90) as server:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))  # this process's own
        pid = server.proc.pid
        out["load_1m_before"] = float(Path("/proc/loadavg").read_text().split()[0])
        out["server_nofile"] = min(args.nofile, hard)
        out["server_env"] = dict(kv.split("=", 1) for kv in args.env)
        runs = {
            "header": lambda: probe_header(port, args.header_bytes),
            "png16": lambda: probe_png16(port, pid),
            "slowloris": lambda: probe_slowloris(port),
            "boundary": lambda: probe_boundary(port),
            "trickle": lambda: with_healthz(port, lambda: probe_trickle(port)),
            "tiff": lambda: probe_tiff(port, pid),
            "fds": lambda: with_healthz(port, lambda: probe_fds(port)),
            "rgba": lambda: probe_rgba(port, pid),
        }
        for name, run in runs.items():
            if name in probes:
                result = run()
                if isinstance(result, tuple):
                    result = {**result[0], "worst_healthz_s": result[1]}
                out[name] = result
                print(name, result, flush=True)
        out["server_log_tracebacks"] = log.read_text(errors="replace").count("Traceback")
    write_result(out, "hostile", args.label, args.repo)
    return 0


def write_result(out: dict[str, Any], kind: str, label: str, repo: Path) -> None:
    """`out`, stamped with the date and the probed checkout's commit, to
    bench/results/KIND[-LABEL].json (the hostile and shutdown probes' one format)."""
    out["date"] = datetime.now(UTC).isoformat(timespec="seconds")
    out["commit"] = subprocess.run(
        ["git", "-C", str(repo), "rev-parse", "--short", "HEAD"],
        capture_output=True,
        text=True,
    ).stdout.strip()
    suffix = f"-{label}" if label else ""
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{kind}{suffix}.json").write_text(json.dumps(out, indent=2) + "\n")


def _write_small_png() -> None:
    import io

    import numpy as np
    from PIL import Image

    path = REPO / "bench" / "out" / "overload.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8), "L").save(buf, "PNG")
    path.write_bytes(buf.getvalue())


if __name__ == "__main__":
    raise SystemExit(main())
