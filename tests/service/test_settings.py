"""Settings from ISOMAX_* variables and `isomax serve` flags; bad values refused at start-up."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from service.cli import build_parser, main, settings_from_args
from service.settings import Settings, unknown_env
from tests.service.bundles import write_bundle


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for key in list(os.environ):
        if key.startswith("ISOMAX_"):
            monkeypatch.delenv(key)


def test_defaults() -> None:
    s = Settings()
    assert s.models_dir == Path("models") and s.device == "auto" and s.models == ()
    assert s.max_body_bytes >= s.max_image_bytes
    assert s.max_queue_images >= s.max_images_per_request


def test_environment_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ISOMAX_MODELS_DIR", "/srv/models")
    monkeypatch.setenv("ISOMAX_MODELS", "fmnist-isomaxplus, other:3")
    monkeypatch.setenv("ISOMAX_DEVICE", "cuda")
    monkeypatch.setenv("ISOMAX_MAX_BATCH_SIZE", "64")
    monkeypatch.setenv("ISOMAX_MAX_WAIT_MS", "0.5")
    monkeypatch.setenv("ISOMAX_TARGET_TPR", '{"fmnist-isomaxplus": 0.99}')
    s = Settings()
    assert s.models_dir == Path("/srv/models")
    assert s.models == ("fmnist-isomaxplus", "other:3")
    assert (s.device, s.max_batch_size, s.max_wait_s) == ("cuda", 64, 0.0005)
    assert s.target_tpr == {"fmnist-isomaxplus": 0.99}


@pytest.mark.parametrize(
    "env, message",
    [
        ({"ISOMAX_DEVICE": "tpu"}, "device"),
        ({"ISOMAX_MAX_BATCH_SIZE": "0"}, "max_batch_size"),
        ({"ISOMAX_MAX_WAIT_MS": "-1"}, "max_wait_ms"),
        ({"ISOMAX_TARGET_TPR": '{"m": 1.5}'}, "must be in (0, 1)"),
        ({"ISOMAX_TARGET_TPR": "0.99"}, "target_tpr"),
        ({"ISOMAX_MODELS": "Bad Name"}, "'name' or 'name:version'"),
        ({"ISOMAX_MAX_IMAGE_BYTES": "100", "ISOMAX_MAX_BODY_BYTES": "10"}, "max_body_bytes"),
        ({"ISOMAX_MAX_QUEUE_IMAGES": "4"}, "max_queue_images"),
    ],
)
def test_bad_configuration_is_refused(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], message: str
) -> None:
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(ValidationError, match=message.replace("(", r"\(").replace(")", r"\)")):
        Settings()


def test_unknown_variables_are_named() -> None:
    env = {"ISOMAX_MAX_BATCHSIZE": "64", "ISOMAX_PORT": "1", "PATH": "/bin"}
    assert unknown_env(env) == ["ISOMAX_MAX_BATCHSIZE"]


def test_flags_override_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ISOMAX_PORT", "9000")
    monkeypatch.setenv("ISOMAX_MAX_BATCH_SIZE", "16")
    monkeypatch.setenv("ISOMAX_TARGET_TPR", '{"a": 0.9}')
    args = build_parser().parse_args(
        ["--port", "8123", "--models-dir", "elsewhere", "--target-tpr", "b=0.99", "--workers", "2"]
    )
    s = settings_from_args(args)
    assert (s.port, s.models_dir, s.max_batch_size, s.workers) == (8123, Path("elsewhere"), 16, 2)
    assert s.target_tpr == {"a": 0.9, "b": 0.99}


def test_serve_refuses_bad_flags_and_missing_models(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["--models-dir", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["--max-batch-size", "0", "--models-dir", str(tmp_path)]) == 2
    assert "max_batch_size" in capsys.readouterr().err
    write_bundle(tmp_path, "m", "1")
    assert main(["--models-dir", str(tmp_path), "--target-tpr", "other=0.9"]) == 2
    assert "not served" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--device", "tpu"])
