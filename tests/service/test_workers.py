"""The worker board: each worker's state file, dead workers ignored, answers merged."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from service.workers import WorkerBoard, merge_entries, merge_models
from tests.service.bundles import write_bundle
from tests.service.conftest import app_client


def info(version: str, status: str, default: bool = False) -> dict:
    return {"name": "m", "version": version, "status": status, "error": None, "default": default}


def test_a_dead_workers_state_is_ignored_and_removed(tmp_path: Path) -> None:
    board = WorkerBoard(tmp_path, workers=2)
    board.publish({"ready": True, "entries": {}, "models": []})
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    stale = tmp_path / f"worker-{int(dead.stdout)}.json"
    stale.write_text(json.dumps({"ready": False, "entries": {}, "models": []}))
    states = board.collect()
    assert [s["pid"] for s in states] == [board.pid] and not stale.exists()
    board.close()
    assert not list(tmp_path.glob("worker-*.json"))


def test_merged_answers_are_ready_only_where_every_worker_is() -> None:
    a = {
        "entries": {"m": {"status": "ready", "version": "2", "detail": None}},
        "models": [info("2", "ready", True), info("3", "failed")],
    }
    b = {
        "entries": {"m": {"status": "ready", "version": "1", "detail": None}},
        "models": [info("1", "ready", True), info("2", "loading"), info("3", "failed")],
    }
    assert merge_entries([a, b])["m"]["status"] == "ready"
    models = {m["version"]: m for m in merge_models([a, b])}
    assert models["2"]["status"] == "loading" and models["2"]["workers_ready"] == 1
    assert models["1"]["status"] == "loading"  # loaded in one worker only
    assert models["3"]["status"] == "failed" and models["3"]["workers_ready"] == 0
    assert all(m["workers"] == 2 for m in models.values())
    c = {"entries": {"m": {"status": "loading", "version": None, "detail": None}}, "models": []}
    assert merge_entries([a, c])["m"]["status"] == "loading"


def test_readiness_waits_for_every_worker_and_forgets_dead_ones(tmp_path: Path) -> None:
    models, state = tmp_path / "models", tmp_path / "state"
    write_bundle(models, "tiny", "1")
    with app_client(models_dir=models, workers=2, state_dir=state) as c:
        c.app.service.registry.wait_loaded(30)  # type: ignore[attr-defined]
        r = c.get("/readyz")  # this worker is ready, the other never published
        assert r.status_code == 503 and r.headers["retry-after"]
        assert "1 of 2 workers have not started" in r.json()["detail"]
        other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        try:
            mine = json.loads(next(state.glob("worker-*.json")).read_text())
            (state / f"worker-{other.pid}.json").write_text(json.dumps({**mine, "pid": other.pid}))
            r = c.get("/readyz")
            assert r.status_code == 200 and r.json()["workers"] == 2
            (info,) = c.get("/models").json()["models"]
            assert info["workers_ready"] == 2 and info["status"] == "ready"
        finally:
            other.kill()
            other.wait()
        assert c.get("/readyz").status_code == 503  # the dead worker no longer counts
        assert not (state / f"worker-{other.pid}.json").exists()
