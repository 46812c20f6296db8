"""The provisioned Grafana dashboard: consistent with its datasource and laid out on the grid.
(Its PromQL runs against a real Prometheus in test_e2e_prometheus.py.)"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import yaml

from tests.deploy.tools import DASHBOARD, DEPLOY, require_tool


def _dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def test_every_panel_uses_the_provisioned_datasource() -> None:
    provisioning = DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml"
    (ds,) = yaml.safe_load(provisioning.read_text())["datasources"]
    d = _dashboard()
    for panel in d["panels"]:
        for ref in [panel.get("datasource"), *(t["datasource"] for t in panel.get("targets", []))]:
            if ref is not None:
                assert ref == {"type": "prometheus", "uid": ds["uid"]}, panel["title"]
    (var,) = d["templating"]["list"]
    assert var["datasource"]["uid"] == ds["uid"]


def test_panels_have_unique_ids_and_do_not_overlap() -> None:
    panels = _dashboard()["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    cells: set[tuple[int, int]] = set()
    for p in panels:
        g = p["gridPos"]
        assert g["x"] >= 0 and g["x"] + g["w"] <= 24, p["title"]
        mine = {
            (x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])
        }
        assert not cells & mine, f"{p['title']} overlaps another panel"
        cells |= mine


def test_dashboard_shows_what_the_issue_asks_for() -> None:
    """OOD rate, min_distance distribution over time, latency and batch size."""
    exprs = " ".join(t["expr"] for p in _dashboard()["panels"] for t in p.get("targets", []))
    for needle in ("isomax:ood_ratio:rate5m", "isomax_min_distance_bucket",
                   "isomax_request_duration_seconds_bucket", "isomax_batch_size"):  # fmt: skip
        assert needle in exprs
    types = {p["type"] for p in _dashboard()["panels"]}
    assert "heatmap" in types


def test_served_models_lists_live_versions_summed_over_replicas(tmp_path: Path) -> None:
    """Two replicas that hot-reloaded fmnist from version 1 to 2 keep version 1's info series
    at 0 (retired). Run by promtool (Prometheus's own engine), the Served models panel lists
    version 2 alone, served by both replicas, both ready, with no series per replica."""
    promtool = require_tool("promtool")
    (panel,) = [p for p in _dashboard()["panels"] if p["title"] == "Served models"]
    info = (
        'isomax_model_info{{job="isomax",instance="{}",model="fmnist",provider="CPU",version="{}"}}'
    )
    series = [
        {"series": info.format(replica, version), "values": f"{live}x10"}
        for replica in ("a", "b")
        for version, live in (("1", 0), ("2", 1))
    ] + [
        {"series": f'isomax_model_ready{{job="isomax",instance="{r}",model="fmnist"}}',
         "values": "1x10"}
        for r in ("a", "b")
    ]  # fmt: skip
    want = {  # the metric each query reads -> what it must answer
        "isomax_model_info": '{model="fmnist",provider="CPU",version="2"}',
        "isomax_model_ready": '{model="fmnist"}',
    }
    cases = []
    for target in panel["targets"]:
        (metric,) = [m for m in want if m in target["expr"]]
        cases.append({"expr": target["expr"], "eval_time": "5m",
                      "exp_samples": [{"labels": want[metric], "value": 2}]})  # fmt: skip
    assert len(cases) == len(want)
    tests = {"rule_files": [], "evaluation_interval": "1m",
             "tests": [{"interval": "1m", "input_series": series, "promql_expr_test": cases}]}  # fmt: skip
    path = tmp_path / "served_models.test.yml"
    path.write_text(yaml.safe_dump(tests))
    r = subprocess.run([promtool, "test", "rules", str(path)], capture_output=True, text=True,
                       timeout=60)  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
