"""The page's routes in process (no browser): served, switched off, and /models' tables."""

from __future__ import annotations

import io
import re
from collections.abc import Iterator

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from isomax.contract.manifest import Manifest
from service.app import create_app
from service.cli import build_parser, settings_from_args
from service.page import STATIC_DIR
from service.settings import Settings
from tests.page.conftest import NAME, VERSION
from tests.service.conftest import REPO, wait_ready

MODELS = REPO / "models"


def _client(**settings: object) -> Iterator[TestClient]:
    app = create_app(Settings(models_dir=MODELS, models=(NAME,), **settings))  # type: ignore[arg-type]
    with TestClient(app) as c:
        wait_ready(c)
        yield c


@pytest.fixture(scope="module")
def client() -> Iterator[TestClient]:
    yield from _client()


def _png() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.zeros((28, 28), np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def test_root_serves_the_page_with_a_same_origin_policy(client: TestClient) -> None:
    r = client.get("/")
    assert r.status_code == 200
    assert r.headers["content-type"] == "text/html; charset=utf-8"
    assert r.text == (STATIC_DIR / "index.html").read_text()
    csp = r.headers["content-security-policy"]
    assert "default-src 'none'" in csp and "connect-src 'self'" in csp
    assert "script-src 'self'" in csp and "unsafe-inline" not in csp
    assert client.head("/").status_code == 200
    assert "/" not in client.get("/openapi.json").json()["paths"]


def test_every_asset_the_page_names_is_served_from_the_service(client: TestClient) -> None:
    html = client.get("/").text
    assets = re.findall(r'(?:src|href)="([^"#]+)"', html)
    local = [a for a in assets if a.startswith("static/")]
    assert {"static/page.js", "static/page.css", "static/favicon.svg"} <= set(local)
    # Nothing from another host: every reference is relative to the service.
    assert all(not re.match(r"[a-z]+:|//", a) for a in assets), assets
    types = {"js": "javascript", "css": "text/css", "svg": "image/svg+xml"}
    for a in local:
        r = client.get("/" + a)
        assert r.status_code == 200, a
        assert types[a.rsplit(".", 1)[1]] in r.headers["content-type"], a
    js = client.get("/static/page.js").text
    assert "http://" not in js and "https://" not in js  # the script fetches relative URLs only
    assert client.get("/static/../settings.py").status_code == 404


def test_page_off_gives_404_and_leaves_the_api(tmp_path: object) -> None:
    for c in _client(page=False):
        assert c.get("/").status_code == 404
        assert c.get("/static/page.js").status_code == 404
        r = c.post("/classify", content=_png(), headers={"content-type": "image/png"})
        assert r.status_code == 200 and len(r.json()["results"]) == 1


def test_page_setting_from_env_and_cli(monkeypatch: pytest.MonkeyPatch) -> None:
    assert Settings().page is True
    monkeypatch.setenv("ISOMAX_PAGE", "false")
    assert Settings().page is False
    monkeypatch.delenv("ISOMAX_PAGE")
    assert settings_from_args(build_parser().parse_args(["--no-page"])).page is False
    assert settings_from_args(build_parser().parse_args([])).page is True


def test_models_lists_the_manifest_quantile_tables(client: TestClient) -> None:
    manifest = Manifest.read(MODELS / NAME / VERSION)
    cal = manifest.calibration
    assert cal.per_class is not None
    (info,) = client.get("/models").json()["models"]
    got = info["calibration"]
    # Which score the tables are of, and its direction: what the page needs to draw it.
    assert (got["score"], got["in_distribution"]) == (cal.score, cal.in_distribution)
    assert got["quantiles"] == [{"q": p.q, "value": p.value} for p in cal.quantiles]
    assert list(got["class_quantiles"]) == list(manifest.labels)
    for label, c in zip(manifest.labels, cal.per_class, strict=True):
        assert got["class_quantiles"][label] == [{"q": p.q, "value": p.value} for p in c.quantiles]
        # The class table at the served target_tpr is the class threshold in use.
        table = dict((p.q, p.value) for p in c.quantiles)
        assert info["class_thresholds"][label] == pytest.approx(table[info["target_tpr"]])
    # What older clients read is unchanged.
    assert got["per_class"] is True and got["threshold"] == cal.threshold
    assert got["quantile_range"] == [cal.quantiles[0].q, cal.quantiles[-1].q]
