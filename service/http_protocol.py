"""uvicorn's httptools protocol with the limits it lacks: request-head size, header count,
head and body read timeouts, and a shutdown that answers keep-alive requests.

Why here and not in the app: these attacks never reach an ASGI app. uvicorn's httptools protocol
has no limit on the request head, and httptools joins header pieces by repeated `bytes +=`, so a
huge header costs seconds of event-loop time before the app sees anything (the loop serves no
one meanwhile). It has no timeout on a request head (a client trickling one byte every few
seconds holds a connection and a file descriptor forever) nor on a body that stops arriving.
uvicorn's h11 protocol bounds the head (`h11_max_incomplete_event_size`) but costs more CPU per
request and serves fewer requests per second, and has neither timeout (the figures:
bench/results/serving-log.md, "Hardening findings", and bench/results/http_layer.md).

This subclass keeps the httptools parser and adds, per connection:
  - head bytes: counted as they arrive, before the parser accumulates them; beyond
    `max_head_bytes`, or beyond `max_headers` header lines, a JSON 431 and the connection closes;
  - head timeout: a request head must be complete `head_timeout_s` after its first byte (or after
    the connection opened), else a JSON 408 (or, if nothing came at all, just the close);
  - body timeout: once the head is in, the body may pause at most `body_timeout_s` between two
    reads while the app is waiting for it, else a JSON 408 and the close;
  - shutdown: an idle keep-alive connection is not cut at once; for `drain_s` it still takes one
    request, answered with `Connection: close` (uvicorn's own shutdown closes it immediately, and
    a request the client wrote at that moment got EOF or a reset); a request that uvicorn's
    graceful-shutdown timeout cancels is logged in one line, not as uvicorn's "Exception in ASGI
    application" with a CancelledError traceback, and answered with a JSON 503 if nothing else
    answered it (service/shutdown.py; the listen backlog at shutdown: service/server.py);
and, per process, a cap on the connections held (`max_connections`, below the descriptor limit:
service/descriptors.py says why): a connection beyond it closes the longest-idle one (no
request being served: an idle keep-alive or an incomplete head), or, when every one is serving
a request, gets a JSON 503 and the close. A client that reopens what the server closes then
takes idle places from itself, never descriptors from the service.
A request that fits in one read (the usual case) arms no timer at all.

The limits are module state (`service/http_limits.py`), set before uvicorn starts, because
uvicorn builds protocols from its own Config only.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import httptools
import orjson
from starlette.types import ASGIApp, Receive, Scope, Send
from uvicorn.protocols.http.httptools_impl import (
    STATUS_LINE,
    HttpToolsProtocol,
    RequestResponseCycle,
)

from service.http_limits import current
from service.shutdown import SHUTTING_DOWN, answer_cut, cut_headers
from service.throttled_log import ThrottledLog

log = logging.getLogger(__name__)


# One line per 10 s for each kind of refusal: a flood of slow or oversized requests is visible in
# the log without flooding it.
_throttled = ThrottledLog(log, every_s=10.0)


class _Connections:
    """This process's connections: idle ones (no request being served), longest-idle first,
    and busy ones. A dict keeps insertion order, so re-inserting an idle one moves it last."""

    def __init__(self) -> None:
        self.idle: dict[LimitedHttpToolsProtocol, None] = {}
        self.busy: set[LimitedHttpToolsProtocol] = set()

    def __len__(self) -> int:
        return len(self.idle) + len(self.busy)

    def make_room(self, now: float, cap: int) -> bool:
        """Close the longest-idle connection if `cap` are held; False if all are busy."""
        if len(self) < cap:
            return True
        if not self.idle:
            _throttled.warning(
                "cap", "refused a connection: all %d are serving requests", cap, now=now
            )
            return False
        victim = next(iter(self.idle))
        del self.idle[victim]
        _throttled.warning("cap", "%d connections: closed the longest-idle one", cap, now=now)
        victim.transport.close()
        return True

    def set_idle(self, conn: LimitedHttpToolsProtocol) -> None:
        self.busy.discard(conn)
        self.idle.pop(conn, None)
        self.idle[conn] = None

    def set_busy(self, conn: LimitedHttpToolsProtocol) -> None:
        self.idle.pop(conn, None)
        self.busy.add(conn)

    def remove(self, conn: LimitedHttpToolsProtocol) -> None:
        self.idle.pop(conn, None)
        self.busy.discard(conn)


_connections = _Connections()


class _Refused(Exception):
    """Raised from a parser callback to stop parsing; `status` and `detail` are the answer."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail


