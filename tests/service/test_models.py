"""Loading bundles: all or nothing, reasons reported, CUDA never silently replaced by CPU."""

from __future__ import annotations

import json
import re
from pathlib import Path

import onnx
import onnxruntime as ort
import pytest

from isomax.contract.manifest import Manifest, sha256_file
from service.discovery import BundleRef, ConfigError, ModelLoadError, discover
from service.loading import load_model
from service.settings import Settings
from tests.service.bundles import tiny_graph, write_bundle
from tests.service.cases import PNG
from tests.service.conftest import app_client, wait_ready


def load(bundle: Path, **settings: object) -> object:
    ref = BundleRef(bundle.parent.name, bundle.name, bundle)
    return load_model(ref, Settings(models_dir=bundle.parent.parent, **settings))  # type: ignore[arg-type]


def test_discover_serves_the_newest_numeric_version(tmp_path: Path) -> None:
    for v in ("2", "10", "9"):
        write_bundle(tmp_path, "m", v)
    (tmp_path / "m" / "latest").mkdir()  # not a version: ignored
    (tmp_path / "notes.txt").write_text("ignored")
    assert [r.key for r in discover(tmp_path)] == ["m:10"]
    assert [r.key for r in discover(tmp_path, ("m:2", "m"))] == ["m:2", "m:10"]


@pytest.mark.parametrize(
    "wanted, message",
    [(("nope",), "model 'nope' not found"), (("m:7",), "has no version 7")],
)
def test_discover_refuses_what_is_not_there(tmp_path: Path, wanted: tuple, message: str) -> None:
    write_bundle(tmp_path, "m", "1")
    with pytest.raises(ConfigError, match=message):
        discover(tmp_path, wanted)


def test_discover_refuses_an_empty_or_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        discover(tmp_path / "missing")
    with pytest.raises(ConfigError, match="no bundles"):
        discover(tmp_path)


def test_a_good_bundle_loads_with_its_threshold(tmp_path: Path) -> None:
    bundle = write_bundle(tmp_path)
    model = load(bundle)
    manifest = Manifest.read(bundle)
    assert model.thresholds.overall == manifest.calibration.threshold  # type: ignore[attr-defined]
    assert model.provider == "CPUExecutionProvider"  # type: ignore[attr-defined]


def _corrupt_sha(bundle: Path) -> None:
    (bundle / "model.onnx").write_bytes((bundle / "model.onnx").read_bytes() + b"\0")


def _bad_manifest(bundle: Path) -> None:
    data = json.loads((bundle / "manifest.json").read_text())
    data["labels"] = ["only-one"]
    (bundle / "manifest.json").write_text(json.dumps(data))


def _wrong_label_count(bundle: Path) -> None:
    """A valid manifest whose 3 labels do not match the graph's 10 logits."""
    m = Manifest.read(bundle)
    m.model_copy(update={"labels": ("a", "b", "c")}).write(bundle)


def _wrong_input_size(bundle: Path) -> None:
    m = Manifest.read(bundle)
    spec = m.preprocess.model_copy(update={"height": 32, "width": 32})
    m.model_copy(update={"preprocess": spec}).write(bundle)


def _no_distance_output(bundle: Path) -> None:
    onnx.save(tiny_graph(with_distance=False), str(bundle / "model.onnx"))
    m = Manifest.read(bundle)
    onnx_spec = m.onnx.model_copy(update={"sha256": sha256_file(bundle / "model.onnx")})
    m.model_copy(update={"onnx": onnx_spec}).write(bundle)


def _name_mismatch(bundle: Path) -> None:
    m = Manifest.read(bundle)
    m.model_copy(update={"name": "other"}).write(bundle)


def _missing_onnx(bundle: Path) -> None:
    (bundle / "model.onnx").unlink()


