"""Fixtures: tiny bundles, an in-process client (lifespan runs), a real uvicorn server."""

from __future__ import annotations

import subprocess
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
from tests import harness
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


@dataclass
class Server:
    """A running `isomax serve` (the harness's process) with an httpx client factory."""

    url: str
    proc: subprocess.Popen[bytes]
    log: Path

    def client(self, **kw: object) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=30.0, **kw)  # type: ignore[arg-type]

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


@contextmanager
def run_server(models_dir: Path, log: Path, *args: str, **env: str) -> Iterator[Server]:
    """`python -m isomax serve` on a free port, yielded when every worker is ready; SIGTERM at
    the end. `env` adds ISOMAX_* (or other) variables to an environment without ISOMAX_*."""
    with harness.isomax_serve(models_dir, log, *args, env=env) as srv:
        yield Server(srv.url, srv.proc, srv.log)


@pytest.fixture(scope="module")
def server(models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    log = tmp_path_factory.mktemp("server") / "server.log"
    limits = {f"ISOMAX_{k.upper()}": str(v) for k, v in TEST_LIMITS.items()}
    with run_server(models_dir, log, "--max-wait-ms", "2", **limits) as s:
        yield s


@pytest.fixture(scope="session")
def bomb() -> bytes:
    return bomb_png()
