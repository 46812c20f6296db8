"""Start an HTTP server process, wait until it is ready, talk to it, stop it: standard library only.

One harness for everything that runs a real server: the service tests, the Prometheus
end-to-end test, the benchmarks (bench/) and the GPU check (scripts/gpu_check.py). It assumes a
repository checkout (servers start in its root), so it lives with the tests, not in the
installed package: `tests` is a package, and pytest, the benchmarks and the GPU check all have
the repository root on sys.path already, so each imports it as `from tests import harness`.
It imports nothing beyond the standard library, so the GPU check can use it on a bare host.

    with isomax_serve(models_dir, log, "--max-wait-ms", "2") as srv:
        status, body = srv.post("/classify", *multipart([("a.png", png)]))

`serve(cmd, ...)` is the same for any server command (the benchmark's peers): what "ready"
means is a function of the running `Server`, by default `GET /readyz` answering 200.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HOST = "127.0.0.1"
REPO = Path(__file__).resolve().parents[1]
# The service logs this once per model and worker process when the model is warmed up.
_MODEL_READY_LINE = re.compile(r"model \S+ ready on \S+")


def free_port(host: str = HOST) -> int:
    """A TCP port nobody listens on now (the OS picks it; the server binds it a moment later)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def multipart(
    files: Sequence[tuple[str, bytes]], field: str = "file", content_type: str = "image/png"
) -> tuple[bytes, str]:
    """(body, Content-Type) of a multipart/form-data form: one part named `field` per file."""
    boundary = uuid.uuid4().hex
    chunks = []
    for filename, data in files:
        chunks.append(
            f'--{boundary}\r\nContent-Disposition: form-data; name="{field}"; '
            f'filename="{filename}"\r\nContent-Type: {content_type}\r\n\r\n'.encode()
        )
        chunks.append(data + b"\r\n")
    chunks.append(f"--{boundary}--\r\n".encode())
    return b"".join(chunks), f"multipart/form-data; boundary={boundary}"


def request(
    method: str,
    url: str,
    body: bytes | None = None,
    content_type: str | None = None,
    timeout: float = 30.0,
    headers: Mapping[str, str] | None = None,
) -> tuple[int, bytes]:
    """(status, body) of one HTTP request on a fresh connection; 4xx/5xx are answers, not errors.

    Connection errors (refused, reset, timed out) raise OSError.
    """
    m = re.match(r"http://([^/:]+)(?::(\d+))?(/.*)?$", url)
    if not m:
        raise ValueError(f"not an http:// URL: {url!r}")
    host, port, path = m.group(1), int(m.group(2) or 80), m.group(3) or "/"
    hdrs = dict(headers or {})
    if content_type is not None:
        hdrs["Content-Type"] = content_type
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=hdrs)
        response = conn.getresponse()
        return response.status, response.read()
    except http.client.HTTPException as e:  # a malformed or cut answer: the server is not up
        raise ConnectionError(f"{method} {url}: {type(e).__name__}: {e}") from e
    finally:
        conn.close()


@dataclass
class Server:
    """A running server process: its base URL, the process and its log file."""

    url: str
    port: int
    proc: subprocess.Popen[bytes]
    log: Path

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def log_tail(self, n: int = 3000) -> str:
        return self.log_text()[-n:]

    def get(self, path: str, timeout: float = 30.0) -> tuple[int, bytes]:
        return request("GET", self.url + path, timeout=timeout)

    def post(
        self,
        path: str,
        body: bytes,
        content_type: str,
        timeout: float = 30.0,
        headers: Mapping[str, str] | None = None,
    ) -> tuple[int, bytes]:
        return request("POST", self.url + path, body, content_type, timeout, headers)

    def get_json(self, path: str, timeout: float = 30.0) -> tuple[int, Any]:
        status, body = self.get(path, timeout)
        return status, json.loads(body)


ReadyCheck = Callable[[Server], bool]


def status_is(path: str, *statuses: int) -> ReadyCheck:
    """Ready when GET `path` answers one of `statuses` (default 200)."""
    wanted = statuses or (200,)

    def check(server: Server) -> bool:
        return server.get(path, timeout=5)[0] in wanted

    return check


readyz_ok = status_is("/readyz")


def every_worker_ready(workers: int) -> ReadyCheck:
    """`/readyz` answers 200 and each of `workers` processes has logged every model as ready.

    With several workers, /readyz is answered by whichever process accepts the connection, so
    one 200 says nothing about the others; the service logs "model ... ready on ..." once per
    model and process (at log level info, its default), which does.
    """

    def check(server: Server) -> bool:
        status, body = server.get_json("/readyz", timeout=5)
        if status != 200:
            return False
        if workers == 1:
            return True
        n_models = len(body.get("models", {})) or 1
        return len(_MODEL_READY_LINE.findall(server.log_text())) >= workers * n_models

    return check


