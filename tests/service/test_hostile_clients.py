"""Hostile clients against a real `isomax serve` process: each attack is refused early and cheaply
while the server keeps serving others. Every socket has a timeout, so a server that does not
defend itself fails these tests instead of hanging them.
"""

from __future__ import annotations

import contextlib
import http.client
import io
import json
import signal
import socket
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from PIL import Image

from tests import harness
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
    assert "request head incomplete after 1 s" in guarded.log_text()  # visible to operators


# -- finding 4: bodies ---------------------------------------------------------------------------


def test_a_stalled_body_is_cut_after_the_body_timeout(guarded: Server) -> None:
    with connect(guarded) as s:
        s.sendall(request("POST", "/classify", Content_Type="image/png").replace(
            b"Content-Length: 0", b"Content-Length: 100000"
        ) + PNG[:50])  # fmt: skip
        status, _, body = read_response(s)
    assert status == 408 and "stalled" in json.loads(body)["detail"]
    assert healthz_ok(guarded)


def test_body_bytes_in_flight_are_capped_across_connections(
    models_dir: Path, tmp_path: Path
) -> None:
    """Two uploads of 1 MiB, all but 10 bytes sent, then stalled, hold a 2 MiB budget: a third
    is refused with 503 + Retry-After before its body is read; once they are gone, uploads are
    taken again. (Declared bytes that never arrive hold nothing: test_hostile_round_two.py.)"""
    env = {
        "ISOMAX_MAX_INFLIGHT_BODY_BYTES": str(2 * 1024 * 1024),
        "ISOMAX_MAX_BODY_BYTES": str(1024 * 1024),
        "ISOMAX_MAX_IMAGE_BYTES": str(1024 * 1024),
        "ISOMAX_BODY_TIMEOUT_S": "30",
    }
    with run_server(models_dir, tmp_path / "log", **env) as srv:
        held = [connect(srv) for _ in range(2)]
        head = request("POST", "/classify", Content_Type="image/png")
        head = head.replace(b"Content-Length: 0", f"Content-Length: {1024 * 1024}".encode())
        for s in held:
            s.sendall(head + b"\0" * (1024 * 1024 - 10))
        time.sleep(1.0)  # both are read up to their last 10 bytes
        with connect(srv) as s:
            s.sendall(head)
            status, headers, body = read_response(s)
        assert status == 503, body
        assert headers["retry-after"] and headers["connection"] == "close"
        assert "in flight" in json.loads(body)["detail"]
        for s in held:
            s.close()
        time.sleep(0.5)
        with connect(srv) as s:
            s.sendall(classify_png())
            assert read_response(s)[0] == 200


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
        assert srv.proc.wait(30) == 0  # a graceful stop (service/server.py)


@pytest.mark.parametrize(
    ("path", "content_type", "start", "key"),
    [
        ("/classify", "image/png", PNG[:20], "detail"),
        # v2 infer answers in v2's error format (service/shutdown.py, one wrapper for both)
        ("/v2/models/tiny/infer", "application/json", b'{"inputs": [{"name": "image_by', "error"),
    ],
    ids=["classify", "v2-infer"],
)
def test_a_request_cut_by_the_graceful_timeout_gets_a_json_503(
    models_dir: Path, tmp_path: Path, path: str, content_type: str, start: bytes, key: str
) -> None:
    """A request still reading its body when ISOMAX_GRACEFUL_TIMEOUT_S=1 runs out is answered
    with the JSON 503 and Retry-After, not uvicorn's plain-text 500; the log has one line for it,
    not "Exception in ASGI application" with a CancelledError traceback; the exit status is 0."""
    env = {"ISOMAX_GRACEFUL_TIMEOUT_S": "1", "ISOMAX_BODY_TIMEOUT_S": "30"}
    with run_server(models_dir, tmp_path / "log", **env) as srv, connect(srv) as s:
        head = request("POST", path, Content_Type=content_type)
        s.sendall(head.replace(b"Content-Length: 0", b"Content-Length: 5000") + start)
        time.sleep(0.3)
        srv.proc.send_signal(signal.SIGTERM)
        status, headers, body = read_response(s)
        assert status == 503, body
        assert headers["content-type"] == "application/json" and headers["retry-after"]
        assert headers["connection"] == "close"
        assert list(json.loads(body)) == [key] and "shutting down" in json.loads(body)[key]
        assert srv.proc.wait(30) == 0
        log = srv.log_text()
        assert "Traceback" not in log and "Exception in ASGI application" not in log
        cut = [line for line in log.splitlines() if "cut by the graceful-shutdown timeout" in line]
        assert len(cut) == 1 and f"POST {path} from 127.0.0.1:" in cut[0], log


