"""Hostile clients against a real `isomax serve` process: each attack is refused early and cheaply
while the server keeps serving others. Every socket has a timeout, so a server that does not
defend itself fails these tests instead of hanging them.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.service.cases import PNG
from tests.service.conftest import Server, run_server

pytestmark = pytest.mark.e2e

SOCKET_TIMEOUT_S = 15.0


def _addr(server: Server) -> tuple[str, int]:
    host, port = server.url.removeprefix("http://").split(":")
    return host, int(port)


def connect(server: Server) -> socket.socket:
    return socket.create_connection(_addr(server), timeout=SOCKET_TIMEOUT_S)


def read_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """One HTTP response from `sock`: (status, lower-cased headers, body)."""
    resp = http.client.HTTPResponse(sock)
    resp.begin()
    body = resp.read()
    return resp.status, {k.lower(): v for k, v in resp.getheaders()}, body


def request(method: str, path: str, body: bytes = b"", **headers: str) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: test"]
    lines += [f"{k.replace('_', '-')}: {v}" for k, v in headers.items()]
    if body or method == "POST":
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def classify_png() -> bytes:
    return request("POST", "/classify", PNG, Content_Type="image/png")


def healthz_ok(server: Server) -> bool:
    with connect(server) as s:
        s.sendall(request("GET", "/healthz", Connection="close"))
        return read_response(s)[0] == 200


def closed_by_server(sock: socket.socket) -> bool:
    """True when the server closed `sock` (EOF or reset), False if it is still open."""
    try:
        return sock.recv(65536) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


@pytest.fixture(scope="module")
def guarded(models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A server with short head and body timeouts, so that the timeout tests take seconds."""
    log = tmp_path_factory.mktemp("guarded") / "server.log"
    env = {"ISOMAX_HEADER_TIMEOUT_S": "1", "ISOMAX_BODY_TIMEOUT_S": "1"}
    with run_server(models_dir, log, **env) as s:
        yield s


# -- finding 1: the request head -----------------------------------------------------------------


def test_a_1mb_header_is_refused_with_431_and_others_are_served(guarded: Server) -> None:
    with connect(guarded) as s:
        t0 = time.monotonic()
        # Refused while sending (broken pipe): the answer is still in the socket's buffer.
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            s.sendall(request("GET", "/healthz", X_Big="a" * (1 << 20)))
        status, headers, body = read_response(s)
        refused_after = time.monotonic() - t0
    assert status == 431, body
    assert headers["content-type"] == "application/json" and headers["connection"] == "close"
    assert "32768 bytes" in json.loads(body)["detail"]
    assert healthz_ok(guarded)
    print(f"1 MB header refused after {refused_after * 1000:.1f} ms")


def test_too_many_header_lines_are_refused(guarded: Server) -> None:
    lines = {f"X_H{i}": "v" for i in range(500)}
    with connect(guarded) as s:
        s.sendall(request("GET", "/healthz", **lines))
        status, _, body = read_response(s)
    assert status == 431 and "header lines" in json.loads(body)["detail"]


def test_a_head_at_the_limit_is_served(guarded: Server) -> None:
    """The limit refuses only what exceeds it: 30 KB of headers still get their answer."""
    with connect(guarded) as s:
        s.sendall(request("GET", "/healthz", X_Fill="a" * 30_000))
        assert read_response(s)[0] == 200


# -- finding 5: slowloris --------------------------------------------------------------------------


def test_a_trickled_request_head_is_cut_after_the_head_timeout(guarded: Server) -> None:
    """ISOMAX_HEADER_TIMEOUT_S=1: a head sent one piece at a time gets 408 and the close;
    a connection that sends nothing is closed; both while /healthz keeps answering."""
    trickle, silent = connect(guarded), connect(guarded)
    with trickle, silent:
        trickle.sendall(b"GET /healthz HTTP/1.1\r\n")
        t0 = time.monotonic()
        for i in range(20):  # ~4 s of one header line every 0.2 s, unless cut first
            try:
                trickle.sendall(f"X-{i}: y\r\n".encode())
            except (BrokenPipeError, ConnectionResetError):
                break
            time.sleep(0.2)
        status, _, body = read_response(trickle)
        assert status == 408, body
        assert "within 1 s" in json.loads(body)["detail"]
        assert time.monotonic() - t0 < SOCKET_TIMEOUT_S
        assert closed_by_server(silent)
    assert healthz_ok(guarded)


# -- finding 4: bodies ---------------------------------------------------------------------------


def test_a_stalled_body_is_cut_after_the_body_timeout(guarded: Server) -> None:
    with connect(guarded) as s:
        s.sendall(request("POST", "/classify", Content_Type="image/png").replace(
            b"Content-Length: 0", b"Content-Length: 100000"
        ) + PNG[:50])  # fmt: skip
        status, _, body = read_response(s)
    assert status == 408 and "stalled" in json.loads(body)["detail"]
    assert healthz_ok(guarded)


# -- finding 10: shutdown ------------------------------------------------------------------------


def test_keep_alive_requests_just_after_sigterm_are_answered(
    models_dir: Path, tmp_path: Path
) -> None:
    """Idle keep-alive connections when SIGTERM arrives: a request written right after it gets
    a complete answer with Connection: close (uvicorn alone closed them: EOF or reset)."""
    with run_server(models_dir, tmp_path / "log") as srv:
        conns = [connect(srv) for _ in range(20)]
        for s in conns:
            s.sendall(classify_png())
            assert read_response(s)[0] == 200
        srv.proc.send_signal(signal.SIGTERM)
        time.sleep(0.2)  # the server is shutting down now
        answers = []
        for s in conns:
            try:
                s.sendall(classify_png())
                status, headers, _ = read_response(s)
                answers.append((status, headers.get("connection")))
            except (ConnectionError, http.client.RemoteDisconnected) as e:
                answers.append((type(e).__name__, None))
            s.close()
        assert answers == [(200, "close")] * len(conns)
        assert srv.proc.wait(30) in (0, -signal.SIGTERM)