def start(
    cmd: Sequence[str],
    port: int,
    log: Path,
    *,
    env: Mapping[str, str] | None = None,
    cwd: Path | str | None = None,
    ready: ReadyCheck = readyz_ok,
    timeout: float = 60.0,
    poll_s: float = 0.05,
) -> Server:
    """Start `cmd` (which must listen on `port`), its output in `log`; return once `ready`.

    Raises RuntimeError (with the log's tail) when the process exits first, TimeoutError when
    it is not ready in `timeout` seconds; in both cases the process is stopped.
    """
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            list(cmd),
            cwd=str(cwd or REPO),
            env=dict(env) if env is not None else None,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: stop() reaches every child
        )
    server = Server(f"http://{HOST}:{port}", port, proc, log)
    deadline = time.monotonic() + timeout
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(
                    f"{Path(cmd[0]).name} exited with {proc.returncode} before it was ready:\n"
                    f"{server.log_tail()}"
                )
            try:
                if ready(server):
                    return server
            except (OSError, ValueError):  # not listening yet, or a half-started answer
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"not ready after {timeout:.0f} s:\n{server.log_tail()}")
            time.sleep(poll_s)
    except BaseException:
        stop(server)
        raise


def stop(server: Server, timeout: float = 30.0) -> int:
    """Stop the server and everything it started; its exit status.

    SIGTERM to its process group, SIGKILL after `timeout` s. Then whatever is left of its
    processes (`processes`: Ray's actors put themselves in groups of their own, BentoML's
    workers in sessions of their own) gets SIGTERM and `timeout` s to finish, then SIGKILL, so
    that nothing of one server runs beside the next.
    """
    proc = server.proc
    tree = set(processes(proc.pid))  # before the leader goes: its children are found by parent
    if proc.poll() is None:
        _signal_group(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            _signal_group(proc.pid, signal.SIGKILL)
            proc.wait()
    _signal_group(proc.pid, signal.SIGKILL)  # children that outlived their parent

    def left() -> list[int]:
        running = _running()
        return [p for p in tree | set(processes(proc.pid, running)) if p in running]

    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in left():
            with suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)
        deadline = time.monotonic() + timeout
        while left() and time.monotonic() < deadline:
            time.sleep(0.1)
    return proc.returncode


def _running() -> dict[int, tuple[int, int]]:
    """pid -> (parent pid, session id) of every process that is not a zombie, from /proc."""
    table: dict[int, tuple[int, int]] = {}
    try:
        entries = os.listdir("/proc")
    except OSError:
        return table
    for name in entries:
        if not name.isdigit():
            continue
        try:
            fields = Path(f"/proc/{name}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z":
            table[int(name)] = (int(fields[1]), int(fields[3]))
    return table


def processes(root: int, table: Mapping[int, tuple[int, int]] | None = None) -> list[int]:
    """`root`, the processes of the session it leads, and all their descendants (running ones).

    The harness starts each server as the leader of a new session; most of what a server
    spawns stays in it, and what starts a session of its own is still its descendant.
    """
    table = _running() if table is None else table
    found = {pid for pid, (_, sid) in table.items() if pid == root or sid == root}
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    todo = list(found)
    while todo:
        for child in children.get(todo.pop(), ()):
            if child not in found:
                found.add(child)
                todo.append(child)
    return sorted(found)


def _signal_group(pgid: int, sig: int) -> None:
    with suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


@contextmanager
def serve(
    cmd: Sequence[str],
    port: int,
    log: Path,
    *,
    env: Mapping[str, str] | None = None,
    cwd: Path | str | None = None,
    ready: ReadyCheck = readyz_ok,
    timeout: float = 60.0,
) -> Iterator[Server]:
    """`start` for the duration of a with-block; always stopped after it."""
    server = start(cmd, port, log, env=env, cwd=cwd, ready=ready, timeout=timeout)
    try:
        yield server
    finally:
        stop(server)


def service_env(**overrides: str) -> dict[str, str]:
    """This process's environment without ISOMAX_* settings (so only the flags given apply)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ISOMAX_")}
    env["PYTHONUNBUFFERED"] = "1"
    env.update(overrides)
    return env


def isomax_serve_command(
    models_dir: Path | str, port: int, *args: str, python: str = sys.executable
) -> list[str]:
    """`python -m isomax serve` on loopback at `port` over `models_dir`, plus `args`."""
    return [
        python, "-m", "isomax", "serve", "--host", HOST, "--port", str(port),
        "--models-dir", str(models_dir), *args,
    ]  # fmt: skip


def workers_in(args: Sequence[str]) -> int:
    """The --workers value among `isomax serve` arguments (1 when absent)."""
    args = list(args)
    for i, a in enumerate(args):
        if a == "--workers" and i + 1 < len(args):
            return int(args[i + 1])
        if a.startswith("--workers="):
            return int(a.split("=", 1)[1])
    return 1


@contextmanager
def isomax_serve(
    models_dir: Path | str,
    log: Path,
    *args: str,
    env: Mapping[str, str] | None = None,
    ready: ReadyCheck | None = None,
    timeout: float = 90.0,
    python: str = sys.executable,
) -> Iterator[Server]:
    """`isomax serve` on a free port, yielded once every worker has every model ready.

    `env` is added to this process's environment less its ISOMAX_* variables; `ready`
    replaces the default check (e.g. to wait for models that are expected to fail).
    """
    port = free_port()
    check = ready or every_worker_ready(workers_in(args))
    cmd = isomax_serve_command(models_dir, port, *args, python=python)
    with serve(
        cmd, port, log, env=service_env(**dict(env or {})), ready=check, timeout=timeout
    ) as s:
        yield s