# -- findings 2 and 6: decoded bytes ---------------------------------------------------------------


def png_gray16(width: int, height: int) -> bytes:
    """A valid 16-bit grayscale PNG of zeros: a few KB on the wire, 2 bytes per pixel decoded."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return len(data).to_bytes(4, "big") + kind + data + crc.to_bytes(4, "big")

    ihdr = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([16, 0, 0, 0, 0])
    comp = zlib.compressobj(9)
    row = b"\x00" * (2 * width + 1)
    idat = b"".join(comp.compress(row) for _ in range(height)) + comp.flush()
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def peak_rss_kib(pid: int) -> int:
    """VmHWM: the most resident memory the process has had so far."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise RuntimeError("no VmHWM")


# Peak memory the refused requests below may add to the server, in KiB: their bodies, parsing and
# one image header each. Decoding one of them would add at least 50 MB (the 16-bit pixels alone).
PEAK_GROWTH_BOUND_KIB = 20 * 1024


def test_a_16bit_5000x5000_png_is_refused_before_decoding(models_dir: Path, tmp_path: Path) -> None:
    """25 Mpx (within the pixel limit) x 2 bytes = 50 MB decoded > 40 MiB: 413 from the header,
    and the server's peak memory stays within PEAK_GROWTH_BOUND_KIB. Four of them in one
    request, each under a raised per-image limit, exceed the per-request budget."""
    big = png_gray16(5000, 5000)
    with run_server(models_dir, tmp_path / "log") as srv:
        with connect(srv) as s:  # warm: the first requests allocate the server's own buffers
            s.sendall(classify_png())
            assert read_response(s)[0] == 200
        before = peak_rss_kib(srv.proc.pid)
        for _ in range(3):
            with connect(srv) as s:
                s.sendall(request("POST", "/classify", big, Content_Type="image/png"))
                status, _, body = read_response(s)
            assert status == 413, body
            assert "40 MiB" in json.loads(body)["detail"] or "41943040" in body.decode()
        growth = peak_rss_kib(srv.proc.pid) - before
    assert growth < PEAK_GROWTH_BOUND_KIB, f"peak memory grew by {growth} KiB"


def test_a_12_megapixel_photo_is_served_under_the_default_limits(guarded: Server) -> None:
    """The decoded-bytes limit refuses what would decode big, not big photos: a JPEG is
    counted at the scale its decoder will use for the model (draft)."""
    buf = io.BytesIO()
    Image.new("RGB", (4032, 3024), (120, 30, 200)).save(buf, "JPEG", quality=90)
    with guarded.client() as c:
        r = c.post("/classify", content=buf.getvalue(), headers={"content-type": "image/jpeg"})
    assert r.status_code == 200, r.text


def test_the_decoded_bytes_of_a_request_are_bounded(models_dir: Path, tmp_path: Path) -> None:
    part = png_gray16(3000, 3000)  # 18 MB decoded each
    env = {"ISOMAX_MAX_REQUEST_DECODED_BYTES": str(64 * 1024 * 1024)}
    with run_server(models_dir, tmp_path / "log", **env) as srv, srv.client() as c:
        files = [("file", (f"{i}.png", part, "image/png")) for i in range(4)]
        r = c.post("/classify", files=files)
        assert r.status_code == 413, r.text
        assert "per request" in r.json()["detail"]
        r = c.post("/classify", files=files[:3])  # 54 MB: within the budget
        assert r.status_code == 200, r.text


# -- finding 7: formats --------------------------------------------------------------------------


