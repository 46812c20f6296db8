"""scripts/gpu_check.sh run end to end on this machine (CPU): the GPU machine's script must not
rot between the rare runs on a GPU. Takes about 90 s on 2 cores, so it runs on demand:

    pytest -m ondemand tests/deploy/test_gpu_check.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.deploy.tools import ROOT

FMNIST = Path("/usr/share/datasets/fashion-mnist")


@pytest.mark.ondemand
@pytest.mark.slow
def test_gpu_check_runs_on_cpu(tmp_path: Path) -> None:
    if not (FMNIST / "t10k-images-idx3-ubyte.gz").is_file():
        pytest.skip("Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")
    (tmp_path / "fashion-mnist").symlink_to(FMNIST)
    out = tmp_path / "report"
    env = {**os.environ, "PYTHON": sys.executable, "OUT": str(out)}
    r = subprocess.run(
        ["bash", str(ROOT / "scripts" / "gpu_check.sh"), "run", str(tmp_path), "--",
         "--train-device", "cpu", "--epochs", "1", "--limit-train", "3000",
         "--bench-seconds", "1"],
        capture_output=True, text=True, timeout=600, env=env,
    )  # fmt: skip
    report = json.loads((out / "gpu_check.json").read_text())
    status = {s["name"]: s["status"] for s in report["steps"]}
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert not report["failed"], status
    assert status["serve ISOMAX_DEVICE=cuda"] == "pass"  # refused readiness, with the reason
    (cuda,) = [s for s in report["steps"] if s["name"] == "serve ISOMAX_DEVICE=cuda"]
    assert "no CUDA provider" in cuda["summary"] and "503" in cuda["summary"]
    (auto,) = [s for s in report["steps"] if s["name"] == "serve ISOMAX_DEVICE=auto"]
    assert auto["details"]["provider"] == "CPUExecutionProvider"
    assert (out / "gpu_check.txt").read_text().rstrip().splitlines()[-1].startswith("OK")
