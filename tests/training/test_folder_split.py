"""The automatic validation split of an image folder is stratified: every class keeps its share.

Before, one seeded permutation of three folders of 32 images trained on 23/28/26 of them.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from training.config import TrainConfig
from training.data.datasets import load_dataset, stratified_split, validation_split


def _labels(*counts: int) -> np.ndarray:
    return np.repeat(np.arange(len(counts)), counts)


def _check_partition(tr: np.ndarray, va: np.ndarray, n: int) -> None:
    assert len(np.intersect1d(tr, va)) == 0
    assert np.array_equal(np.sort(np.r_[tr, va]), np.arange(n))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_equal_folders_split_equally(seed: int) -> None:
    y = _labels(32, 32, 32)
    tr, va = stratified_split(y, 19, seed)
    _check_partition(tr, va, len(y))
    assert len(va) == 19
    assert np.ptp(np.bincount(y[va])) <= 1 and np.ptp(np.bincount(y[tr])) <= 1
    # The permutation it replaces, same seed: the imbalance the issue met (23/28/26 at seed 0).
    rtr, _ = validation_split(len(y), 19, seed)
    assert np.ptp(np.bincount(y[rtr])) >= np.ptp(np.bincount(y[tr]))


def test_unequal_folders_keep_their_shares() -> None:
    y = _labels(50, 20, 10)
    tr, va = stratified_split(y, 16, 0)
    _check_partition(tr, va, len(y))
    want = 16 * np.bincount(y) / len(y)  # 10, 4, 2
    assert np.all(np.abs(np.bincount(y[va]) - want) <= 1)


def test_the_split_is_fixed_by_its_seed() -> None:
    y = _labels(30, 31, 29)
    a, b = stratified_split(y, 18, 0), stratified_split(y, 18, 0)
    assert all(np.array_equal(u, v) for u, v in zip(a, b, strict=True))
    assert not np.array_equal(a[1], stratified_split(y, 18, 1)[1])


def test_a_class_too_small_to_stratify_falls_back_with_a_warning(caplog) -> None:
    y = _labels(20, 20, 1)
    with caplog.at_level(logging.WARNING):
        tr, va = stratified_split(y, 8, 0)
    assert "not stratified" in caplog.text
    want = validation_split(len(y), 8, 0)
    assert np.array_equal(tr, want[0]) and np.array_equal(va, want[1])


def _folder(root: Path, per_class: int) -> Path:
    rng = np.random.default_rng(0)
    for c, name in enumerate(("ant", "bee", "cow")):
        d = root / "train" / name
        d.mkdir(parents=True)
        for i in range(per_class):
            px = rng.integers(0, 256, (12, 12, 3), dtype=np.uint8) // 3 + 60 * c
            Image.fromarray(px.astype(np.uint8)).save(d / f"{i:02d}.png")
    return root


def test_folder_loading_uses_the_stratified_split_and_old_runs_keep_theirs(tmp_path: Path) -> None:
    root = _folder(tmp_path / "data", 20)  # 60 images: 12 held out
    cfg = TrainConfig(dataset="folder", data_dir=str(root), image_size=8, workers=0)
    splits = load_dataset(cfg)
    assert np.bincount(splits.val_y).tolist() == [4, 4, 4]
    assert np.bincount(splits.train_y).tolist() == [16, 16, 16]
    # A run saved before `val_split` existed loads with the random split it was trained with.
    saved = {k: v for k, v in cfg.to_dict().items() if k != "val_split"}
    old = TrainConfig.from_dict(saved)
    assert old.val_split == "random"
    _, va = validation_split(60, 12, cfg.split_seed)
    assert load_dataset(old).val_y.tolist() == np.repeat(np.arange(3), 20)[va].tolist()
    with pytest.raises(ValueError, match="val_split must be"):
        load_dataset(TrainConfig(dataset="folder", data_dir=str(root), val_split="balanced"))
