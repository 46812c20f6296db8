"""SIGTERM: what was accepted is answered, what is new is refused, a graceful stop exits 0.

The listen backlog (service/server.py): connections whose handshake the kernel completed but
that the server had not accepted yet were reset when uvicorn closed its listening socket, after
the client had written its request. The mechanism is tested on real sockets where the backlog
is certain (no event-loop step between connect and shutdown); the whole server with connections
queued while its process is stopped.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import time
from pathlib import Path

import pytest

from service.server import take_backlog
from tests.service.conftest import Server, run_server
from tests.service.test_hostile_clients import _addr, classify_png, connect, read_response

pytestmark = pytest.mark.e2e

QUEUED = 8


def _backlog(close: bool) -> tuple[int, list[bytes | str], bool]:
    """A real listening asyncio server with QUEUED connections in its backlog, each with a request
    written; then `take_backlog` (or, close=True, uvicorn's plain `server.close()`).

    Returns (connections taken, what each client then reads, a new connect was refused).
    """

    async def main() -> tuple[int, list[bytes | str], bool]:
        server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        # No await until the shutdown: the event loop cannot accept any of them meanwhile.
        clients = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(QUEUED)]
        for i, c in enumerate(clients):
            c.sendall(b"request %d" % i)
        taken = [] if close else take_backlog([server])
        server.close()
        try:
            socket.create_connection(("127.0.0.1", port), timeout=5).close()
            refused = False
        except ConnectionRefusedError:
            refused = True
        for conn in taken:  # the server's side: the request is there; answer it
            conn.setblocking(True)
            conn.sendall(b"answer to " + conn.recv(100))
            conn.close()
        seen: list[bytes | str] = []
        for c in clients:
            try:
                seen.append(c.recv(100))
            except ConnectionResetError:
                seen.append("reset")
            c.close()
        return len(taken), seen, refused

    return asyncio.run(main())


def test_closing_a_listener_resets_the_connections_in_its_backlog() -> None:
    """The failure take_backlog prevents (Linux): every queued client's request is lost."""
    taken, seen, refused = _backlog(close=True)
    assert taken == 0 and seen == ["reset"] * QUEUED and refused


def test_take_backlog_accepts_every_queued_connection_then_refuses_new_ones() -> None:
    taken, seen, refused = _backlog(close=False)
    assert taken == QUEUED
    assert sorted(seen) == sorted(b"answer to request %d" % i for i in range(QUEUED))
    assert refused  # the listening socket is closed: a new client is refused, not reset


def _refused_while_alive(srv: Server) -> bool:
    """Connect until refused; True if refused while the server process still runs."""
    while srv.proc.poll() is None:
        try:
            socket.create_connection(_addr(srv), timeout=5).close()
        except ConnectionRefusedError:
            return srv.proc.poll() is None
        time.sleep(0.01)
    return False


def test_sigterm_answers_accepted_connections_refuses_new_ones_and_exits_0(
    models_dir: Path, tmp_path: Path
) -> None:
    """Connections queued (requests written) while the server is stopped, then SIGTERM: every
    request is answered; a new connection is refused while an idle keep-alive one is still
    served (with Connection: close); the process exits 0 with no traceback in its log."""
    env = {"ISOMAX_SHUTDOWN_DRAIN_S": "10", "ISOMAX_GRACEFUL_TIMEOUT_S": "30"}
    with run_server(models_dir, tmp_path / "log", **env) as srv:
        idle = connect(srv)
        idle.sendall(classify_png())
        assert read_response(idle)[0] == 200
        pid = srv.proc.pid
        os.kill(pid, signal.SIGSTOP)
        try:
            queued = [connect(srv) for _ in range(16)]  # the kernel completes the handshakes
            for s in queued:
                s.sendall(classify_png())
            os.kill(pid, signal.SIGTERM)
        finally:
            os.kill(pid, signal.SIGCONT)
        assert [read_response(s)[0] for s in queued] == [200] * len(queued)
        assert _refused_while_alive(srv)
        idle.sendall(classify_png())
        status, headers, _ = read_response(idle)
        assert (status, headers.get("connection")) == (200, "close")
        for s in [idle, *queued]:
            s.close()
        assert srv.proc.wait(30) == 0
        log = srv.log_text()
        assert "Traceback" not in log and "stopped by SIGTERM" in log
