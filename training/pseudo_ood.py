"""Pseudo-OOD images made from in-distribution validation images: no real OOD data needed.

Choices that ship in a default are made on the validation split and on these (never on the
OOD sets that are reported as held-out estimates). Each maker keeps something of the image and
breaks what makes it one of the classes:

- `mosaic`: four validation images, each shrunk to a quadrant of one image (DisMax's fractional
  regularization uses the same 2x2 mosaics as its "not one class" inputs);
- `neighbour_mosaic`: DisMax's training mosaic itself (`training.loss.mosaic`: each image keeps
  its top-left quadrant and takes the other three, cropped, from its neighbours) over the
  images in a random order: object parts in the wrong places;
- `patch_shuffle`: the image cut into a `PATCH_GRID` x `PATCH_GRID` grid, the patches permuted;
- `pixel_shuffle`: one image's pixels in a random order (same colors, no shape);
- `blur`: a Gaussian blur with sigma an eighth of the side (the shape's outline is gone);
- `noise`: heavy additive Gaussian noise (std 0.4 of the range) on the image.

Two collections, one per caller, each seeded its own way. They differ because each decided
shipped choices as it is: changing a set, its order or its random draws would change what was
chosen, so neither is folded into the other.

- `SELECTION_SETS` (`selection_sets`): the choosing rule (`training.selection`: the served
  score and the run), from one generator seeded with `seed`, drawn in a fixed order;
- `BASELINE_SETS` (`baseline_sets`): the frozen-backbone baseline of fine-tuning runs
  (`training.finetune`, `training.baseline`), each set from its own generator `[seed, i]`.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

PATCH_GRID = 4

Maker = Callable[[np.ndarray, np.random.Generator], np.ndarray]


def mosaic(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """`(N, C, H, W)` uint8 -> N mosaics of 4 random images, each one quadrant (2x subsampled)."""
    n, _, h, w = images.shape
    out = np.empty_like(images)
    hh, hw = h // 2, w // 2
    for i in range(n):
        picks = images[rng.choice(n, size=4, replace=n < 4)]
        small = picks[:, :, : 2 * hh : 2, : 2 * hw : 2]  # (4, C, H/2, W/2)
        out[i] = images[i]
        out[i, :, :hh, :hw], out[i, :, :hh, hw : 2 * hw] = small[0], small[1]
        out[i, :, hh : 2 * hh, :hw], out[i, :, hh : 2 * hh, hw : 2 * hw] = small[2], small[3]
    return out


def neighbour_mosaic(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """`training.loss.mosaic` (the one implementation of DisMax's mosaic) of the images in a
    random order, so that each mosaic's neighbours are random validation images."""
    import torch  # the only maker that needs it: the mosaic rule is written for training batches

    from training.loss import mosaic as dismax_mosaic

    order = rng.permutation(len(images))
    return dismax_mosaic(torch.from_numpy(images[order])).numpy()


def patch_shuffle(
    images: np.ndarray, rng: np.random.Generator, grid: int = PATCH_GRID
) -> np.ndarray:
    """Each image's `grid` x `grid` patches permuted (what lies past the last whole patch stays)."""
    n, _, h, w = images.shape
    ph, pw = h // grid, w // grid
    out = images.copy()
    for i in range(n):
        order = rng.permutation(grid * grid)
        patches = [
            images[i, :, r * ph : (r + 1) * ph, q * pw : (q + 1) * pw]
            for r in range(grid)
            for q in range(grid)
        ]
        for k, src in enumerate(order):
            r, q = divmod(k, grid)
            out[i, :, r * ph : (r + 1) * ph, q * pw : (q + 1) * pw] = patches[src]
    return out


def pixel_shuffle(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Each image's pixels (all channels together) permuted at random: one permutation per
    image, drawn in image order."""
    n, c, h, w = images.shape
    flat = images.reshape(n, c, h * w)
    out = np.empty_like(flat)
    for i in range(n):
        out[i] = flat[i][:, rng.permutation(h * w)]
    return out.reshape(images.shape)


def blur(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    from scipy.ndimage import gaussian_filter

    sigma = max(images.shape[2], images.shape[3]) / 8
    x = gaussian_filter(images.astype(np.float32), sigma=(0, 0, sigma, sigma), mode="reflect")
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def noise(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    x = images.astype(np.float32) + rng.normal(0.0, 0.4 * 255, size=images.shape)
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


SELECTION_SETS = ("mosaic", "patch_shuffle", "pixel_shuffle")


def selection_sets(val_x: np.ndarray, seed: int = 0) -> dict[str, np.ndarray]:
    """`SELECTION_SETS` of `val_x` (uint8, or any dtype: the sets keep it), one image per
    validation image. One generator for all three, drawn from in this order: the mosaic's
    random order, the pixel permutations, then the patch permutations."""
    rng = np.random.default_rng(seed)
    x = np.asarray(val_x)
    mosaics = neighbour_mosaic(x, rng)
    pixels = pixel_shuffle(x, rng)
    return {"mosaic": mosaics, "patch_shuffle": patch_shuffle(x, rng), "pixel_shuffle": pixels}


BASELINE_SETS = ("mosaic", "pixel-shuffle", "blur", "noise")
_BASELINE_MAKERS: dict[str, Maker] = {
    "mosaic": mosaic,
    "pixel-shuffle": pixel_shuffle,
    "blur": blur,
    "noise": noise,
}


def baseline_sets(images: np.ndarray, seed: int = 0) -> dict[str, np.ndarray]:
    """`BASELINE_SETS` of `images` (uint8 `(N, C, H, W)`), N images each; set `i` drawn from
    its own generator `[seed, i]`, so that one set's draws never shift another's."""
    if images.ndim != 4 or images.dtype != np.uint8 or len(images) == 0:
        raise ValueError(f"expected uint8 (N, C, H, W) images, got {images.dtype} {images.shape}")
    return {
        name: _BASELINE_MAKERS[name](images, np.random.default_rng([seed, i]))
        for i, name in enumerate(BASELINE_SETS)
    }
