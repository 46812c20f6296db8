"""The uvicorn server of a one-process `isomax serve`: a shutdown that resets no accepted client,
and exit status 0 after a graceful stop by SIGTERM.

Connections in the listen backlog. The kernel completes a TCP handshake before the server calls
accept(), and queues the connection; a client then writes its request at once. When uvicorn's
shutdown closes the listening socket, Linux resets every connection still in that queue, so a
client that connected a moment before (under load the event loop accepts late, up to a few
hundred ms) gets ECONNRESET after writing its request, and cannot tell whether it was served
(bench/results/serving-log.md, "Shutdown", has the measurement). `GracefulServer` first takes
every connection waiting in the backlog, then closes the listening socket in the same step of the
event loop, and hands the taken ones to the protocol like any other: they are served in the
draining mode of service/http_protocol.py (one request, answered with `Connection: close`).
After that, a new connection is refused (ECONNREFUSED: nothing was sent, so any client may retry
it elsewhere at once), except for one whose handshake completes in the microseconds between the
last accept() and the close.

Exit status. uvicorn restores the signal handlers it replaced and raises the signal it caught
again once it has shut down, so that the program embedding it decides; with Python's default
SIGTERM handler that kills the process, status 143 (-15 from subprocess), which supervisors
record as a failure (Kubernetes' reason `Error`, `docker ps`'s `Exited (143)`). `run` installs a
SIGTERM handler that notes the signal, so a stop that finished its graceful sequence (requests
answered or cut with a 503, the lifespan shut down) returns 0, as gunicorn does after a graceful
SIGTERM and as uvicorn already does for SIGINT. A start that fails still exits 3 (uvicorn's
STARTUP_FAILURE). Several workers (`--workers N`) run under uvicorn's own supervisor, which exits
0 on SIGTERM; its workers are uvicorn's plain servers (docs/serving.md, "Shutdown").
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
from types import FrameType
from typing import Any

import uvicorn
from uvicorn.config import STARTUP_FAILURE

log = logging.getLogger(__name__)


def take_backlog(servers: list[asyncio.Server]) -> list[socket.socket]:
    """Accept every connection waiting on the servers' listening sockets, then close them.

    No await between the accepts and the close: the event loop cannot run in between, and the
    kernel queues (for the reset on close) only what arrives in those microseconds.
    """
    taken: list[socket.socket] = []
    for server in servers:
        for listening in server.sockets:
            # A duplicate descriptor of the same socket: asyncio's own object refuses accept().
            with socket.socket(fileno=os.dup(listening.fileno())) as sock:
                sock.setblocking(False)
                while True:
                    try:
                        conn, _ = sock.accept()
                    except (BlockingIOError, InterruptedError):
                        break
                    except OSError as e:  # EMFILE: what is left is reset, as without this
                        log.warning("shutdown: stopped accepting the listen backlog: %s", e)
                        break
                    taken.append(conn)
        server.close()
    return taken


class GracefulServer(uvicorn.Server):
    """uvicorn.Server whose shutdown serves the connections waiting in the listen backlog."""

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        taken = take_backlog(self.servers)
        if taken:
            log.info("shutdown: took %d connection(s) waiting in the listen backlog", len(taken))
            loop = asyncio.get_running_loop()
            config = self.config

            def protocol() -> asyncio.Protocol:  # what uvicorn's startup builds for its servers
                return config.http_protocol_class(  # type: ignore[call-arg]
                    config=config, server_state=self.server_state, app_state=self.lifespan.state
                )

            for conn in taken:
                conn.setblocking(False)
                try:
                    await loop.connect_accepted_socket(protocol, conn, ssl=config.ssl)
                except OSError as e:  # the client left meanwhile, or a TLS handshake failed
                    log.debug("shutdown: a backlog connection failed: %s", e)
                    conn.close()
        # uvicorn's own: close the (closed) servers, put every connection, the taken ones too,
        # into its draining shutdown, wait up to the graceful timeout, then the lifespan.
        await super().shutdown(sockets)


def run(app: Any, **config: Any) -> int:
    """`uvicorn.run(app, **config)` for one process with `GracefulServer`; the exit status."""
    stopped_by: list[int] = []

    def note(sig: int, frame: FrameType | None) -> None:  # uvicorn raises it again at the end
        stopped_by.append(sig)

    previous = signal.signal(signal.SIGTERM, note)
    server = GracefulServer(uvicorn.Config(app, **config))
    try:
        server.run()
    except KeyboardInterrupt:  # SIGINT raised again by uvicorn after its shutdown
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
    if not server.started:
        return STARTUP_FAILURE
    if stopped_by:
        log.info("stopped by SIGTERM after a graceful shutdown: exit status 0")
    return 0
