"""docker-compose.yml and the CPU override, as Docker Compose itself reads them."""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.deploy.tools import PROMETHEUS_CONFIG, ROOT, require_tool

BASE = ROOT / "docker-compose.yml"
CPU = ROOT / "docker-compose.cpu.yml"


# What an operator must set (docs/deployment.md); the tests set it to this.
REQUIRED_ENV = {"GRAFANA_ADMIN_PASSWORD": "not-admin-for-the-test"}


def run_compose_config(*files: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """The real `docker compose config` (no engine needed) with only `env` set."""
    exe = require_tool("docker-compose")
    args = [exe, "--project-directory", str(ROOT)]
    for f in files:
        args += ["-f", str(f)]
    # No COMPOSE_* and no overrides from this environment; an empty directory as the env file,
    # so that a developer's own .env in the checkout does not enter.
    base = {"PATH": "/usr/bin:/bin", "HOME": tempfile.gettempdir()}
    return subprocess.run(
        [*args, "--env-file", os.devnull, "config", "--format", "json"],
        capture_output=True, text=True, timeout=60, env={**base, **env},
    )  # fmt: skip


def compose_config(*files: Path) -> dict[str, Any]:
    """The fully resolved project, with the required variables set."""
    r = run_compose_config(*files, env=REQUIRED_ENV)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


@pytest.fixture(scope="module")
def gpu() -> dict[str, Any]:
    return compose_config(BASE)


@pytest.fixture(scope="module")
def cpu() -> dict[str, Any]:
    return compose_config(BASE, CPU)


def test_services(gpu: dict[str, Any]) -> None:
    assert set(gpu["services"]) == {"isomax", "prometheus", "grafana"}


def test_isomax_reserves_a_gpu_and_requires_cuda(gpu: dict[str, Any]) -> None:
    svc = gpu["services"]["isomax"]
    (dev,) = svc["deploy"]["resources"]["reservations"]["devices"]
    assert dev["driver"] == "nvidia" and "gpu" in dev["capabilities"] and dev["count"] == 1
    assert svc["environment"]["ISOMAX_DEVICE"] == "cuda"
    assert svc["build"]["target"] == "gpu"


def test_cpu_override_drops_the_gpu(cpu: dict[str, Any]) -> None:
    svc = cpu["services"]["isomax"]
    assert "deploy" not in svc or not svc["deploy"].get("resources")
    assert svc["environment"]["ISOMAX_DEVICE"] == "cpu"
    assert svc["build"]["target"] == "cpu"
    assert svc["image"] != compose_config(BASE)["services"]["isomax"]["image"]
    # Everything else is the same stack.
    assert set(cpu["services"]) == {"isomax", "prometheus", "grafana"}


def test_service_settings_reach_the_app(gpu: dict[str, Any]) -> None:
    """Every ISOMAX_* variable the compose file sets is a setting the service knows."""
    from service.settings import Settings

    env = gpu["services"]["isomax"]["environment"]
    names = {f"ISOMAX_{k.upper()}" for k in Settings.model_fields}
    assert {k for k in env if k.startswith("ISOMAX_")} <= names
    port = int(env["ISOMAX_PORT"])
    assert [p["target"] for p in gpu["services"]["isomax"]["ports"]] == [port]


@pytest.mark.parametrize("service", ["isomax", "prometheus", "grafana"])
def test_bind_mounts_exist_in_the_repository(gpu: dict[str, Any], service: str) -> None:
    for v in gpu["services"][service].get("volumes", []):
        if v["type"] == "bind":
            assert Path(v["source"]).exists(), f"{service}: {v['source']} is not in the repository"


def test_prometheus_scrapes_the_service_by_its_compose_name(gpu: dict[str, Any]) -> None:
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "isomax"]
    port = gpu["services"]["isomax"]["environment"]["ISOMAX_PORT"]
    assert job["static_configs"][0]["targets"] == [f"isomax:{port}"]
    mounts = {v["target"]: v["source"] for v in gpu["services"]["prometheus"]["volumes"]}
    assert Path(mounts["/etc/prometheus/prometheus.yml"]) == PROMETHEUS_CONFIG
    rules_dir = Path(config["rule_files"][0]).parent
    assert str(rules_dir) in mounts and any(Path(mounts[str(rules_dir)]).glob("*.yml"))


