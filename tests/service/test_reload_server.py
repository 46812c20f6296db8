"""Hot reload against a real `isomax serve` (uvicorn) under continuous load, and two workers.

One load loop per connection posts images back to back for the whole test; each loop's
sequence of answered versions must be 2...2 3...3 2...2 (rolled out, then rolled back), with
every request answered 200, while the test adds version 3, a corrupt version 4, and removes
directories under the running server.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.service.bundles import sample_images, write_bundle
from tests.service.conftest import Server, run_server

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

IMAGES = sample_images()
PNG_HEADERS = {"content-type": "image/png"}
TOKEN = "t0ken-for-tests"


def publish(repo: Path, version: str, *, broken: bool = False, seed: int = 0) -> Path:
    """Write a bundle beside the live directory, then rename it in (how a rollout should)."""
    staging = repo / "staging"
    bundle = write_bundle(staging, "tiny", version, seed=seed)
    if broken:
        (bundle / "model.onnx").write_bytes((bundle / "model.onnx").read_bytes() + b"\0")
    final = repo / "tiny" / version
    os.rename(bundle, final)
    return final


def models_now(srv: Server) -> dict[str, dict]:
    with srv.client() as c:
        return {m["version"]: m for m in c.get("/models").json()["models"]}


def wait_for(what: str, check: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.05)


def test_swaps_under_load_lose_no_request(tmp_path: Path) -> None:
    repo = tmp_path / "models"
    write_bundle(repo, "tiny", "2")
    env = {"ISOMAX_RELOAD_INTERVAL_S": "0"}  # rescans on SIGHUP only: each step is explicit
    with run_server(repo, tmp_path / "log", "--max-wait-ms", "1", **env) as srv:
        seen: list[list[str]] = [[] for _ in range(6)]
        failures: list[str] = []
        stop = asyncio.Event()

        async def load(i: int, c: httpx.AsyncClient) -> None:
            k = 0
            while not stop.is_set():
                _, data = IMAGES[(i + k) % len(IMAGES)]
                k += 1
                try:
                    r = await c.post("/classify", content=data, headers=PNG_HEADERS)
                except httpx.HTTPError as e:
                    failures.append(f"loop {i}: {type(e).__name__}: {e}")
                    continue
                if r.status_code != 200:
                    failures.append(f"loop {i}: {r.status_code} {r.text}")
                    continue
                seen[i].append(r.json()["version"])

        def hup() -> None:
            srv.proc.send_signal(signal.SIGHUP)

        def steps() -> None:
            wait_for("load running", lambda: all(len(s) >= 5 for s in seen))
            publish(repo, "3", seed=1)
            hup()
            wait_for("version 3 answering", lambda: all(s and s[-1] == "3" for s in seen))
            n = [len(s) for s in seen]
            publish(repo, "4", broken=True)
            hup()
            wait_for(
                "version 4 refused", lambda: models_now(srv).get("4", {}).get("status") == "failed"
            )
            wait_for(
                "more answers", lambda: all(len(s) > m + 5 for s, m in zip(seen, n, strict=True))
            )
            shutil.rmtree(repo / "tiny" / "4")  # a failed version's directory goes away
            hup()
            wait_for("version 4 forgotten", lambda: "4" not in models_now(srv))
            shutil.rmtree(repo / "tiny" / "3")  # roll back: the serving version goes away
            hup()
            wait_for("back on version 2", lambda: all(s and s[-1] == "2" for s in seen))
            n = [len(s) for s in seen]
            wait_for(
                "more answers", lambda: all(len(s) > m + 5 for s, m in zip(seen, n, strict=True))
            )

        async def main() -> None:
            limits = httpx.Limits(max_connections=len(seen))
            async with httpx.AsyncClient(base_url=srv.url, timeout=30, limits=limits) as c:
                loops = [asyncio.ensure_future(load(i, c)) for i in range(len(seen))]
                try:
                    await asyncio.to_thread(steps)
                finally:
                    stop.set()
                    await asyncio.gather(*loops)

        asyncio.run(main())
        assert failures == []
        for s in seen:
            # Collapse runs: each connection saw 2, then 3, then 2 again; never the corrupt 4.
            runs = [v for j, v in enumerate(s) if j == 0 or s[j - 1] != v]
            assert runs == ["2", "3", "2"], runs
        assert srv.proc.poll() is None
        log = srv.log_text()
        assert "tiny:4 failed to load" in log and "does not match the manifest" in log
        assert "Traceback" not in log


def scrape(srv: Server) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with srv.client() as c:  # a fresh connection: may reach either worker
        text = c.get("/metrics").text
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_two_workers_reload_on_their_own_and_answer_for_each_other(tmp_path: Path) -> None:
    repo = tmp_path / "models"
    write_bundle(repo, "tiny", "1")
    env = {"ISOMAX_RELOAD_INTERVAL_S": "0", "ISOMAX_ADMIN_TOKEN": TOKEN}
    with run_server(repo, tmp_path / "log", "--workers", "2", **env) as srv:
        for _ in range(6):  # every answer, whichever worker gives it, speaks for both
            with srv.client() as c:
                r = c.get("/readyz")
            assert r.status_code == 200 and r.json()["workers"] == 2
        publish(repo, "2", seed=1)
        with srv.client() as c:
            r = c.post("/admin/reload", headers={"authorization": f"Bearer {TOKEN}"})
        assert r.status_code == 200, r.text

        def both_on_2() -> bool:
            info = models_now(srv).get("2", {})
            return info.get("status") == "ready" and info.get("workers_ready") == 2

        wait_for("both workers serving version 2", both_on_2)
        for _ in range(10):
            with srv.client() as c:
                r = c.post("/classify", content=IMAGES[0][1], headers=PNG_HEADERS)
            assert r.status_code == 200 and r.json()["version"] == "2"
        m = scrape(srv)
        defaults = [v for (n, _), v in m.items() if n == "isomax_model_default_version"]
        assert defaults == [2.0, 2.0]  # one series per live worker (pid label)
        assert m[("isomax_model_ready", (("model", "tiny"),))] == 1

        publish(repo, "3", broken=True)
        with srv.client() as c:
            c.post("/admin/reload", headers={"authorization": f"Bearer {TOKEN}"})
        wait_for(
            "both workers tried version 3",
            lambda: (
                scrape(srv).get(("isomax_model_load_failures_total", (("model", "tiny"),))) == 2
            ),
        )
        info = models_now(srv)["3"]
        assert info["status"] == "failed" and info["workers_ready"] == 0
        with srv.client() as c:
            assert c.get("/readyz").status_code == 200  # version 2 still serves in both
        assert srv.log_text().count("tiny:2 ready on CPUExecutionProvider") == 2


def test_requests_in_flight_finish_on_the_version_they_started_with(tmp_path: Path) -> None:
    """Requests held in version 1's batcher (max wait 1 s) across the swap: answered by 1."""
    repo = tmp_path / "models"
    write_bundle(repo, "tiny", "1")
    args = ("--max-wait-ms", "1000", "--max-batch-size", "16", "--reload-interval-s", "0")
    with run_server(repo, tmp_path / "log", *args) as srv:

        async def main() -> tuple[list[httpx.Response], bool, httpx.Response]:
            async with httpx.AsyncClient(base_url=srv.url, timeout=30) as c:
                held = [
                    asyncio.ensure_future(c.post("/classify", content=d, headers=PNG_HEADERS))
                    for _, d in IMAGES[:4]
                ]
                await asyncio.sleep(0.1)  # all four wait in version 1's batch
                publish(repo, "2", seed=1)
                srv.proc.send_signal(signal.SIGHUP)
                await asyncio.to_thread(
                    wait_for, "version 2", lambda: models_now(srv).get("2", {}).get("default")
                )
                swapped_while_held = not any(f.done() for f in held)
                after = await c.post("/classify", content=IMAGES[0][1], headers=PNG_HEADERS)
                return await asyncio.gather(*held), swapped_while_held, after

        held, swapped_while_held, after = asyncio.run(main())
        assert [r.status_code for r in held] == [200] * 4
        if not swapped_while_held:  # a very slow machine: the batch ran before the swap
            pytest.skip("the swap came after the held batch ran; nothing was in flight")
        assert [r.json()["version"] for r in held] == ["1"] * 4
        assert after.status_code == 200 and after.json()["version"] == "2"
        wait_for("version 1 retired", lambda: "model tiny:1: retired" in srv.log_text())
