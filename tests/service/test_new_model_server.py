"""A new model directory dropped into a running `isomax serve` is picked up like a new version.

A real uvicorn server (ISOMAX_MODELS empty, rescans on SIGHUP only): a broken new model is
refused without touching readiness or the served model; a good one is loaded and answers
`?model=`; requests without `model` stay on the start-up model; removing the directory takes
the new model away again.
"""

from __future__ import annotations

import os
import shutil
import signal
from pathlib import Path

import pytest

from tests.service.bundles import sample_images, write_bundle
from tests.service.conftest import Server, run_server
from tests.service.test_reload_server import wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

PNG = sample_images()[0][1]
HEADERS = {"content-type": "image/png"}


def drop_in(repo: Path, name: str, *, broken: bool = False) -> None:
    """Write `name/1` outside the models directory, then rename the model directory in."""
    bundle = write_bundle(repo.parent / "staging", name, "1", seed=3)
    if broken:
        (bundle / "model.onnx").write_bytes((bundle / "model.onnx").read_bytes() + b"\0")
    os.rename(bundle.parent, repo / name)


def models(srv: Server) -> dict[str, dict]:
    with srv.client() as c:
        return {f"{m['name']}:{m['version']}": m for m in c.get("/models").json()["models"]}


def classify(srv: Server, **params: str) -> tuple[int, dict]:
    with srv.client() as c:
        r = c.post("/classify", params=params, content=PNG, headers=HEADERS)
    return r.status_code, r.json()


def test_new_model_directories_are_loaded_refused_and_removed_without_restart(
    tmp_path: Path,
) -> None:
    repo = tmp_path / "models"
    write_bundle(repo, "tiny", "1")
    with run_server(repo, tmp_path / "log", ISOMAX_RELOAD_INTERVAL_S="0") as srv:

        def hup() -> None:
            srv.proc.send_signal(signal.SIGHUP)

        drop_in(repo, "broken", broken=True)
        hup()
        wait_for(
            "broken:1 refused", lambda: models(srv).get("broken:1", {}).get("status") == "failed"
        )
        assert "does not match the manifest" in models(srv)["broken:1"]["error"]
        with srv.client() as c:
            ready = c.get("/readyz")
        assert ready.status_code == 200, ready.text  # a bad drop-in keeps the service ready
        assert ready.json()["models"]["broken"]["status"] == "failed"
        assert classify(srv)[1]["model"] == "tiny"
        status, body = classify(srv, model="broken")
        assert status == 503 and "failed permanently" in body["detail"]

        drop_in(repo, "other")
        hup()
        wait_for("other:1 ready", lambda: models(srv).get("other:1", {}).get("status") == "ready")
        status, body = classify(srv, model="other")
        assert status == 200 and (body["model"], body["version"]) == ("other", "1")
        status, body = classify(srv)  # no `model`: still the one model served at start-up
        assert status == 200 and body["model"] == "tiny"

        shutil.rmtree(repo / "other")
        shutil.rmtree(repo / "broken")
        hup()
        wait_for("other gone", lambda: "other:1" not in models(srv))
        status, body = classify(srv, model="other")
        assert status == 404 and "unknown model" in body["detail"]
        with srv.client() as c:
            ready = c.get("/readyz")
        assert ready.status_code == 200 and set(ready.json()["models"]) == {"tiny"}
        assert srv.proc.poll() is None
        log = srv.log_text()
        assert "model other: new model directory" in log and "Traceback" not in log