def test_grafana_provisioning_points_at_the_mounted_dashboards(gpu: dict[str, Any]) -> None:
    mounts = {
        v["target"]: Path(v["source"])
        for v in gpu["services"]["grafana"]["volumes"]
        if v["type"] == "bind"
    }
    provisioning = mounts["/etc/grafana/provisioning"]
    (provider,) = yaml.safe_load((provisioning / "dashboards" / "isomax.yml").read_text())[
        "providers"
    ]
    dashboards = mounts[provider["options"]["path"]]
    assert (dashboards / "isomax.json").is_file()
    (ds,) = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())[
        "datasources"
    ]
    assert ds["url"] == "http://prometheus:9090"
    home = gpu["services"]["grafana"]["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert Path(home).parent == Path(provider["options"]["path"])


def test_monitoring_ports_are_loopback_by_default(gpu: dict[str, Any]) -> None:
    for name in ("prometheus", "grafana"):
        for p in gpu["services"][name]["ports"]:
            assert p.get("host_ip") == "127.0.0.1", f"{name} published beyond loopback: {p}"


@pytest.mark.parametrize("files", [(BASE,), (BASE, CPU)], ids=["gpu", "cpu"])
def test_isomax_is_published_on_loopback_and_confined(files: tuple[Path, ...]) -> None:
    """The API has no authentication: loopback unless ISOMAX_BIND says otherwise; and the
    container can write only /tmp, has no capabilities and bounded memory, CPU and processes."""
    svc = compose_config(*files)["services"]["isomax"]
    for p in svc["ports"]:
        assert p.get("host_ip") == "127.0.0.1", f"the API is published beyond loopback: {p}"
    assert svc["read_only"] is True
    assert [t.split(":")[0] for t in svc["tmpfs"]] == ["/tmp"]
    assert svc["cap_drop"] == ["ALL"] and not svc.get("cap_add")
    assert "no-new-privileges:true" in svc["security_opt"]
    assert svc.get("privileged") is not True
    assert int(svc["mem_limit"]) > 0 and float(svc["cpus"]) > 0 and svc["pids_limit"] > 0


@pytest.mark.parametrize("service", ["prometheus", "grafana"])
def test_monitoring_containers_drop_privileges(gpu: dict[str, Any], service: str) -> None:
    svc = gpu["services"][service]
    assert svc["cap_drop"] == ["ALL"]
    assert "no-new-privileges:true" in svc["security_opt"]
    assert int(svc["mem_limit"]) > 0 and svc["pids_limit"] > 0


def test_cpu_override_keeps_the_limits(cpu: dict[str, Any], gpu: dict[str, Any]) -> None:
    """The override resets the GPU reservation only, not the hardening."""
    keys = ("read_only", "tmpfs", "cap_drop", "security_opt", "mem_limit", "cpus", "pids_limit")
    for key in keys:
        assert cpu["services"]["isomax"][key] == gpu["services"]["isomax"][key], key


@pytest.mark.parametrize("files", [(BASE,), (BASE, CPU)], ids=["gpu", "cpu"])
def test_grafana_admin_password_is_required(files: tuple[Path, ...]) -> None:
    """No admin/admin fallback: without GRAFANA_ADMIN_PASSWORD, Compose refuses the project
    and says which variable to set; with it, Grafana gets exactly that password."""
    r = run_compose_config(*files, env={})
    assert r.returncode != 0
    assert "GRAFANA_ADMIN_PASSWORD" in r.stderr and "docs/deployment.md" in r.stderr
    env = compose_config(*files)["services"]["grafana"]["environment"]
    assert env["GF_SECURITY_ADMIN_PASSWORD"] == REQUIRED_ENV["GRAFANA_ADMIN_PASSWORD"]


def test_grafana_has_no_anonymous_access_by_default(gpu: dict[str, Any]) -> None:
    env = gpu["services"]["grafana"]["environment"]
    assert env["GF_AUTH_ANONYMOUS_ENABLED"] == "false"