BROKEN = {
    "sha256-mismatch": (_corrupt_sha, "does not match the manifest"),
    "invalid-manifest": (_bad_manifest, "manifest.json is invalid"),
    "label-count": (_wrong_label_count, "expected (1, 3)"),
    "input-size": (_wrong_input_size, "preprocess gives [N, 1, 32, 32]"),
    "no-min-distance": (_no_distance_output, "no output 'min_distance'"),
    "name-mismatch": (_name_mismatch, "manifest says other:1"),
    "missing-onnx": (_missing_onnx, "model.onnx is missing"),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_a_broken_bundle_is_refused_with_the_reason(tmp_path: Path, case: str) -> None:
    bundle = write_bundle(tmp_path)
    breaker, message = BROKEN[case]
    breaker(bundle)
    with pytest.raises(ModelLoadError, match=re.escape(message)):
        load(bundle)


def test_a_target_tpr_outside_the_table_is_refused(tmp_path: Path) -> None:
    bundle = write_bundle(tmp_path)
    with pytest.raises(ModelLoadError, match="outside the calibrated range"):
        load(bundle, target_tpr={"tiny": 0.2})


@pytest.mark.skipif(
    "CUDAExecutionProvider" in ort.get_available_providers(), reason="this machine has CUDA"
)
def test_device_cuda_without_cuda_is_not_ready_with_a_clear_reason(tmp_path: Path) -> None:
    write_bundle(tmp_path)
    with app_client(models_dir=tmp_path, device="cuda") as c:
        c.app.service.registry.wait_loaded(30)  # type: ignore[attr-defined]
        r = c.get("/readyz")
        # Failed for good (no version loads): 503 without Retry-After, waiting will not help.
        assert r.status_code == 503 and "retry-after" not in r.headers
        assert "ISOMAX_DEVICE=cuda" in r.json()["detail"] and "CUDA provider" in r.json()["detail"]
        assert r.json()["models"]["tiny"]["status"] == "failed"
        cls = c.post("/classify", content=PNG, headers={"content-type": "image/png"})
        assert cls.status_code == 503 and "retry-after" not in cls.headers
        assert "failed permanently" in cls.json()["detail"]
        (info,) = c.get("/models").json()["models"]
        assert info["status"] == "failed" and info["provider"] is None
        assert c.get("/healthz").status_code == 200  # alive, just not ready


def test_device_auto_reports_the_provider_that_runs(tmp_path: Path) -> None:
    write_bundle(tmp_path)
    with app_client(models_dir=tmp_path, device="auto") as c:
        wait_ready(c)
        (info,) = c.get("/models").json()["models"]
        assert info["provider"] in ort.get_available_providers()


def test_one_broken_bundle_is_never_half_served(tmp_path: Path) -> None:
    write_bundle(tmp_path, "good", "1")
    _corrupt_sha(write_bundle(tmp_path, "bad", "1"))
    with app_client(models_dir=tmp_path) as c:
        c.app.service.registry.wait_loaded(30)  # type: ignore[attr-defined]
        ready = c.get("/readyz")
        assert ready.status_code == 503 and "bad:1: " in ready.json()["detail"]
        assert ready.json()["models"]["good"] == {"status": "ready", "version": "1", "detail": None}
        assert ready.json()["models"]["bad"]["status"] == "failed"
        png = {"content": PNG, "headers": {"content-type": "image/png"}}
        assert c.post("/classify", params={"model": "good"}, **png).status_code == 200
        r = c.post("/classify", params={"model": "bad"}, **png)
        assert r.status_code == 503 and "sha256" in r.json()["detail"]
        registry = c.app.service.metrics.registry  # type: ignore[attr-defined]
        assert registry.get_sample_value("isomax_model_ready", {"model": "bad"}) == 0
        assert registry.get_sample_value("isomax_model_ready", {"model": "good"}) == 1


def test_warm_up_runs_every_batch_size(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bundle = write_bundle(tmp_path)
    seen: list[int] = []
    real = ort.InferenceSession.run

    def spy(self: ort.InferenceSession, outputs: object, feeds: dict, *a: object) -> object:
        seen.append(len(next(iter(feeds.values()))))
        return real(self, outputs, feeds, *a)  # type: ignore[arg-type]

    monkeypatch.setattr(ort.InferenceSession, "run", spy)
    load(bundle, max_batch_size=7)
    assert seen == list(range(1, 8))


def test_config_errors_stop_start_up(tmp_path: Path) -> None:
    write_bundle(tmp_path, "m", "1")
    with pytest.raises(ConfigError, match="not served"):  # noqa: SIM117
        with app_client(models_dir=tmp_path, target_tpr={"other": 0.9}):
            pass
    with pytest.raises(ConfigError, match="does not exist"):  # noqa: SIM117
        with app_client(models_dir=tmp_path / "nowhere"):
            pass


def _threads(model: object) -> int:
    return model.session.get_session_options().intra_op_num_threads  # type: ignore[attr-defined]


def test_threads_follow_the_models_cost(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """service/sessions.py: a light model leaves one core per worker to the event loops, a heavy
    one (at least HEAVY_MODEL_S of CPU per image) gets every core of its worker, a set value
    is used as is."""
    import service.sessions as sessions

    bundle = write_bundle(tmp_path)
    monkeypatch.setattr(sessions, "cores", lambda: 4)
    assert _threads(load(bundle)) == 3  # the tiny graph is light: 4 cores - 1 event loop
    assert _threads(load(bundle, workers=2)) == 1  # (4 - 2) / 2
    assert _threads(load(bundle, intra_op_threads=2)) == 2
    monkeypatch.setattr(sessions, "HEAVY_MODEL_S", 0.0)  # now every model is heavy
    assert _threads(load(bundle)) == 4
    assert _threads(load(bundle, workers=2)) == 2
    assert _threads(load(bundle, intra_op_threads=1)) == 1


def test_heavy_is_the_cost_at_one_thread() -> None:
    from service.sessions import HEAVY_MODEL_S, is_heavy

    assert not is_heavy(HEAVY_MODEL_S / 2, 1)
    assert is_heavy(HEAVY_MODEL_S / 2, 2)  # half the time on two threads: the same CPU
    assert is_heavy(0.045, 1)  # a 224-px ResNet-18 on this kind of machine
    assert not is_heavy(0.00025, 1)  # the 28x28 Fashion-MNIST bundle


@pytest.mark.parametrize(
    ("files", "limit"),
    [
        ({"cpu.max": "200000 100000\n"}, 2),  # cgroup v2, `--cpus 2`
        ({"cpu.max": "150000 100000\n"}, 2),  # 1.5 cores: rounded up
        ({"cpu.max": "max 100000\n"}, None),  # v2, no limit
        ({"cpu/cpu.cfs_quota_us": "400000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 4),  # v1
        ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, None),
        ({}, None),  # no cgroup files at all
    ],
)
def test_a_containers_cpu_limit_caps_the_cores(
    tmp_path: Path, files: dict[str, str], limit: int | None
) -> None:
    from service.sessions import cgroup_cpu_limit

    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    assert cgroup_cpu_limit(tmp_path) == limit


def test_fingerprint_follows_every_file_not_only_model_onnx(tmp_path: Path) -> None:
    """A bundle's graph may be named anything (`manifest.onnx.file`): replacing it must show."""
    from service.discovery import fingerprint

    version = tmp_path / "m" / "1"
    version.mkdir(parents=True)
    (version / "manifest.json").write_text("{}")
    (version / "graph.onnx").write_bytes(b"a")
    before = fingerprint(version)
    (version / "graph.onnx").unlink()
    (version / "graph.onnx").write_bytes(b"bb")  # a new file: new inode and size
    assert fingerprint(version) != before
