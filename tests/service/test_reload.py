"""The model registry in one process: fallback, hot reload, pinning, removal, symlinks, admin.

The manager thread is real (onnxruntime sessions, real bundles on disk); rescans are asked for
through the admin endpoint or `request_reload`, so no test waits for a polling interval.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from tests.service.bundles import write_bundle
from tests.service.cases import PNG
from tests.service.conftest import app_client, wait_ready

RAW = {"content": PNG, "headers": {"content-type": "image/png"}}
TOKEN = "s3cret-token"


def corrupt(bundle: Path) -> Path:
    """Same manifest, one byte more in model.onnx: the sha256 check refuses it."""
    (bundle / "model.onnx").write_bytes((bundle / "model.onnx").read_bytes() + b"\0")
    return bundle


def reload(c: TestClient) -> dict:
    r = c.post("/admin/reload", headers={"authorization": f"Bearer {TOKEN}"})
    assert r.status_code == 200, r.text
    return r.json()


def served_version(c: TestClient, **params: str) -> str:
    r = c.post("/classify", params=params, **RAW)  # type: ignore[arg-type]
    assert r.status_code == 200, r.text
    return r.json()["version"]


def sample(c: TestClient, name: str, labels: dict[str, str] | None = None) -> float | None:
    return c.app.service.metrics.registry.get_sample_value(name, labels or {})  # type: ignore[attr-defined]


@pytest.fixture()
def repo(tmp_path: Path) -> Path:
    write_bundle(tmp_path, "tiny", "1")
    return tmp_path


@pytest.fixture()
def client(repo: Path) -> Iterator[TestClient]:
    with app_client(models_dir=repo, admin_token=TOKEN, reload_interval_s=0) as c:
        wait_ready(c)
        yield c


def test_a_broken_newest_version_falls_back_to_the_last_good_one(repo: Path) -> None:
    corrupt(write_bundle(repo, "tiny", "2"))
    with app_client(models_dir=repo, reload_interval_s=0) as c:
        wait_ready(c)  # ready: the model has a working version
        assert served_version(c) == "1"
        models = {m["version"]: m for m in c.get("/models").json()["models"]}
        assert models["2"]["status"] == "failed" and "sha256" in models["2"]["error"]
        assert models["1"]["status"] == "ready" and models["1"]["default"] is True
        assert sample(c, "isomax_model_load_failures_total", {"model": "tiny"}) == 1
        info = {"model": "tiny", "version": "1", "provider": "CPUExecutionProvider"}
        assert sample(c, "isomax_model_info", info) == 1
        # The failed version, asked for by name, fails for good: 503 without Retry-After.
        r = c.post("/classify", params={"version": "2"}, **RAW)  # type: ignore[arg-type]
        assert r.status_code == 503 and "retry-after" not in r.headers
        assert "tiny:2 failed to load" in r.json()["detail"]


def test_a_new_version_is_swapped_in_and_the_old_one_retired(
    client: TestClient, repo: Path
) -> None:
    assert served_version(client) == "1"
    write_bundle(repo, "tiny", "2", seed=1)
    body = reload(client)
    assert body["ready"] and body["models"]["tiny"] == {
        "status": "ready",
        "version": "2",
        "detail": None,
    }
    assert served_version(client) == "2"
    assert served_version(client, model="tiny") == "2"
    assert sample(client, "isomax_model_default_version", {"model": "tiny"}) == 2
    assert sample(client, "isomax_model_loads_total", {"model": "tiny"}) == 2
    # keep_versions=1: version 1 leaves the view and is retired (info 0, not served).
    old = {"model": "tiny", "version": "1", "provider": "CPUExecutionProvider"}
    assert sample(client, "isomax_model_info", old) == 0
    r = client.post("/classify", params={"version": "1"}, **RAW)  # type: ignore[arg-type]
    assert r.status_code == 404 and "no version 1 of tiny is loaded" in r.json()["detail"]


def test_a_corrupt_version_never_replaces_a_working_one_and_is_retried_when_fixed(
    client: TestClient, repo: Path
) -> None:
    bad = corrupt(write_bundle(repo, "tiny", "2"))
    body = reload(client)
    assert body["ready"] and body["models"]["tiny"]["version"] == "1"
    assert served_version(client) == "1"
    (info,) = [m for m in client.get("/models").json()["models"] if m["version"] == "2"]
    assert info["status"] == "failed" and "does not match the manifest" in info["error"]
    assert str(repo) not in info["error"]  # no server paths in what clients read
    reload(client)  # same files: not retried
    assert sample(client, "isomax_model_load_failures_total", {"model": "tiny"}) == 1
    shutil.rmtree(bad)
    write_bundle(repo, "tiny", "2", seed=1)  # fixed files: retried, and served
    reload(client)
    assert served_version(client) == "2"


def test_version_pins_a_loaded_version(repo: Path) -> None:
    write_bundle(repo, "tiny", "2", seed=1)
    write_bundle(repo, "tiny", "3", seed=2)
    with app_client(models_dir=repo, keep_versions=2, reload_interval_s=0) as c:
        wait_ready(c)
        assert served_version(c) == "3"
        assert served_version(c, version="2") == "2"
        assert served_version(c, model="tiny:2") == "2"
        assert served_version(c, model="tiny", version="2") == "2"
        for params, status in (
            ({"version": "1"}, 404),  # on disk, not among the 2 kept
            ({"version": "9"}, 404),
            ({"version": "x"}, 422),
            ({"model": "tiny:2", "version": "3"}, 422),
        ):
            r = c.post("/classify", params=params, **RAW)  # type: ignore[arg-type]
            assert r.status_code == status, (params, r.text)


def test_removing_version_directories_falls_back_and_then_fails_permanently(
    repo: Path,
) -> None:
    write_bundle(repo, "tiny", "2", seed=1)
    with app_client(models_dir=repo, keep_versions=2, reload_interval_s=0) as c:
        wait_ready(c)
        registry = c.app.service.registry  # type: ignore[attr-defined]
        assert served_version(c) == "2"
        shutil.rmtree(repo / "tiny" / "2")
        registry.wait_reload(registry.request_reload(), 30)
        assert served_version(c) == "1"
        shutil.rmtree(repo / "tiny" / "1")
        registry.wait_reload(registry.request_reload(), 30)
        r = c.post("/classify", **RAW)  # type: ignore[arg-type]
        assert r.status_code == 503 and "retry-after" not in r.headers
        assert "failed permanently" in r.json()["detail"]
        ready = c.get("/readyz")
        assert ready.status_code == 503 and "retry-after" not in ready.headers
        assert ready.json()["models"]["tiny"]["status"] == "failed"
        assert c.get("/healthz").status_code == 200
        write_bundle(repo, "tiny", "3", seed=2)  # a new version brings it back
        registry.wait_reload(registry.request_reload(), 30)
        assert c.get("/readyz").status_code == 200
        assert served_version(c) == "3"


def test_polling_picks_up_a_new_version_without_being_asked(repo: Path) -> None:
    with app_client(models_dir=repo, reload_interval_s=0.2) as c:
        wait_ready(c)
        write_bundle(repo, "tiny", "2", seed=1)
        deadline = time.monotonic() + 30
        while served_version(c) != "2":
            assert time.monotonic() < deadline, "polling never loaded version 2"
            time.sleep(0.05)


def test_the_admin_endpoint_exists_only_with_a_token_and_checks_it(
    client: TestClient, repo: Path
) -> None:
    with app_client(models_dir=repo) as c:
        assert c.post("/admin/reload").status_code == 404  # no token set: no endpoint
    r = client.post("/admin/reload")
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    assert client.post("/admin/reload", headers={"authorization": "Basic eDp5"}).status_code == 401
    wrong = client.post("/admin/reload", headers={"authorization": "Bearer nope"})
    assert wrong.status_code == 403 and "wrong token" in wrong.json()["detail"]
    assert reload(client)["ready"] is True


def _link_out(repo: Path, outside: Path) -> None:
    """tiny/2 -> a bundle outside the models directory; tiny/3/model.onnx -> a file outside."""
    real = write_bundle(outside, "tiny", "2", seed=1)
    (repo / "tiny" / "2").symlink_to(real, target_is_directory=True)
    three = write_bundle(repo, "tiny", "3", seed=1)
    shutil.move(three / "model.onnx", outside / "three.onnx")
    (three / "model.onnx").symlink_to(outside / "three.onnx")


def test_symlinks_out_of_the_models_directory_are_refused(repo: Path, tmp_path: Path) -> None:
    outside = tmp_path.parent / f"{tmp_path.name}-outside"
    outside.mkdir()
    models = repo
    _link_out(models, outside)
    with app_client(models_dir=models, keep_versions=3, reload_interval_s=0) as c:
        wait_ready(c)
        assert served_version(c) == "1"
        infos = {m["version"]: m for m in c.get("/models").json()["models"]}
        assert infos["2"]["status"] == "failed"
        assert "tiny/2 is a symbolic link out of the models directory" in infos["2"]["error"]
        assert infos["3"]["status"] == "failed"
        assert "tiny/3/model.onnx is a symbolic link out" in infos["3"]["error"]
    with app_client(
        models_dir=models, keep_versions=3, reload_interval_s=0, allow_symlinks=True
    ) as c:
        wait_ready(c)
        assert served_version(c) == "3"
        assert served_version(c, version="2") == "2"


def test_a_symlink_inside_the_models_directory_is_fine(repo: Path) -> None:
    write_bundle(repo, "store", "7")  # another model's directory, inside the repository
    (repo / "tiny" / "2").mkdir()
    for f in ("manifest.json", "model.onnx"):
        (repo / "tiny" / "2" / f).symlink_to(repo / "tiny" / "1" / f)
    with app_client(models_dir=repo, models=("tiny",), reload_interval_s=0) as c:
        wait_ready(c)
        (info,) = [m for m in c.get("/models").json()["models"] if m["version"] == "2"]
        # Loaded past the symlink check; refused only because its manifest says version 1.
        assert (
            "symbolic link" not in (info["error"] or "") and "manifest says tiny:1" in info["error"]
        )


def test_the_queue_gauge_adds_up_the_versions_of_a_model() -> None:
    """Two versions with images queued during a swap: the model's gauge is their sum."""
    from service.metrics import PrometheusMetrics

    m = PrometheusMetrics()
    m.add_model("tiny")
    old, new = m.queue_observer("tiny", "1"), m.queue_observer("tiny", "2")
    old(3)
    new(4)
    assert m.registry.get_sample_value("isomax_queue_images", {"model": "tiny"}) == 7
    old(0)
    assert m.registry.get_sample_value("isomax_queue_images", {"model": "tiny"}) == 4
