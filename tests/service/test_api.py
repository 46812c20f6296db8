"""The HTTP API in process (TestClient runs the lifespan): answers, errors, metrics, docs."""

from __future__ import annotations

import math
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient

from isomax.contract.manifest import Manifest
from service.app import create_app
from service.errors import UnknownModelError
from service.metrics import DISTANCE_BUCKETS
from service.settings import Settings
from tests.service.bundles import sample_images, write_bundle
from tests.service.cases import BAD, PNG, TEST_LIMITS, Bad
from tests.service.conftest import REPO, app_client, wait_ready
from tests.service.expected import assert_results_equal, expected_results

IMAGES = sample_images()  # 6 in-distribution-like, 4 out-of-distribution-like


def files(images: list[tuple[str, bytes]]) -> list[tuple[str, tuple[str, bytes, str]]]:
    return [("file", (name, data, "image/png")) for name, data in images]


def raw(client: TestClient, data: bytes, **params: object) -> httpx.Response:
    """POST one image as the raw body."""
    return client.post(
        "/classify", content=data, headers={"content-type": "image/png"}, params=params
    )


def test_raw_body_equals_a_direct_onnxruntime_run(client: TestClient, models_dir: Path) -> None:
    data = IMAGES[0][1]
    r = raw(client, data)
    assert r.status_code == 200, r.text
    body = r.json()
    assert (body["model"], body["version"]) == ("tiny", "2")
    assert_results_equal(body["results"], expected_results(models_dir / "tiny/2", [(None, data)]))


def test_multipart_batch_in_request_order_equals_singles(
    client: TestClient, models_dir: Path
) -> None:
    r = client.post("/classify", files=files(IMAGES), params={"top_k": 5})
    assert r.status_code == 200, r.text
    batch = r.json()["results"]
    assert [x["filename"] for x in batch] == [n for n, _ in IMAGES]
    singles = []
    for name, data in IMAGES:
        s = client.post("/classify", files=files([(name, data)]), params={"top_k": 5})
        singles += s.json()["results"]
    assert_results_equal(batch, singles)
    assert_results_equal(batch, expected_results(models_dir / "tiny/2", IMAGES, top_k=5))
    verdicts = [x["is_ood"] for x in batch]
    assert verdicts == [False] * 6 + [True] * 4  # the fixture images are what they claim


def test_top_k_lists_k_classes_best_first(client: TestClient) -> None:
    for k in (1, 3, 10):
        r = client.post("/classify", files=files(IMAGES[:1]), params={"top_k": k}).json()
        top = r["results"][0]["top_k"]
        assert len(top) == k
        probs = [t["probability"] for t in top]
        assert probs == sorted(probs, reverse=True)
        assert top[0]["label"] == r["results"][0]["label"]
    full = client.post("/classify", files=files(IMAGES[:1]), params={"top_k": 10}).json()
    assert math.isclose(sum(t["probability"] for t in full["results"][0]["top_k"]), 1.0)


@pytest.mark.parametrize("case", BAD, ids=[c.id for c in BAD])
def test_bad_input_gets_its_status_and_a_json_detail(client: TestClient, case: Bad) -> None:
    r = client.post("/classify", **case.request())
    assert r.status_code == case.status, r.text
    assert r.headers["content-type"] == "application/json"
    detail = r.json()["detail"]
    assert isinstance(detail, str) and case.detail in detail
    assert raw(client, PNG).status_code == 200  # and the service keeps serving


def test_model_by_name_and_version(models_dir: Path) -> None:
    with app_client(models_dir=models_dir, models=("tiny:1", "tiny:2")) as c:
        wait_ready(c)
        for query, version in (("tiny", "2"), ("tiny:1", "1"), ("tiny:2", "2"), (None, "2")):
            r = raw(c, PNG, **({"model": query} if query else {}))
            assert r.status_code == 200 and r.json()["version"] == version, (query, r.text)


def test_model_is_required_when_several_are_served(tmp_path: Path) -> None:
    write_bundle(tmp_path, "alpha", "1")
    write_bundle(tmp_path, "beta", "3")
    with app_client(models_dir=tmp_path) as c:
        wait_ready(c)
        r = raw(c, PNG)
        assert r.status_code == 422 and "model is required" in r.json()["detail"]
        r = raw(c, PNG, model="beta")
        assert r.status_code == 200 and r.json()["model"] == "beta"
        assert {m["name"] for m in c.get("/models").json()["models"]} == {"alpha", "beta"}


def test_target_tpr_override_reads_the_quantile_table(models_dir: Path) -> None:
    manifest = Manifest.read(models_dir / "tiny/2")
    want = manifest.calibration.threshold_for(0.99)
    assert want != manifest.calibration.threshold
    with app_client(models_dir=models_dir, target_tpr={"tiny": 0.99}) as c:
        wait_ready(c)
        r = c.post("/classify", files=files(IMAGES))
        assert {x["threshold"] for x in r.json()["results"]} == {want}
        (info,) = c.get("/models").json()["models"]
        assert (info["threshold"], info["target_tpr"]) == (want, 0.99)
        assert info["calibration"]["threshold"] == manifest.calibration.threshold
        assert c.app.service.metrics.registry.get_sample_value(  # type: ignore[attr-defined]
            "isomax_ood_threshold", {"model": "tiny"}
        ) == pytest.approx(want)


