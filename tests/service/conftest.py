"""Fixtures: tiny bundles, an in-process client (lifespan runs), a real uvicorn server."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from service.settings import Settings
from tests.service.bundles import write_bundle
from tests.service.cases import TEST_LIMITS, bomb_png

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """models/tiny/1 and models/tiny/2 (newest, served by default)."""
    root = tmp_path_factory.mktemp("models")
    write_bundle(root, "tiny", "1", seed=0)
    write_bundle(root, "tiny", "2", seed=0)
    return root


def wait_ready(client: TestClient | httpx.Client, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        r = client.get("/readyz")
        if r.status_code == 200:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"not ready after {timeout} s: {r.text}")
        time.sleep(0.02)


@contextmanager
def app_client(**settings: object) -> Iterator[TestClient]:
    """In-process client; lifespan runs. Does not wait for readiness."""
    app = create_app(Settings(**settings))  # type: ignore[arg-type]
    with TestClient(app) as client:
        yield client


@pytest.fixture()
def client(models_dir: Path) -> Iterator[TestClient]:
    with app_client(models_dir=models_dir, max_wait_ms=1, **TEST_LIMITS) as c:
        wait_ready(c)
        yield c


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Server:
    url: str
    proc: subprocess.Popen[bytes]
    log: Path

    def client(self, **kw: object) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=30.0, **kw)  # type: ignore[arg-type]

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


@contextmanager
def run_server(models_dir: Path, log: Path, *args: str, **env: str) -> Iterator[Server]:
    """`python -m isomax serve` on a free port, ready when this yields; SIGTERM at the end."""
    port = free_port()
    environ = {k: v for k, v in os.environ.items() if not k.startswith("ISOMAX_")}
    environ.update(env)
    environ["PYTHONUNBUFFERED"] = "1"
    cmd = [sys.executable, "-m", "isomax", "serve", "--host", "127.0.0.1", "--port", str(port)]
    cmd += ["--models-dir", str(models_dir), *args]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, env=environ, stdout=out, stderr=subprocess.STDOUT)
    server = Server(f"http://127.0.0.1:{port}", proc, log)
    try:
        with server.client() as c:
            deadline = time.monotonic() + 60
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"server exited {proc.returncode}:\n{server.log_text()}")
                try:
                    if c.get("/readyz").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline:
                    raise TimeoutError(f"server not ready:\n{server.log_text()}")
                time.sleep(0.05)
        yield server
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@pytest.fixture(scope="module")
def server(models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    log = tmp_path_factory.mktemp("server") / "server.log"
    limits = {f"ISOMAX_{k.upper()}": str(v) for k, v in TEST_LIMITS.items()}
    with run_server(models_dir, log, "--max-wait-ms", "2", **limits) as s:
        yield s


@pytest.fixture(scope="session")
def bomb() -> bytes:
    return bomb_png()
