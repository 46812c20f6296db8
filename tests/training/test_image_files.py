"""Training batches from image files: the service's tensor for the same file, JPEG draft
scaling on large photos, augmentation shapes, and seeded epochs."""

from __future__ import annotations

import asyncio
import io
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from isomax.contract.decode import decode_uint8, load_pixels, open_header
from isomax.contract.manifest import Preprocess
from service.batching import batch_input
from service.classify import Upload, decode_uploads
from service.settings import Settings
from training.data.image_files import FileBatches, ImageFiles, check_files

SPEC = Preprocess(height=64, width=64, channels=3, color_mode="RGB", resize_mode="center_crop")


def _photo(w: int, h: int, seed: int = 0) -> Image.Image:
    """Smooth color gradients plus noise: JPEG-like content at any size."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    base = np.stack([xx / w, yy / h, (xx + yy) / (w + h)], axis=-1) * 200
    noise = rng.normal(0, 12, (h // 8 + 1, w // 8 + 1, 3)).repeat(8, 0).repeat(8, 1)[:h, :w]
    return Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8))


def _jpeg(img: Image.Image, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, "JPEG", quality=90)
    return path


def test_large_jpeg_is_draft_decoded_and_training_equals_serving(tmp_path: Path) -> None:
    path = _jpeg(_photo(2400, 1800), tmp_path / "big.jpg")
    data = path.read_bytes()
    # Draft scaling: for a 64-px input the decoder delivers 1/8 of each side (300x225).
    img = open_header(data)
    img.draft(img.mode, (64, 64))
    assert load_pixels(img).size == (300, 225)
    # The training dataset's tensor (no augmentation) is the service's, bit for bit.
    train_x, label = ImageFiles([path], np.array([0]), SPEC)[0]
    model = SimpleNamespace(manifest=SimpleNamespace(preprocess=SPEC))
    pixels = asyncio.run(decode_uploads([Upload("big.jpg", data)], model, Settings()))  # type: ignore[arg-type]
    served = batch_input([pixels])  # what the batcher hands the graph
    assert label == 0 and train_x.dtype == torch.uint8
    assert np.array_equal(served[0], train_x.numpy().astype(np.float32) / np.float32(255.0))
    # And draft decoding stays close to a full decode (same picture, within JPEG noise).
    full = Image.open(io.BytesIO(data)).convert("RGB")
    from PIL import ImageOps

    ref = np.asarray(ImageOps.fit(full, (64, 64), Image.Resampling.BILINEAR), dtype=np.float32)
    drafted = decode_uint8(data, SPEC).transpose(1, 2, 0).astype(np.float32)
    assert np.abs(ref - drafted).mean() < 4.0


def test_augmented_batches_are_seeded_and_shaped(tmp_path: Path) -> None:
    paths = [_jpeg(_photo(120 + 10 * i, 90, seed=i), tmp_path / f"{i}.jpg") for i in range(6)]
    labels = np.array([0, 1, 0, 1, 0, 1])
    files = ImageFiles(paths, labels, SPEC, augment=True)

    def epoch(seed: int) -> list[torch.Tensor]:
        torch.manual_seed(0)
        loader = FileBatches(files, 3, seed, torch.device("cpu"), workers=0)
        return [x for x, _ in loader]

    a, b = epoch(1), epoch(1)
    assert len(a) == 2 and a[0].shape == (3, 3, 64, 64) and a[0].dtype == torch.float32
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert not torch.equal(torch.cat(a), torch.cat(epoch(2)))
    assert float(a[0].min()) >= 0.0 and float(a[0].max()) <= 1.0


def test_check_files_gives_channel_statistics(tmp_path: Path) -> None:
    gray = Image.new("RGB", (80, 80), (51, 102, 204))
    paths = [_jpeg(gray, tmp_path / f"{i}.jpg") for i in range(3)]
    (tmp_path / "bad.jpg").write_bytes(b"nope")
    kept, mean, std = check_files([*paths, tmp_path / "bad.jpg"], SPEC, "skip")
    assert kept.tolist() == [0, 1, 2]
    assert np.allclose(mean, [0.2, 0.4, 0.8], atol=0.02) and max(std) < 0.02


def test_image_folder_run_resumes_exactly(tmp_path: Path, monkeypatch) -> None:
    """Killed while saving epoch 2 and resumed, an augmented image-folder run ends with the
    weights of a run never interrupted (batches reseeded from the checkpointed generator)."""
    from training import train as train_module
    from training.config import TrainConfig

    for k, cls in enumerate(("a", "b")):
        for i in range(10):
            _jpeg(_photo(60 + 5 * i, 50, seed=10 * k + i), tmp_path / "data" / cls / f"{i}.jpg")
    cfg = TrainConfig(
        dataset="folder", data_dir=str(tmp_path / "data"), image_size=24, epochs=2,
        batch_size=4, lr=0.05, augment=True, workers=0, threads=1,
    )  # fmt: skip
    real_save = train_module.torch.save

    def dying_save(obj, path, *args, **kwargs):
        if obj.get("epoch") == 1:
            raise KeyboardInterrupt
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(train_module.torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        train_module.train(cfg, tmp_path / "resumed", progress=False)
    monkeypatch.setattr(train_module.torch, "save", real_save)
    train_module.train(cfg, tmp_path / "resumed", resume=True, progress=False)
    train_module.train(cfg, tmp_path / "straight", progress=False)
    a = torch.load(tmp_path / "straight" / "last.pt", weights_only=False)
    b = torch.load(tmp_path / "resumed" / "last.pt", weights_only=False)
    assert a["epoch"] == b["epoch"] == 1
    for name, value in a["model"].items():
        assert torch.equal(b["model"][name], value), name
