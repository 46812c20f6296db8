"""Fashion-MNIST idx loading, the validation split, open-set classes and the batch loader."""

from __future__ import annotations

import gzip

import numpy as np
import pytest
import torch

from training.config import TrainConfig
from training.data import fmnist
from training.data.batches import BatchLoader, random_crop_flip
from training.data.datasets import load_dataset, validation_split


def write_idx(path, array: np.ndarray, compress: bool = True) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(
        int(d).to_bytes(4, "big") for d in array.shape
    )
    data = header + array.astype(np.uint8).tobytes()
    if compress:
        with gzip.open(str(path) + ".gz", "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)


@pytest.fixture
def tiny_fmnist(tmp_path):
    rng = np.random.default_rng(0)
    for split, n in (("train", 120), ("t10k", 40)):
        write_idx(tmp_path / f"{split}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28)))
        write_idx(
            tmp_path / f"{split}-labels-idx1-ubyte", np.arange(n) % 10, compress=split == "train"
        )
    return tmp_path


def test_reads_idx_plain_and_gz(tiny_fmnist):
    x, y = fmnist.load_split("train", tiny_fmnist)
    assert x.shape == (120, 1, 28, 28) and x.dtype == np.uint8
    assert y.dtype == np.int64 and list(y[:12]) == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1]
    xt, yt = fmnist.load_split("test", tiny_fmnist)  # labels file uncompressed
    assert xt.shape == (40, 1, 28, 28) and len(yt) == 40


def test_missing_directory_and_file_say_how_to_get_them(tmp_path, tiny_fmnist):
    with pytest.raises(fmnist.DataMissingError, match="apt-get install dataset-fashion-mnist"):
        fmnist.load_split("train", tmp_path / "nope")
    (tiny_fmnist / "t10k-images-idx3-ubyte.gz").unlink()
    with pytest.raises(fmnist.DataMissingError, match="t10k-images-idx3-ubyte"):
        fmnist.load_split("test", tiny_fmnist)


@pytest.mark.parametrize(
    "damage, match",
    [
        (lambda b: b[:-10], "bytes, header"),
        (lambda b: b"\x00\x00\x0d\x03" + b[4:], "bad magic"),
        (lambda b: b"garbage", "bad magic|cannot read"),
    ],
)
def test_corrupt_files_are_reported(tiny_fmnist, damage, match):
    p = tiny_fmnist / "train-images-idx3-ubyte.gz"
    raw = gzip.decompress(p.read_bytes())
    p.write_bytes(gzip.compress(damage(raw)))
    with pytest.raises(fmnist.DataCorruptError, match=match):
        fmnist.load_split("train", tiny_fmnist)


def test_truncated_gzip_is_reported(tiny_fmnist):
    p = tiny_fmnist / "train-labels-idx1-ubyte.gz"
    p.write_bytes(p.read_bytes()[:20])
    with pytest.raises(fmnist.DataCorruptError, match="cannot read"):
        fmnist.load_split("train", tiny_fmnist)


def test_validation_split_is_seeded_disjoint_and_complete():
    tr, va = validation_split(100, 20, seed=3)
    tr2, va2 = validation_split(100, 20, seed=3)
    assert np.array_equal(va, va2) and np.array_equal(tr, tr2)
    assert len(va) == 20 and not set(tr) & set(va) and sorted([*tr, *va]) == list(range(100))
    assert not np.array_equal(va, validation_split(100, 20, seed=4)[1])
    with pytest.raises(ValueError, match="val_size"):
        validation_split(10, 10, seed=0)


def test_open_set_keeps_classes_and_holds_out_the_rest(tiny_fmnist):
    cfg = TrainConfig(data_dir=str(tiny_fmnist), classes=[0, 2, 4], val_size=6)
    d = load_dataset(cfg)
    assert d.labels == ["T-shirt/top", "Pullover", "Coat"]
    assert set(np.unique(d.train_y)) <= {0, 1, 2} and set(np.unique(d.test_y)) == {0, 1, 2}
    assert len(d.held_out_x) == 40 - len(d.test_y) and len(d.test_y) == 12
    with pytest.raises(ValueError, match="proper subset"):
        load_dataset(TrainConfig(data_dir=str(tiny_fmnist), classes=list(range(10)), val_size=6))


def test_batch_loader_covers_every_image_once_per_epoch():
    x = np.arange(10 * 4, dtype=np.uint8).reshape(10, 1, 2, 2)
    y = np.arange(10)
    seen = [yb for _, yb in BatchLoader(x, y, batch_size=3, shuffle=True, seed=1)]
    assert sorted(torch.cat(seen).tolist()) == list(range(10))
    xb, _ = next(iter(BatchLoader(x, y, batch_size=10)))
    assert xb.dtype == torch.float32 and torch.allclose(xb * 255, torch.from_numpy(x).float())


def test_crop_and_flip_move_pixels_but_keep_content():
    gen = torch.Generator().manual_seed(0)
    x = torch.zeros(64, 1, 8, 8)
    x[:, :, 3:5, 3:5] = 1.0
    out = random_crop_flip(x, pad=2, flip=True, gen=gen)
    assert out.shape == x.shape
    assert torch.all(out.sum(dim=(1, 2, 3)) == 4)  # a 2x2 blob 2 px from the edge never leaves
    assert len({tuple(o.nonzero()[0].tolist()) for o in out}) > 5  # and lands in many places
