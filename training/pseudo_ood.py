"""Pseudo-OOD images made from in-distribution validation images: no real OOD data needed.

Choices that ship in a default are made on the validation split and on these (never on the
OOD sets that are reported as held-out estimates). Each keeps something of the image and breaks
what makes it one of the classes:

- `mosaic`: four validation images, each shrunk to a quadrant of one image (DisMax's fractional
  regularization uses the same 2x2 mosaics as its "not one class" inputs);
- `pixel-shuffle`: one image's pixels in a random order (same colors, no shape);
- `blur`: a Gaussian blur with sigma an eighth of the side (the shape's outline is gone);
- `noise`: heavy additive Gaussian noise (std 0.4 of the range) on the image.
"""

from __future__ import annotations

import numpy as np

PSEUDO_OOD = ("mosaic", "pixel-shuffle", "blur", "noise")


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


def pixel_shuffle(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Each image's pixels (all channels together) permuted at random."""
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


_MAKERS = {"mosaic": mosaic, "pixel-shuffle": pixel_shuffle, "blur": blur, "noise": noise}


def pseudo_ood_sets(images: np.ndarray, seed: int = 0) -> dict[str, np.ndarray]:
    """Every pseudo-OOD set of `images` (uint8 `(N, C, H, W)`), N images each, seeded."""
    if images.ndim != 4 or images.dtype != np.uint8 or len(images) == 0:
        raise ValueError(f"expected uint8 (N, C, H, W) images, got {images.dtype} {images.shape}")
    return {
        name: _MAKERS[name](images, np.random.default_rng([seed, i]))
        for i, name in enumerate(PSEUDO_OOD)
    }
