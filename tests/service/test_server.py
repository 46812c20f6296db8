"""Against a real `isomax serve` (uvicorn) on a free port: what a client on the network sees."""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.service.bundles import sample_images
from tests.service.cases import BAD, PNG, Bad
from tests.service.conftest import Server, run_server
from tests.service.expected import assert_results_equal, expected_results

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

IMAGES = sample_images()
PNG_HEADERS = {"content-type": "image/png"}


def files(images: list[tuple[str, bytes]]) -> list[tuple[str, tuple[str, bytes, str]]]:
    return [("file", (name, data, "image/png")) for name, data in images]


def scrape(c: httpx.Client) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(c.get("/metrics").text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_answers_equal_a_direct_onnxruntime_run(server: Server, models_dir: Path) -> None:
    bundle = models_dir / "tiny/2"
    with server.client() as c:
        for name, data in IMAGES[:3]:
            r = c.post("/classify", content=data, headers=PNG_HEADERS)
            assert r.status_code == 200, r.text
            assert_results_equal(r.json()["results"], expected_results(bundle, [(None, data)]))
            r = c.post("/classify", files=files([(name, data)]))
            assert_results_equal(r.json()["results"], expected_results(bundle, [(name, data)]))


def test_a_batch_request_equals_single_requests_in_order(server: Server) -> None:
    with server.client() as c:
        batch = c.post("/classify", files=files(IMAGES), params={"top_k": 4}).json()["results"]
        singles = [
            c.post("/classify", files=files([img]), params={"top_k": 4}).json()["results"][0]
            for img in IMAGES
        ]
    assert [r["filename"] for r in batch] == [n for n, _ in IMAGES]
    assert_results_equal(batch, singles)


def test_200_concurrent_requests_are_all_answered_correctly(
    server: Server, models_dir: Path
) -> None:
    want = {
        name: r
        for (name, _), r in zip(
            IMAGES, expected_results(models_dir / "tiny/2", IMAGES), strict=True
        )
    }

    async def main() -> list[tuple[list[str], httpx.Response]]:
        limits = httpx.Limits(max_connections=200, max_keepalive_connections=200)
        async with httpx.AsyncClient(base_url=server.url, timeout=60, limits=limits) as c:

            async def one(i: int) -> tuple[list[str], httpx.Response]:
                if i % 3 == 0:  # multi-image requests, rotated so that orders differ
                    imgs = IMAGES[i % 10 :] + IMAGES[: i % 10]
                    imgs = imgs[: 2 + i % 5]
                    return [n for n, _ in imgs], await c.post("/classify", files=files(imgs))
                name, data = IMAGES[i % 10]
                r = await c.post("/classify", files=files([(name, data)]))
                return [name], r

            return await asyncio.gather(*[one(i) for i in range(200)])

    answers = asyncio.run(main())
    assert len(answers) == 200
    for names, r in answers:
        assert r.status_code == 200, r.text
        assert_results_equal(r.json()["results"], [want[n] for n in names])


@pytest.mark.parametrize("case", BAD, ids=[c.id for c in BAD])
def test_bad_input_gets_its_status_and_the_server_keeps_serving(server: Server, case: Bad) -> None:
    with server.client() as c:
        r = c.post("/classify", **case.request())
        assert r.status_code == case.status, r.text
        assert r.headers["content-type"] == "application/json"
        assert case.detail in r.json()["detail"]
    with server.client() as c:  # a fresh connection: the server itself is fine
        assert c.post("/classify", content=PNG, headers=PNG_HEADERS).status_code == 200
        assert c.get("/healthz").status_code == 200


def test_metrics_change_by_exactly_what_was_sent(server: Server, models_dir: Path) -> None:
    want = expected_results(models_dir / "tiny/2", IMAGES)
    n_ood = sum(r["is_ood"] for r in want)
    m = {"model": "tiny"}

    def key(name: str, **labels: str) -> tuple[str, tuple[tuple[str, str], ...]]:
        return name, tuple(sorted(labels.items()))

    with server.client() as c:
        before = scrape(c)
        for _, data in IMAGES[:5]:
            assert c.post("/classify", content=data, headers=PNG_HEADERS).status_code == 200
        assert c.post("/classify", files=files(IMAGES[5:])).status_code == 200
        assert c.post("/classify", content=b"x", headers=PNG_HEADERS).status_code == 400
        assert (
            c.post("/classify", content=b"x", headers={"content-type": "text/plain"}).status_code
            == 415
        )
        after = scrape(c)

    def delta(name: str, **labels: str) -> float:
        k = key(name, **labels)
        return after.get(k, 0.0) - before.get(k, 0.0)

    assert delta("isomax_images_total", **m, verdict="in") == len(IMAGES) - n_ood
    assert delta("isomax_images_total", **m, verdict="ood") == n_ood
    assert delta("isomax_min_distance_count", **m) == len(IMAGES)
    assert delta("isomax_min_distance_sum", **m) == pytest.approx(
        sum(r["min_distance"] for r in want), rel=1e-5
    )
    for le in ("0.1", "0.2", "0.5", "1.0", "2.0", "+Inf"):
        assert delta("isomax_min_distance_bucket", **m, le=le) == sum(
            r["min_distance"] <= float(le) for r in want
        ), le
    assert delta("isomax_batch_size_sum", **m) == len(IMAGES)
    assert delta("isomax_requests_total", endpoint="/classify", status="200") == 6
    assert delta("isomax_requests_total", endpoint="/classify", status="400") == 1
    assert delta("isomax_requests_total", endpoint="/classify", status="415") == 1
    assert delta("isomax_request_duration_seconds_count", endpoint="/classify") == 8
    assert after[key("isomax_ood_threshold", **m)] == pytest.approx(want[0]["threshold"])


def test_models_and_readiness_over_http(server: Server) -> None:
    with server.client() as c:
        assert c.get("/readyz").json()["ready"] is True
        (info,) = c.get("/models").json()["models"]
        assert info["provider"] == "CPUExecutionProvider" and info["status"] == "ready"
        assert "CPUExecutionProvider" in server.log_text()  # the provider is logged


def test_sigterm_finishes_in_flight_requests(models_dir: Path, tmp_path: Path) -> None:
    """Requests held in the batcher (max wait 1 s) when SIGTERM arrives are still answered."""
    args = ("--max-wait-ms", "1000", "--max-batch-size", "64")
    with run_server(models_dir, tmp_path / "log", *args) as srv:

        async def main() -> list[httpx.Response]:
            async with httpx.AsyncClient(base_url=srv.url, timeout=30) as c:
                tasks = [
                    asyncio.ensure_future(c.post("/classify", content=d, headers=PNG_HEADERS))
                    for _, d in IMAGES[:5]
                ]
                await asyncio.sleep(0.3)  # all five are waiting for their batch
                srv.proc.send_signal(signal.SIGTERM)
                return await asyncio.gather(*tasks)

        t0 = time.monotonic()
        answers = asyncio.run(main())
        assert [r.status_code for r in answers] == [200] * 5
        # A graceful stop exits 0 (service/server.py), not by the signal uvicorn raises again.
        assert srv.proc.wait(30) == 0
        assert time.monotonic() - t0 < 20
        log = srv.log_text()
        assert "Shutting down" in log and "stopped" in log


def test_two_workers_add_up_their_metrics(models_dir: Path, tmp_path: Path) -> None:
    """--workers 2: every /metrics answer, whichever worker gives it, counts all requests."""
    with run_server(models_dir, tmp_path / "log", "--workers", "2") as srv, srv.client() as c:
        n = 30
        for _, data in IMAGES[:6] * 5:
            assert c.post("/classify", content=data, headers=PNG_HEADERS).status_code == 200
        for _ in range(4):
            with srv.client() as fresh:  # new connections, likely to reach either worker
                m = scrape(fresh)
            images = sum(v for (name, labels), v in m.items() if name == "isomax_images_total")
            assert images == n
            assert m[("isomax_model_ready", (("model", "tiny"),))] == 1
        assert srv.log_text().count("ready on CPUExecutionProvider") == 2


def test_a_body_refused_unread_closes_the_connection(server: Server) -> None:
    """413 on Content-Length (or 404 before reading): close, so the rest is never read."""
    with server.client() as c:
        big = c.post("/classify", content=b"\0" * (2 * 1024 * 1024), headers=PNG_HEADERS)
        assert big.status_code == 413 and big.headers["connection"] == "close"
        unknown = c.post("/classify", params={"model": "nope"}, content=PNG, headers=PNG_HEADERS)
        assert unknown.status_code == 404 and unknown.headers["connection"] == "close"
        read = c.post("/classify", content=b"not a png", headers=PNG_HEADERS)
        assert read.status_code == 400 and "connection" not in read.headers  # kept alive
        assert c.post("/classify", content=PNG, headers=PNG_HEADERS).status_code == 200
