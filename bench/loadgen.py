"""A closed-loop HTTP/1.1 load generator that keeps the latency of each answer by its status.

Why not wrk alone: wrk's percentiles mix the fast 503s of refused requests with the answers,
so "p99 of successful answers" (issue 24's overload goal) cannot be read from it. Here each
connection sends a request, reads the whole answer (Content-Length bodies), records (status,
seconds from the first byte written to the last byte read), and sends the next; a connection
the server closes (a refusal with `Connection: close`) is reopened. Run in its own process
(`run` spawns them), so that the client does not share the server's interpreter.
"""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import time
from typing import Any

import numpy as np


async def _connection(
    host: str, port: int, request: bytes, deadline: float, out: list[tuple[int, float]]
) -> int:
    """One connection's loop until `deadline`; the number of socket errors."""
    errors = 0
    reader = writer = None
    while time.monotonic() < deadline:
        try:
            if writer is None:
                reader, writer = await asyncio.open_connection(host, port)
            assert reader is not None
            t0 = time.monotonic()
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            status = int(head.split(b" ", 2)[1])
            lower = head.lower()
            at = lower.find(b"content-length:")
            length = int(lower[at + 15 : lower.find(b"\r\n", at)]) if at >= 0 else 0
            await reader.readexactly(length)
            out.append((status, time.monotonic() - t0))
            if b"connection: close" in lower:
                writer.close()
                writer = None
        except (OSError, asyncio.IncompleteReadError, ValueError):
            errors += 1
            if writer is not None:
                writer.close()
            writer = None
            await asyncio.sleep(0.05)
    if writer is not None:
        writer.close()
    return errors


async def _main(host: str, port: int, request: bytes, conns: int, seconds: float) -> Any:
    deadline = time.monotonic() + seconds
    out: list[tuple[int, float]] = []
    tasks = [_connection(host, port, request, deadline, out) for _ in range(conns)]
    errors = sum(await asyncio.gather(*tasks))
    return out, errors


def _worker(args: tuple[str, int, bytes, int, float]) -> Any:
    return asyncio.run(_main(*args))


def run(
    host: str, port: int, request: bytes, conns: int, seconds: float, procs: int = 2
) -> dict[str, Any]:
    """`conns` connections over `procs` client processes for `seconds`: the summary."""
    shares = [conns // procs + (i < conns % procs) for i in range(procs)]
    with mp.get_context("spawn").Pool(procs) as pool:
        t0 = time.monotonic()
        parts = pool.map(_worker, [(host, port, request, n, seconds) for n in shares if n])
        wall = time.monotonic() - t0
    answers = [a for part, _ in parts for a in part]
    errors = sum(e for _, e in parts)
    ok = np.array([t for s, t in answers if s == 200])
    statuses: dict[str, int] = {}
    for s, _ in answers:
        statuses[str(s)] = statuses.get(str(s), 0) + 1
    return {
        "connections": conns,
        "seconds": round(min(wall, seconds), 2),
        "statuses": statuses,
        "ok_per_s": round(len(ok) / seconds, 1),
        "ok_p50_s": round(float(np.percentile(ok, 50)), 4) if len(ok) else None,
        "ok_p99_s": round(float(np.percentile(ok, 99)), 4) if len(ok) else None,
        "socket_errors": errors,
    }


def post(path: str, body: bytes, content_type: str) -> bytes:
    """A keep-alive POST request's bytes."""
    head = (
        f"POST {path} HTTP/1.1\r\nHost: bench\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body
