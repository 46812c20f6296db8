"""The OpenAPI document against the real server: schemathesis (every check) generates requests
from /openapi.json and finds no answer that contradicts it.

A bounded budget: deterministic generation, a few dozen examples per operation (seconds, not
minutes). A failure prints schemathesis's report, with a curl command per case.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.service.conftest import Server

CONFIG = Path(__file__).with_name("schemathesis.toml")

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def test_every_schemathesis_check_passes(server: Server, tmp_path: Path) -> None:
    exe = shutil.which("schemathesis", path=str(Path(sys.executable).parent))
    if exe is None:
        pytest.fail("schemathesis is not installed (the dev extra has it)")
    cmd = [
        exe, "--config-file", str(CONFIG), "run", f"{server.url}/openapi.json",
        "--checks", "all", "--max-examples", "40", "--generation-deterministic",
        "--request-timeout", "10", "--no-color",
    ]  # fmt: skip
    # cwd: schemathesis keeps a cache directory where it runs
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-20000:] + r.stderr[-2000:]
    assert "failures" not in r.stdout.splitlines()[-1] or " 0 failures" in r.stdout


def test_top_k_above_the_number_of_labels_lists_them_all(server: Server) -> None:
    """The document bounds top_k below only (one document for models of any size)."""
    from tests.service.cases import PNG

    with server.client() as c:
        r = c.post(
            "/classify", params={"top_k": 10**9}, content=PNG, headers={"content-type": "image/png"}
        )
    assert r.status_code == 200, r.text
    (result,) = r.json()["results"]
    assert len(result["top_k"]) == 10
