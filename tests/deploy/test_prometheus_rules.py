"""Prometheus configuration and rules, checked and unit-tested by promtool itself."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.deploy.tools import PROMETHEUS_CONFIG, ROOT, RULE_TESTS, RULES, require_tool


def _run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout)


def _rule_files() -> list[Path]:
    return sorted(RULES.glob("*.yml"))


def _rules() -> list[dict]:
    return [
        r
        for f in _rule_files()
        for g in yaml.safe_load(f.read_text())["groups"]
        for r in g["rules"]
    ]


def _tests() -> list[dict]:
    return [
        t for f in sorted(RULE_TESTS.glob("*.yml")) for t in yaml.safe_load(f.read_text())["tests"]
    ]


def test_promtool_check_config_with_the_repository_rules(tmp_path: Path) -> None:
    """The compose config is valid, and so are the rules it loads from /etc/prometheus/rules."""
    promtool = require_tool("promtool")
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    assert config["rule_files"] == ["/etc/prometheus/rules/*.yml"], "compose mounts rules/ there"
    config["rule_files"] = [str(RULES / "*.yml")]
    local = tmp_path / "prometheus.yml"
    local.write_text(yaml.safe_dump(config))
    r = _run(promtool, "check", "config", str(local))
    assert r.returncode == 0, r.stdout + r.stderr
    for f in _rule_files():
        n = sum(len(g["rules"]) for g in yaml.safe_load(f.read_text())["groups"])
        assert f"{f}\n  SUCCESS: {n} rules found" in r.stdout + r.stderr


def test_promtool_check_rules() -> None:
    promtool = require_tool("promtool")
    r = _run(promtool, "check", "rules", *map(str, _rule_files()))
    assert r.returncode == 0, r.stdout + r.stderr


def test_promtool_rule_unit_tests_pass() -> None:
    promtool = require_tool("promtool")
    files = sorted(RULE_TESTS.glob("*.yml"))
    assert files
    # The drift tests replay days of simulated traffic: about a minute of CPU (more on a busy
    # machine), so this run gets a longer limit than the static checks.
    r = _run(promtool, "test", "rules", *map(str, files), timeout=900)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SUCCESS" in r.stdout


def test_every_recording_rule_has_a_unit_test() -> None:
    tested = {e["expr"] for t in _tests() for e in t.get("promql_expr_test", [])}
    records = [r["record"] for r in _rules() if "record" in r]
    assert records
    missing = [name for name in records if not any(name in expr for expr in tested)]
    assert not missing, f"recording rules without a promql_expr_test: {missing}"


@pytest.mark.parametrize("alert", [r["alert"] for r in _rules() if "alert" in r])
def test_every_alert_is_tested_firing_and_not_firing(alert: str) -> None:
    cases = [c for t in _tests() for c in t.get("alert_rule_test", []) if c["alertname"] == alert]
    assert any(c.get("exp_alerts") for c in cases), f"{alert}: no test where it fires"
    assert any(not c.get("exp_alerts") for c in cases), f"{alert}: no test where it stays quiet"


def test_alerts_are_documented() -> None:
    doc = (Path(__file__).resolve().parents[2] / "docs" / "deployment.md").read_text()
    for alert in (r["alert"] for r in _rules() if "alert" in r):
        assert f"`{alert}`" in doc, f"{alert} is not explained in docs/deployment.md"


def test_ood_ratio_rule_is_the_contract_formula() -> None:
    """The recorded OOD ratio is the contract's sum(rate(ood)) / sum(rate(all)), per model."""
    (rule,) = [r for r in _rules() if r.get("record") == "isomax:ood_ratio:rate5m"]
    expr = " ".join(rule["expr"].split())
    assert 'sum by (model) (rate(isomax_images_total{verdict="ood"}[5m]))' in expr
    assert "/ (sum by (model) (rate(isomax_images_total[5m])) > 0)" in expr


def test_drift_rules_are_generated_from_the_template() -> None:
    """deploy/prometheus/rules/isomax-drift.rules.yml is what scripts/drift_rules.py writes."""
    r = _run(sys.executable, str(ROOT / "scripts" / "drift_rules.py"), "--check")
    assert r.returncode == 0, r.stdout + r.stderr


def test_drift_rule_tests_are_generated() -> None:
    """The promtool tests of the drift rules are what tests/deploy/drift_rule_tests.py writes."""
    from tests.deploy import drift_rule_tests

    for path, text in drift_rule_tests.render().items():
        assert path.read_text() == text, f"{path.name} is out of date: rerun drift_rule_tests"


def test_drift_thresholds_follow_the_false_alarm_budget() -> None:
    """Longer windows have fewer evaluations to spend the yearly budget on: lower z."""
    sys.path.insert(0, str(ROOT / "scripts"))
    import drift_rules

    z = [drift_rules.z_threshold(w) for w in drift_rules.WINDOWS]
    assert z == sorted(z, reverse=True) and all(3 < v < 6 for v in z)
