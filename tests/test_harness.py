"""The server harness (tests/harness.py) on its own: what tests, benchmarks and the GPU check rely on.

Its main user, `isomax serve` under the service tests, is covered there; here, the edges: a
process that dies before it is ready, one that never gets ready, the process group stopped
with the server, and the multipart encoding read back by the parser the service uses.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from python_multipart.multipart import MultipartParser, parse_options_header

from tests import harness

# A server with a child that outlives its parent's end unless the harness finds it: the child
# starts a session of its own (as BentoML's workers do), so neither the server's process group
# nor its session reaches it, only the parent link.
SERVER_WITH_CHILD = textwrap.dedent(
    """
    import http.server, subprocess, sys
    child = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(600)"], start_new_session=True
    )
    print("child", child.pid, flush=True)
    http.server.ThreadingHTTPServer(
        ("127.0.0.1", int(sys.argv[1])), http.server.SimpleHTTPRequestHandler
    ).serve_forever()
    """
)


def test_multipart_reads_back_with_the_services_parser() -> None:
    files = [("a.png", b"\x89PNG\r\n--not-a-boundary\r\n\x00"), ("b b.png", b"")]
    body, ctype = harness.multipart(files, field="file")
    _, options = parse_options_header(ctype)
    parts: list[dict[str, bytes]] = []
    header: list[bytes] = [b"", b""]

    def on_part_begin() -> None:
        parts.append({"headers": b"", "data": b""})

    def on_header_field(data: bytes, start: int, end: int) -> None:
        header[0] += data[start:end]

    def on_header_value(data: bytes, start: int, end: int) -> None:
        header[1] += data[start:end]

    def on_header_end() -> None:
        parts[-1]["headers"] += header[0] + b": " + header[1] + b"\n"
        header[:] = [b"", b""]

    def on_part_data(data: bytes, start: int, end: int) -> None:
        parts[-1]["data"] += data[start:end]

    parser = MultipartParser(
        options[b"boundary"],
        {
            "on_part_begin": on_part_begin,
            "on_header_field": on_header_field,
            "on_header_value": on_header_value,
            "on_header_end": on_header_end,
            "on_part_data": on_part_data,
        },  # type: ignore[arg-type]
    )
    parser.write(body)
    parser.finalize()
    assert [p["data"] for p in parts] == [data for _, data in files]
    for part, (name, _) in zip(parts, files, strict=True):
        assert f'name="file"; filename="{name}"'.encode() in part["headers"]


def test_a_server_that_exits_early_is_reported_with_its_log(tmp_path: Path) -> None:
    cmd = [sys.executable, "-c", "print('no model here'); raise SystemExit(3)"]
    with pytest.raises(RuntimeError, match=r"exited with 3[\s\S]*no model here"):
        harness.start(cmd, harness.free_port(), tmp_path / "log", timeout=30)


def test_a_server_never_ready_times_out_and_is_stopped_with_its_children(
    tmp_path: Path,
) -> None:
    port = harness.free_port()
    cmd = [sys.executable, "-c", SERVER_WITH_CHILD, str(port)]
    never = harness.status_is("/", 418)  # it answers, but never with this status
    with pytest.raises(TimeoutError, match="not ready after 3 s"):
        harness.start(cmd, port, tmp_path / "log", ready=never, timeout=3)
    child = int((tmp_path / "log").read_text().split()[1])
    assert not _alive(child)


def test_serve_yields_a_ready_server_and_stops_its_process_group(tmp_path: Path) -> None:
    port = harness.free_port()
    (tmp_path / "index.html").write_text("hello")
    cmd = [sys.executable, "-c", SERVER_WITH_CHILD, str(port)]
    with harness.serve(
        cmd, port, tmp_path / "log", cwd=tmp_path, ready=harness.status_is("/"), timeout=30
    ) as server:
        assert server.get("/index.html") == (200, b"hello")
        assert server.get("/missing")[0] == 404
        child = int(server.log_text().split()[1])
        assert _alive(child, grace_s=0)
    assert server.proc.poll() is not None
    assert not _alive(child)
    with pytest.raises(OSError):
        server.get("/index.html", timeout=2)


def _alive(pid: int, grace_s: float = 5.0) -> bool:
    """pid still runs (not gone, not a zombie) after up to `grace_s` for a killed one to go."""
    deadline = time.monotonic() + grace_s
    while True:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            return False
        if state == "Z" or time.monotonic() > deadline:
            return state != "Z"
        time.sleep(0.05)


def test_workers_in_reads_the_flag() -> None:
    assert harness.workers_in(["--max-wait-ms", "2"]) == 1
    assert harness.workers_in(["--workers", "2"]) == 2
    assert harness.workers_in(["--workers=3", "--log-level", "info"]) == 3


def test_service_env_drops_isomax_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ISOMAX_MAX_BATCH_SIZE", "7")
    env = harness.service_env(ISOMAX_DEVICE="cpu")
    assert "ISOMAX_MAX_BATCH_SIZE" not in env
    assert env["ISOMAX_DEVICE"] == "cpu" and env["PATH"] == os.environ["PATH"]
    assert subprocess.run([sys.executable, "-c", "0"], env=env).returncode == 0