def sample(client: TestClient, name: str, labels: dict[str, str] | None = None) -> float:
    value = client.app.service.metrics.registry.get_sample_value(name, labels or {})  # type: ignore[attr-defined]
    return 0.0 if value is None else float(value)


def test_metrics_change_by_exactly_what_was_sent(client: TestClient, models_dir: Path) -> None:
    want = expected_results(models_dir / "tiny/2", IMAGES)
    n_ood = sum(x["is_ood"] for x in want)
    names = {
        "in": ("isomax_images_total", {"model": "tiny", "verdict": "in"}),
        "ood": ("isomax_images_total", {"model": "tiny", "verdict": "ood"}),
        "dist_count": ("isomax_min_distance_count", {"model": "tiny"}),
        "dist_sum": ("isomax_min_distance_sum", {"model": "tiny"}),
        "batch_sum": ("isomax_batch_size_sum", {"model": "tiny"}),
        "ok": ("isomax_requests_total", {"endpoint": "/classify", "status": "200"}),
        "e400": ("isomax_requests_total", {"endpoint": "/classify", "status": "400"}),
        "e422": ("isomax_requests_total", {"endpoint": "/classify", "status": "422"}),
        "dur": ("isomax_request_duration_seconds_count", {"endpoint": "/classify"}),
    }
    buckets = {
        le: ("isomax_min_distance_bucket", {"model": "tiny", "le": str(le)})
        for le in DISTANCE_BUCKETS
    }
    before = {k: sample(client, *v) for k, v in {**names, **buckets}.items()}

    for _, data in IMAGES[:4]:  # 4 single raw requests
        assert raw(client, data).is_success
    assert client.post("/classify", files=files(IMAGES[4:])).is_success  # 6 in one request
    assert raw(client, b"nope").status_code == 400
    assert client.post("/classify", files=files(IMAGES[:1]), params={"top_k": 0}).status_code == 422

    after = {k: sample(client, *v) for k, v in {**names, **buckets}.items()}
    delta = {k: after[k] - before[k] for k in after}
    assert delta["in"] == len(IMAGES) - n_ood and delta["ood"] == n_ood
    assert delta["dist_count"] == len(IMAGES)
    assert delta["dist_sum"] == pytest.approx(sum(x["min_distance"] for x in want), rel=1e-5)
    assert delta["batch_sum"] == len(IMAGES)  # bad requests never reach the model
    assert (delta["ok"], delta["e400"], delta["e422"], delta["dur"]) == (5, 1, 1, 7)
    for le in DISTANCE_BUCKETS:
        assert delta[le] == sum(x["min_distance"] <= le for x in want), le


def test_series_exist_at_zero_before_any_request(models_dir: Path) -> None:
    with app_client(models_dir=models_dir) as c:
        wait_ready(c)
        text = c.get("/metrics").text
    for line in (
        'isomax_images_total{model="tiny",verdict="in"} 0.0',
        'isomax_images_total{model="tiny",verdict="ood"} 0.0',
        'isomax_min_distance_count{model="tiny"} 0.0',
        'isomax_batch_size_count{model="tiny"} 0.0',
        'isomax_requests_total{endpoint="/classify",status="200"} 0.0',
        'isomax_request_duration_seconds_count{endpoint="/classify"} 0.0',
        'isomax_model_ready{model="tiny"} 1.0',
    ):
        assert line in text, line
    assert 'isomax_ood_threshold{model="tiny"}' in text
    assert 'isomax_model_info{model="tiny",provider="CPUExecutionProvider",version="2"} 1.0' in text


def test_unknown_paths_share_one_series(client: TestClient) -> None:
    for path in ("/a", "/b/c", "/favicon.ico"):
        assert client.get(path).status_code == 404
    text = client.get("/metrics").text
    assert 'isomax_requests_total{endpoint="other",status="404"} 3.0' in text
    assert "/favicon.ico" not in text


def test_models_endpoint_describes_the_served_bundle(client: TestClient) -> None:
    (info,) = client.get("/models").json()["models"]
    assert info["name"] == "tiny" and info["version"] == "2" and info["status"] == "ready"
    assert info["provider"] == "CPUExecutionProvider"
    assert len(info["labels"]) == 10 and info["labels"][9] == "Ankle boot"
    assert info["input"]["height"] == 28 and info["input"]["color_mode"] == "L"
    assert info["calibration"]["split"] == "val" and info["target_tpr"] == 0.95
    assert info["metrics"]["accuracy"]["test"] == 0.89


def test_health_and_readiness(client: TestClient) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    r = client.get("/readyz")
    assert r.status_code == 200 and r.json()["models"] == {
        "tiny": {"status": "ready", "version": "2", "detail": None}
    }


