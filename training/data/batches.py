"""A short in-memory batch loader with GPU/CPU-friendly batch-level augmentation.

For 28x28 data a per-sample Dataset/DataLoader spends more time in Python than in the model
on 2 cores; the whole set lives in one uint8 tensor and each batch is sliced, converted and
augmented at once (the cifar10-airbench idea).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch


def random_crop_flip(x: torch.Tensor, pad: int, flip: bool, gen: torch.Generator) -> torch.Tensor:
    """Per-image random crop after zero padding, and random horizontal flip: `(N, C, H, W)`."""
    n, c, h, w = x.shape
    if pad > 0:
        xp = torch.nn.functional.pad(x, (pad, pad, pad, pad))
        dy = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
        dx = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
        rows = (dy[:, None] + torch.arange(h))[:, None, :, None]  # (N, 1, H, 1)
        cols = (dx[:, None] + torch.arange(w))[:, None, None, :]  # (N, 1, 1, W)
        x = xp[
            torch.arange(n)[:, None, None, None], torch.arange(c)[None, :, None, None], rows, cols
        ]
    if flip:
        mask = torch.rand(n, generator=gen) < 0.5
        x = torch.where(mask[:, None, None, None], x.flip(3), x)
    return x


class BatchLoader:
    """Yields `(images float32 in [0, 1], labels int64)`; reshuffled every epoch, seeded."""

    def __init__(
        self,
        images: np.ndarray,
        labels: np.ndarray,
        batch_size: int,
        shuffle: bool = False,
        augment: bool = False,
        pad: int = 2,
        flip: bool = True,
        seed: int = 0,
        device: torch.device | str = "cpu",
        channels_last: bool = False,
        drop_last: bool = False,
        shard: tuple[int, int] = (0, 1),
    ) -> None:
        """`shard=(rank, world)`: this process takes every world-th image of each batch
        (data-parallel training; every process draws the same batches)."""
        if len(images) != len(labels):
            raise ValueError(f"wrong size: images {images.shape} vs labels {labels.shape}")
        self.images = torch.from_numpy(np.ascontiguousarray(images))  # uint8 (N, C, H, W)
        self.labels = torch.from_numpy(np.asarray(labels, dtype=np.int64))
        self.batch_size, self.shuffle, self.augment = batch_size, shuffle, augment
        self.pad, self.flip, self.drop_last = pad, flip, drop_last
        self.device = torch.device(device)
        self.channels_last = channels_last
        self.rank, self.world = shard
        self.gen = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        n = len(self.images)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n = len(self.images)
        order = torch.randperm(n, generator=self.gen) if self.shuffle else torch.arange(n)
        for i in range(len(self)):
            idx = order[i * self.batch_size : (i + 1) * self.batch_size][self.rank :: self.world]
            x = self.images[idx].to(self.device, non_blocking=True).float().div_(255.0)
            if self.augment:
                x = random_crop_flip(x, self.pad, self.flip, self.gen)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            yield x, self.labels[idx].to(self.device, non_blocking=True)