def error_response(status: int, detail: str) -> bytes:
    """A complete HTTP/1.1 response with a JSON `{"detail": ...}` body that closes the connection."""
    body = orjson.dumps({"detail": detail})
    return b"".join(
        [
            STATUS_LINE[status],
            b"content-type: application/json\r\n",
            b"content-length: " + str(len(body)).encode() + b"\r\n",
            b"connection: close\r\n\r\n",
            body,
        ]
    )


class LimitedHttpToolsProtocol(HttpToolsProtocol):
    """HttpToolsProtocol + head/header/timeout limits and a draining shutdown (module doc)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.limits = current()
        self._reading_head = True  # the next bytes belong to a request head
        self._head_bytes = 0  # bytes received since that head began (an upper bound)
        self._head_timer: asyncio.TimerHandle | None = None
        self._body_timer: asyncio.TimerHandle | None = None
        self._last_read = 0.0  # loop.time() of the last body read
        self._draining = False

    # -- connection ----------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        cap = self.limits.max_connections
        if cap and not _connections.make_room(self.loop.time(), cap):
            transport.write(error_response(503, f"the server holds {cap} busy connections"))
            transport.close()
            return
        _connections.set_idle(self)
        # A connection that never sends a complete head is closed after head_timeout_s.
        self._arm_head_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        _connections.remove(self)
        self._cancel_timers()
        super().connection_lost(exc)

    def _cancel_timers(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        if self._body_timer is not None:
            self._body_timer.cancel()
            self._body_timer = None

    def data_received(self, data: bytes) -> None:
        self._unset_keepalive_if_required()
        if self._reading_head:
            self._head_bytes += len(data)
        else:
            self._last_read = self.loop.time()
        try:
            self.parser.feed_data(data)
        except _Refused as e:
            self._refuse(e.status, e.detail)
            return
        except httptools.HttpParserError as e:
            refused = e.__context__ if isinstance(e.__context__, _Refused) else None
            if refused is not None:
                self._refuse(refused.status, refused.detail)
            else:
                _throttled.warning("400", "refused an invalid HTTP request", now=self.loop.time())
                self._refuse(400, "invalid HTTP request")
            return
        except httptools.HttpParserUpgrade:
            if self._should_upgrade():
                self.handle_websocket_upgrade()
            else:
                self._unsupported_upgrade_warning()
            return
        if self._reading_head:
            if self._head_bytes > self.limits.max_head_bytes:
                self._refuse(431, self._head_too_large())
            elif self._head_timer is None and self._head_bytes:
                self._arm_head_timer()
        elif (
            self._body_timer is None
            and self.cycle is not None
            and self.cycle.more_body
            and not self.cycle.response_complete
        ):
            self._body_timer = self.loop.call_later(self.limits.body_timeout_s, self._body_check)

    def _head_too_large(self) -> str:
        return f"the request head is larger than {self.limits.max_head_bytes} bytes"

    def _refuse(self, status: int, detail: str) -> None:
        """Answer `status` with a JSON detail (unless a response started) and close."""
        self._cancel_timers()
        if status == 431:
            _throttled.warning("431", "refused %s: %s", self._peer(), detail, now=self.loop.time())
        if self.transport.is_closing():
            return
        cycle = self.cycle
        if cycle is None or cycle.response_complete or not cycle.response_started:
            self.transport.write(error_response(status, detail))
        if cycle is not None and not cycle.response_complete:
            cycle.disconnected = True  # the app's receive() gets http.disconnect, sends are dropped
            cycle.message_event.set()
        self.transport.close()

    # -- parser callbacks ------------------------------------------------------------------------

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._reading_head = True

    def on_header(self, name: bytes, value: bytes) -> None:
        if len(self.headers) >= self.limits.max_headers:
            raise _Refused(431, f"more than {self.limits.max_headers} header lines")
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        if self._head_bytes > self.limits.max_head_bytes:
            # The whole head came in one read: count it exactly before it is served.
            size = len(self.url) + sum(len(k) + len(v) + 4 for k, v in self.headers)
            if size > self.limits.max_head_bytes:
                raise _Refused(431, self._head_too_large())
        self._reading_head = False
        self._head_bytes = 0
        self._last_read = self.loop.time()
        _connections.set_busy(self)
        super().on_headers_complete()
        if self._draining and self.cycle is not None:
            self.cycle.keep_alive = False  # answered with Connection: close

    def on_message_complete(self) -> None:
        if self._body_timer is not None:
            self._body_timer.cancel()
            self._body_timer = None
        super().on_message_complete()

    def on_response_complete(self) -> None:
        self._reading_head = True
        self._head_bytes = 0
        if not self.transport.is_closing():
            _connections.set_idle(self)
        super().on_response_complete()

    # -- timeouts --------------------------------------------------------------------------------

    def _arm_head_timer(self) -> None:
        self._head_timer = self.loop.call_later(self.limits.head_timeout_s, self._head_timeout)

    def _head_timeout(self) -> None:
        self._head_timer = None
        if self.transport.is_closing() or not self._reading_head:
            return
        if self._head_bytes == 0:
            self.transport.close()  # nothing was sent: no answer owed
            return
        timeout = self.limits.head_timeout_s
        _throttled.warning(
            "head", "closed %s: request head incomplete after %g s", self._peer(), timeout,
            now=self.loop.time(),
        )  # fmt: skip
        self._refuse(408, f"the request head did not arrive within {timeout:g} s")

    def _body_check(self) -> None:
        self._body_timer = None
        cycle = self.cycle
        if self.transport.is_closing() or cycle is None or not cycle.more_body:
            return
        if cycle.response_complete or cycle.disconnected:
            return
        timeout = self.limits.body_timeout_s
        idle = self.loop.time() - self._last_read
        if self.flow.read_paused or idle < timeout:
            # The app has not read what is buffered (not the client's fault), or the client sent
            # something since: look again when the client's allowance would run out.
            wait = timeout if self.flow.read_paused else timeout - idle
            self._body_timer = self.loop.call_later(wait, self._body_check)
            return
        _throttled.warning(
            "body", "closed %s: request body stalled for %g s", self._peer(), timeout,
            now=self.loop.time(),
        )  # fmt: skip
        self._refuse(408, f"the request body stalled for more than {timeout:g} s")

    def _peer(self) -> str:
        return f"{self.client[0]}:{self.client[1]}" if self.client else "client"

    # -- shutdown --------------------------------------------------------------------------------

    def shutdown(self) -> None:
        """uvicorn stopped accepting: finish the current request, or take one more for drain_s."""
        self._draining = True
        if self.cycle is not None and not self.cycle.response_complete:
            self.cycle.keep_alive = False
            return
        if self.limits.drain_s <= 0:
            self.transport.close()
            return
        self.loop.call_later(self.limits.drain_s, self._drain_close)

    def _start_asgi_task(self, cycle: RequestResponseCycle, app: Any) -> None:
        super()._start_asgi_task(cycle, self._quiet_when_cut(cycle, app))

    def _quiet_when_cut(self, cycle: RequestResponseCycle, app: ASGIApp) -> Any:
        """`app` for one request, ending quietly when the graceful-shutdown timeout cuts it.

        uvicorn cancels the requests still running when that timeout ends (nothing else cancels
        them), and logs each CancelledError as "Exception in ASGI application" with a traceback:
        an expected end of a shutdown that reads as a crash. Here it is one warning; the request
        is answered a JSON 503 unless the endpoint did (service/shutdown.py) or an answer had
        started (then the connection closes); the cancellation ends here, with the request.
        """

        async def run(scope: Scope, receive: Receive, send: Send) -> None:
            try:
                await app(scope, receive, send)
            except asyncio.CancelledError:
                if not self._draining:
                    raise
                if not cycle.response_started:
                    body = orjson.dumps({"detail": SHUTTING_DOWN})
                    await answer_cut(send, body, cut_headers(body, self.limits.retry_after_s))
                self._log_cut(cycle, scope)

        return run

    def _log_cut(self, cycle: RequestResponseCycle, scope: Scope) -> None:
        """One line for a cut request; the connection closes if its answer was half sent."""
        if cycle.response_complete:
            outcome = "answered with Connection: close"
        else:
            outcome = "its answer was cut short"
            cycle.disconnected = True  # uvicorn logs nothing more for it
            self.transport.close()
        log.warning(
            "%s %s from %s cut by the graceful-shutdown timeout: %s",
            scope.get("method", ""), scope.get("path", ""), self._peer(), outcome,
        )  # fmt: skip

    def _drain_close(self) -> None:
        if self.transport.is_closing():
            return
        busy = self.cycle is not None and not self.cycle.response_complete
        if not busy and self._head_bytes == 0:
            self.transport.close()
        # else: a request is in progress; it ends with Connection: close or the head timeout.
