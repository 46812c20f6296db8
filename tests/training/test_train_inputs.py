"""`isomax train` on users' folders: layouts, splits sized for the folder, bad-file policy, and
one clear line (exit 2, no traceback) for each kind of bad input."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from training.cli import main
from training.config import TrainConfig
from training.data.datasets import load_dataset


def _img(path: Path, value: int, size: tuple[int, int] = (50, 40)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(value)
    arr = np.clip(rng.normal(value, 20, (size[1], size[0], 3)), 0, 255).astype(np.uint8)
    Image.fromarray(arr).save(path)


def _folder(root: Path, per_class: int = 6, classes: tuple[str, ...] = ("a", "b")) -> Path:
    for k, c in enumerate(classes):
        for i in range(per_class):
            _img(root / c / f"{i}.jpg", 60 + 120 * k + i)
    return root


def _train(capsys: pytest.CaptureFixture[str], out: Path, *args: str) -> tuple[int, str]:
    """`isomax train` into `out` (without --out it would write under the repository's runs/)."""
    code = main(["train", "--quiet", "--workers", "0", "--out", str(out), *args])
    return code, capsys.readouterr().err


def _one_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.startswith("isomax train: error:")]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


def test_empty_class_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = _folder(tmp_path / "d")
    (root / "empty").mkdir()
    code, err = _train(capsys, tmp_path / "run", "--dataset", "folder", "--data-dir", str(root))
    assert code == 2
    assert "empty has no images" in _one_line(err)


def test_unreadable_image_fails_or_is_skipped_and_counted(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    root = _folder(tmp_path / "d", per_class=8)
    (root / "a" / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    code, err = _train(capsys, tmp_path / "run", "--dataset", "folder", "--data-dir", str(root))
    assert code == 2
    line = _one_line(err)
    assert "broken.jpg" in line and "cannot decode image" in line
    cfg = TrainConfig(dataset="folder", data_dir=str(root), bad_images="skip", workers=0)
    with caplog.at_level(logging.INFO):
        data = load_dataset(cfg)
    assert len(data.train_y) + len(data.val_y) == 16  # 17 files, the broken one left out
    assert "skipped 1 unreadable image file(s)" in caplog.text
    assert "training images: " in caplog.text and "a=" in caplog.text  # the class balance


def test_weights_of_another_architecture(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from training.models.torchvision_import import import_torchvision

    root = _folder(tmp_path / "d")
    weights = tmp_path / "r18.pth"
    torch.save(import_torchvision().models.resnet18().state_dict(), weights)
    code, err = _train(
        capsys,
        tmp_path / "run",
        "--dataset", "folder", "--data-dir", str(root), "--arch", "tv-mobilenet_v3_large",
        "--weights", str(weights), "--image-size", "32",
    )  # fmt: skip
    assert code == 2
    assert "do not fit tv-mobilenet_v3_large" in _one_line(err)


def test_unknown_arch_and_settings(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = _folder(tmp_path / "d")
    for args, text in [
        (("--arch", "vgg99"), "unknown architecture 'vgg99'"),
        (("--arch", "tv-vgg99"), "unknown torchvision classification model 'vgg99'"),
        (("--schedule", "linear"), "unknown schedule 'linear'"),
        (("--bad-images", "ignore"), "bad_images must be fail or skip"),
    ]:
        code, err = _train(
            capsys, tmp_path / "run", "--dataset", "folder", "--data-dir", str(root), *args
        )
        assert code == 2, args
        assert text in _one_line(err)


def test_small_folder_holds_out_a_fifth_and_a_val_folder_is_used_as_is(tmp_path: Path) -> None:
    """A 12-image folder trains (the default val_size 5000 used to stop it)."""
    root = _folder(tmp_path / "flat")
    data = load_dataset(TrainConfig(dataset="folder", data_dir=str(root), workers=0))
    assert len(data.val_y) == 2 and data.train_files is not None and len(data.train_files) == 10
    assert data.preprocess is not None and data.val_x.shape == (2, 3, 32, 32)

    split = tmp_path / "split"
    _folder(split / "train")
    _folder(split / "val", per_class=3)
    cfg = TrainConfig(
        dataset="folder", data_dir=str(split), arch="tv-resnet18", image_size=48, workers=0
    )
    data = load_dataset(cfg)
    assert sorted(data.val_y.tolist()) == [0, 0, 0, 1, 1, 1]
    assert data.train_files is not None and len(data.train_files) == 12
    assert data.preprocess is not None and data.preprocess.resize_mode == "center_crop"
    assert data.val_x.shape == (6, 3, 48, 48)