def test_openapi_documents_classify(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    op = spec["paths"]["/classify"]["post"]
    assert op["summary"].startswith("Classify images")
    assert {p["name"] for p in op["parameters"]} == {"model", "version", "top_k"}
    body = op["requestBody"]["content"]
    assert "multipart/form-data" in body and "image/*" in body
    assert {"200", "400", "404", "413", "415", "422", "503"} <= set(op["responses"])
    example = op["responses"]["200"]["content"]["application/json"]
    assert "example" in str(example) or "example" in str(spec["components"])
    assert client.get("/docs").status_code == 200


def test_overload_answers_503_with_retry_after(models_dir: Path) -> None:
    """A queue bounded at 8 images, a model stalled: the 9th image is refused at once."""
    limits = {**TEST_LIMITS, "max_images_per_request": 8}
    with app_client(models_dir=models_dir, max_queue_images=8, max_batch_size=8, **limits) as c:
        wait_ready(c)
        model = c.app.service.registry.resolve("tiny")  # type: ignore[attr-defined]
        gate = threading.Event()
        real_run = model.batcher._run_fn

        def stalled(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            gate.wait(10)
            return real_run(x)

        model.batcher._run_fn = stalled
        results: list[int] = []

        def send(n: int) -> None:
            r = c.post("/classify", files=files(IMAGES[:n]))
            results.append(r.status_code)

        first = threading.Thread(target=send, args=(8,))
        first.start()
        deadline = time.monotonic() + 5
        while model.batcher.pending < 8 and time.monotonic() < deadline:
            time.sleep(0.01)
        r = raw(c, PNG)
        assert r.status_code == 503 and r.headers["retry-after"] == "1"
        assert "queued" in r.json()["detail"]
        gate.set()
        first.join(10)
        assert results == [200]
        model.batcher._run_fn = real_run
        assert raw(c, PNG).is_success


def test_requests_larger_than_a_batch_are_split_and_reassembled(
    models_dir: Path,
) -> None:
    images = sample_images(6, 2, seed=9)  # 8 images, batches of 3
    with app_client(models_dir=models_dir, max_batch_size=3, **TEST_LIMITS) as c:
        wait_ready(c)
        r = c.post("/classify", files=files(images))
        assert r.status_code == 200
        assert_results_equal(r.json()["results"], expected_results(models_dir / "tiny/2", images))
        registry = c.app.service.metrics.registry  # type: ignore[attr-defined]
        assert registry.get_sample_value("isomax_batch_size_sum", {"model": "tiny"}) == 8
        assert registry.get_sample_value("isomax_batch_size_count", {"model": "tiny"}) == 3


def test_the_routed_classify_runs_the_same_endpoint(client: TestClient, models_dir: Path) -> None:
    """Without the direct shortcut, the router's POST /classify route answers the same way."""
    direct = dict(client.app.direct_posts)  # type: ignore[attr-defined]
    client.app.direct_posts.clear()  # type: ignore[attr-defined]
    try:
        data = IMAGES[0][1]
        r = raw(client, data)
        assert r.status_code == 200
        assert_results_equal(
            r.json()["results"], expected_results(models_dir / "tiny/2", [(None, data)])
        )
        bad = client.post("/classify", params={"top_k": 0}, files=files(IMAGES[:1]))
        assert bad.status_code == 422 and "top_k" in bad.json()["detail"]
        text = client.get("/metrics").text
        assert 'isomax_requests_total{endpoint="/classify",status="422"} 1.0' in text
        assert client.get("/classify").status_code == 405
    finally:
        client.app.direct_posts.update(direct)  # type: ignore[attr-defined]


def test_classify_under_a_root_path_takes_the_direct_route(models_dir: Path) -> None:
    """Behind a proxy that strips a prefix (uvicorn --root-path), /classify is still direct."""
    app = create_app(Settings(models_dir=models_dir, max_wait_ms=1, **TEST_LIMITS))  # type: ignore[arg-type]
    with TestClient(app, root_path="/api") as c:
        wait_ready(c)
        r = c.post("/api/classify", content=IMAGES[0][1], headers={"content-type": "image/png"})
        assert r.status_code == 200 and len(r.json()["results"]) == 1
        counted = app.service.metrics.registry.get_sample_value(
            "isomax_requests_total", {"endpoint": "/classify", "status": "200"}
        )
        assert counted == 1.0


def test_bad_parameters_on_routed_endpoints_get_the_json_error() -> None:
    """The app's handlers format FastAPI's own validation and domain errors as {"detail": ...}."""
    app = create_app(Settings(models_dir=REPO / "models"))

    @app.get("/probe")
    async def probe(n: int) -> dict[str, int]:
        if n == 0:
            raise UnknownModelError("unknown model 'x'")
        return {"n": n}

    with TestClient(app) as c:
        r = c.get("/probe", params={"n": "abc"})
        assert r.status_code == 422 and r.json()["detail"].startswith("n: ")
        r = c.get("/probe", params={"n": 0})
        assert r.status_code == 404 and r.json() == {"detail": "unknown model 'x'"}
