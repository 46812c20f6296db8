"""The provisioned Grafana dashboard: consistent with its datasource and laid out on the grid.
(Its PromQL runs against a real Prometheus in test_e2e_prometheus.py.)"""

from __future__ import annotations

import json
from typing import Any

import yaml

from tests.deploy.tools import DASHBOARD, DEPLOY


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
