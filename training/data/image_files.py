"""Training batches read from image files by DataLoader workers, at any resolution.

Every file goes through `isomax.contract.decode.load_file_uint8`, the service's own decoder, so
training and serving see a photo the same way (EXIF, alpha, color, JPEG draft scaling, resize).
Without augmentation a training image is exactly what the service would feed the model. With it,
the file is decoded a little larger (the same rule, at `TRAIN_DECODE_MARGIN` x the input size)
and then randomly cropped, resized and flipped on the uint8 tensor (torchvision's
RandomResizedCrop, the standard fine-tuning augmentation).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from isomax.contract.decode import ImageDecodeError, load_file_uint8
from isomax.contract.manifest import Preprocess
from training.data.folders import BAD_IMAGE_POLICIES, report_skipped

log = logging.getLogger(__name__)

TRAIN_DECODE_MARGIN = 1.15
RANDOM_CROP_SCALE = (0.25, 1.0)  # fraction of the decoded image a random crop covers


class ImageFiles(Dataset):
    """`(uint8 tensor (C, H, W), label)` per file; augmented when `augment` is set."""

    def __init__(
        self, paths: list[Path], labels: np.ndarray, spec: Preprocess, augment: bool = False
    ) -> None:
        self.paths, self.labels, self.spec, self.augment = paths, labels, spec, augment
        self.decode_spec = spec
        self.transform = None
        if augment:
            self.decode_spec = spec.model_copy(
                update={
                    "height": round(spec.height * TRAIN_DECODE_MARGIN),
                    "width": round(spec.width * TRAIN_DECODE_MARGIN),
                }
            )
            from training.models.torchvision_import import import_torchvision

            import_torchvision()
            from torchvision.transforms import v2

            self.transform = v2.Compose(
                [
                    v2.RandomResizedCrop(
                        (spec.height, spec.width), scale=RANDOM_CROP_SCALE, antialias=True
                    ),
                    v2.RandomHorizontalFlip(),
                ]
            )

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        x = torch.from_numpy(load_file_uint8(self.paths[i], self.decode_spec))
        if self.transform is not None:
            x = self.transform(x)
        return x, int(self.labels[i])


class _Check(Dataset):
    """Decodes each file as evaluation will: -> (ok, error, per-channel sum, sum of squares)."""

    def __init__(self, paths: list[Path], spec: Preprocess) -> None:
        self.paths, self.spec = paths, spec

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[bool, str, np.ndarray, np.ndarray]:
        try:
            x = load_file_uint8(self.paths[i], self.spec).astype(np.float64) / 255.0
        except ImageDecodeError as e:
            return False, f"{self.paths[i]}: {e}", np.zeros(0), np.zeros(0)
        except OSError as e:
            return False, f"{self.paths[i]}: cannot read: {e}", np.zeros(0), np.zeros(0)
        return True, "", x.sum(axis=(1, 2)), (x * x).sum(axis=(1, 2))


def check_files(
    paths: list[Path], spec: Preprocess, bad_images: str = "fail", workers: int = 0
) -> tuple[np.ndarray, list[float], list[float]]:
    """Decode every file once (in `workers` processes) before training starts.

    -> (indices of readable files, per-channel mean, std in [0, 1] units). An unreadable file
    stops here with its path (`bad_images="fail"`), or is skipped and counted (`"skip"`),
    instead of killing a worker in the middle of an epoch. The statistics normalize models
    trained from scratch; pretrained backbones use their weights' own.
    """
    if bad_images not in BAD_IMAGE_POLICIES:
        raise ValueError(f"bad_images must be fail or skip, got {bad_images!r}")
    kept: list[int] = []
    bad: list[str] = []
    total = np.zeros(spec.channels)
    total_sq = np.zeros(spec.channels)
    loader = DataLoader(
        _Check(paths, spec), batch_size=None, num_workers=workers, collate_fn=lambda b: b
    )
    for i, (ok, err, s, sq) in enumerate(loader):
        if not ok:
            if bad_images == "fail":
                raise ImageDecodeError(err)
            bad.append(err)
            continue
        kept.append(i)
        total += s
        total_sq += sq
    report_skipped(bad)
    if not kept:
        raise ImageDecodeError(f"none of the {len(paths)} training images could be read")
    n = len(kept) * spec.height * spec.width
    mean = total / n
    std = np.sqrt(np.maximum(total_sq / n - mean * mean, 1e-12))
    return np.asarray(kept, dtype=np.int64), mean.tolist(), std.tolist()


class GlobalBatches(Sampler[list[int]]):
    """Index lists of one epoch: a seeded permutation cut into global batches of
    `batch_size`, of which this process takes every `world`-th index from `rank` on.

    Every process draws the same permutation, so a run on N processes trains on exactly the
    global batches a single process would (DistributedSampler would deal the images out
    differently), which is what makes the two comparable.
    """

    def __init__(self, n: int, batch_size: int, rank: int = 0, world: int = 1) -> None:
        if batch_size % world:
            raise ValueError(f"batch_size {batch_size} does not split over {world} processes")
        self.n, self.batch_size, self.rank, self.world = n, batch_size, rank, world
        self.seed = 0

    def set_epoch_seed(self, seed: int) -> None:
        self.seed = seed

    def __len__(self) -> int:
        return self.n // self.batch_size

    def __iter__(self) -> Iterator[list[int]]:
        order = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed))
        for i in range(len(self)):
            batch = order[i * self.batch_size : (i + 1) * self.batch_size]
            yield batch[self.rank :: self.world].tolist()


class FileBatches:
    """Training batches from files: `(float images in [0, 1] on device, labels)`.

    `batch_size` is the global batch; under torchrun each of `world` processes gets its
    share (`GlobalBatches`). The permutation is reseeded every epoch from `gen`, whose state
    the checkpoint keeps, so a resumed run draws the same orders.
    """

    def __init__(
        self,
        dataset: ImageFiles,
        batch_size: int,
        seed: int,
        device: torch.device,
        workers: int = 2,
        channels_last: bool = False,
        shard: tuple[int, int] = (0, 1),
    ) -> None:
        self.dataset, self.device = dataset, device
        self.workers, self.channels_last = workers, channels_last
        self.batches = GlobalBatches(len(dataset), batch_size, *shard)
        self.gen = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        epoch_seed = int(torch.randint(0, 2**62, (1,), generator=self.gen))
        self.batches.set_epoch_seed(epoch_seed)
        loader = DataLoader(
            self.dataset,
            batch_sampler=self.batches,
            num_workers=self.workers,
            pin_memory=self.device.type == "cuda",
            generator=torch.Generator().manual_seed(epoch_seed + 1),  # workers' augmentation seeds
        )
        for x, y in loader:
            x = x.to(self.device, non_blocking=True).float().div_(255.0)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            yield x, y.to(self.device, non_blocking=True)