def test_only_allowed_formats_reach_a_decoder(guarded: Server) -> None:
    """A TGA (which Pillow reads) sent as image/png is refused as not an allowed format; so is
    an EPS (which Pillow would hand to Ghostscript)."""
    buf = io.BytesIO()
    Image.new("L", (28, 28), 100).save(buf, "TGA")
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 28 28\nshowpage\n%%EOF\n"
    with guarded.client() as c:
        for data in (buf.getvalue(), eps):
            r = c.post("/classify", content=data, headers={"content-type": "image/png"})
            assert r.status_code == 400, r.text
            assert "not PNG, JPEG, WebP, BMP, GIF, TIFF or PPM" in r.json()["detail"]
    assert "Ghostscript" not in guarded.log_text()


# -- finding 3: admission --------------------------------------------------------------------------


def test_a_full_queue_refuses_before_reading_the_body(models_dir: Path, tmp_path: Path) -> None:
    """ISOMAX_MAX_QUEUE_IMAGES=4: four uploads being read hold the four places; a fifth request
    is refused with 503 + Retry-After from its head alone (its body is never sent), and is
    taken again once the places are free."""
    env = {
        "ISOMAX_MAX_QUEUE_IMAGES": "4",
        "ISOMAX_MAX_IMAGES_PER_REQUEST": "4",
        "ISOMAX_BODY_TIMEOUT_S": "30",
    }
    with run_server(models_dir, tmp_path / "log", **env) as srv:
        head = request("POST", "/classify", Content_Type="image/png")
        head = head.replace(b"Content-Length: 0", f"Content-Length: {len(PNG)}".encode())
        held = [connect(srv) for _ in range(4)]
        for s in held:
            s.sendall(head + PNG[:10])
        time.sleep(0.5)
        with connect(srv) as s:
            s.sendall(head)  # no body at all
            status, headers, body = read_response(s)
        assert status == 503, body
        assert headers["retry-after"] and headers["connection"] == "close"
        assert "4 requests being read" in json.loads(body)["detail"]
        for s in held:  # the held uploads complete and are answered
            s.sendall(PNG[10:])
            assert read_response(s)[0] == 200
            s.close()
        with connect(srv) as s:
            s.sendall(classify_png())
            assert read_response(s)[0] == 200


# -- finding 11: disclosure ----------------------------------------------------------------------


def test_errors_name_no_server_path_nor_raw_engine_message(tmp_path: Path) -> None:
    """A bundle onnxruntime cannot load (bytes that are no ONNX graph, with a matching sha256):
    /readyz, /models and the 503 say which bundle and why in the service's words; the absolute
    models directory and onnxruntime's own message stay in the server log. A long model= value
    comes back cut (or not at all)."""
    import hashlib

    from tests.service.bundles import write_bundle

    models = tmp_path / "models"
    write_bundle(models, "good", "1")
    bad = write_bundle(models, "broken", "1")
    junk = b"this is not an onnx graph " * 20
    (bad / "model.onnx").write_bytes(junk)
    manifest = json.loads((bad / "manifest.json").read_text())
    manifest["onnx"]["sha256"] = hashlib.sha256(junk).hexdigest()
    (bad / "manifest.json").write_text(json.dumps(manifest))
    # Ready to test when /readyz says 503: the good model loaded, the broken one failed.
    with (
        harness.isomax_serve(models, tmp_path / "log", ready=harness.status_is("/readyz", 503))
        as srv,
        httpx.Client(base_url=srv.url, timeout=30) as c,
    ):  # fmt: skip
        deadline = time.monotonic() + 30
        while "failed" not in c.get("/models").text and time.monotonic() < deadline:
            time.sleep(0.1)
        answers = [
            c.get("/readyz"),
            c.get("/models"),
            c.post("/classify", params={"model": "broken"}, content=PNG,
                   headers={"content-type": "image/png"}),
        ]  # fmt: skip
        long_name = c.post(
            "/classify", params={"model": "x" * 5000}, content=PNG,
            headers={"content-type": "image/png"},
        )  # fmt: skip
        log = srv.log_text()
    text = " ".join(r.text for r in answers)
    assert "broken" in text and "onnxruntime cannot load" in text
    assert str(models) not in text and str(tmp_path) not in text
    assert "INVALID_PROTOBUF" not in text and "Protobuf parsing failed" not in text
    assert "INVALID_PROTOBUF" in log or "Protobuf" in log  # the log keeps the engine's words
    assert long_name.status_code in (404, 422) and len(long_name.text) < 400


# -- finding 13: Host header and CORS ----------------------------------------------------------


def test_trusted_hosts_and_cors_when_configured(models_dir: Path, tmp_path: Path) -> None:
    """ISOMAX_TRUSTED_HOSTS: another Host header gets 400 on every route, /classify included
    (a DNS-rebinding page names its own host). ISOMAX_CORS_ORIGINS: that origin may call the
    API from a browser; another is refused its preflight."""
    env = {
        "ISOMAX_TRUSTED_HOSTS": "api.example.com,127.0.0.1",
        "ISOMAX_CORS_ORIGINS": "https://app.example.com",
    }
    png = {"content-type": "image/png"}
    with run_server(models_dir, tmp_path / "log", **env) as srv, srv.client() as c:
        assert c.get("/healthz", headers={"host": "api.example.com"}).status_code == 200
        assert c.get("/healthz", headers={"host": "rebind.attacker.test"}).status_code == 400
        r = c.post("/classify", content=PNG, headers={**png, "host": "rebind.attacker.test"})
        assert r.status_code == 400
        r = c.post("/classify", content=PNG, headers={**png, "origin": "https://app.example.com"})
        assert r.status_code == 200
        assert r.headers["access-control-allow-origin"] == "https://app.example.com"
        preflight = {"access-control-request-method": "POST"}
        ok = c.options("/classify", headers={**preflight, "origin": "https://app.example.com"})
        assert ok.status_code == 200
        bad = c.options("/classify", headers={**preflight, "origin": "https://evil.test"})
        assert bad.status_code == 400 and "access-control-allow-origin" not in bad.headers


def test_no_cross_origin_grant_by_default(guarded: Server) -> None:
    with guarded.client() as c:
        r = c.post(
            "/classify",
            content=PNG,
            headers={"content-type": "image/png", "origin": "https://evil.test"},
        )
        assert r.status_code == 200 and "access-control-allow-origin" not in r.headers
        assert c.get("/healthz", headers={"host": "any.name.test"}).status_code == 200


def test_the_limited_protocol_keeps_http_semantics(guarded: Server) -> None:
    """The protocol with limits (service/http_protocol.py) changes nothing a well-behaved
    client sees: keep-alive, HEAD (a head and no body), `Expect: 100-continue` (the interim 100
    before the answer) and pipelined requests all answer in order on one connection."""
    with connect(guarded) as s:
        s.sendall(classify_png())
        status, headers, body = read_response(s)
        assert status == 200 and json.loads(body)["results"][0]["class_index"] >= 0
        assert int(headers["content-length"]) == len(body)

        s.sendall(request("HEAD", "/static/page.css"))
        resp = http.client.HTTPResponse(s, method="HEAD")
        resp.begin()
        assert resp.status == 200 and resp.read() == b""
        assert int(resp.getheader("content-length", "0")) > 0  # the GET's length, no body

        head = request("POST", "/classify", Content_Type="image/png", Expect="100-continue")
        s.sendall(head.replace(b"Content-Length: 0", f"Content-Length: {len(PNG)}".encode()))
        interim = s.recv(64)
        assert interim.startswith(b"HTTP/1.1 100 Continue\r\n\r\n")
        s.sendall(PNG)
        assert read_response(s)[0] == 200

        s.sendall(classify_png() + request("GET", "/healthz") + classify_png())
        stream = s.makefile("rb")  # one buffer: the answers may arrive in one segment
        answers = [read_pipelined(stream) for _ in range(3)]
        assert [a[0] for a in answers] == [200, 200, 200]
        assert "results" in json.loads(answers[0][1]) and "results" in json.loads(answers[2][1])
        assert json.loads(answers[1][1])["status"] == "ok"


def read_pipelined(stream: io.BufferedReader) -> tuple[int, bytes]:
    """(status, body) of the next response on a buffered stream (a Content-Length body)."""
    status = int(stream.readline().split()[1])
    length = 0
    while (line := stream.readline()) not in (b"\r\n", b""):
        name, _, value = line.decode("latin-1").partition(":")
        if name.strip().lower() == "content-length":
            length = int(value)
    return status, stream.read(length)
