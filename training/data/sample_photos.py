"""A small photo folder made from scikit-image's bundled photographs, to try and test the
bring-your-own-images path without downloading anything.

Each class is one photograph (a cat, a cup of coffee, a rocket, an astronaut, a motorcycle);
its images are random crops of it, at random aspect ratios and scales, some mirrored, saved as
JPEGs of varied sizes: the same object seen in many framings, like a small product data set.
The out-of-distribution folder holds crops of photographs of other kinds (textures, a
telescope image, microscopy, the moon) that no class resembles.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

ID_PHOTOS = {
    "astronaut": "astronaut",
    "cat": "chelsea",
    "coffee": "coffee",
    "motorcycle": "stereo_motorcycle",
    "rocket": "rocket",
}
OOD_PHOTOS = ("brick", "grass", "gravel", "hubble_deep_field", "immunohistochemistry", "moon")


def _photo(name: str) -> Image.Image:
    import skimage.data

    arr = getattr(skimage.data, name)()
    arr = arr[0] if isinstance(arr, tuple) else arr  # stereo pairs: the left image
    return Image.fromarray(arr).convert("RGB")


def _crops(photo: Image.Image, n: int, rng: np.random.Generator) -> list[Image.Image]:
    """`n` random crops covering 25-90% of the photo, aspect 3:4-4:3, 48-160 px, half mirrored."""
    w, h = photo.size
    out = []
    for _ in range(n):
        area = rng.uniform(0.25, 0.9) * w * h
        aspect = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
        cw = int(min(w, round(np.sqrt(area * aspect))))
        ch = int(min(h, round(np.sqrt(area / aspect))))
        x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        crop = photo.crop((x, y, x + cw, y + ch))
        if rng.random() < 0.5:
            crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        side = int(rng.integers(48, 161))
        scale = side / max(cw, ch)
        out.append(crop.resize((max(8, round(cw * scale)), max(8, round(ch * scale)))))
    return out


def make_photo_folder(
    root: Path, train: int = 40, val: int = 10, test: int = 10, ood: int = 10, seed: int = 0
) -> Path:
    """Write `root/{train,val,test}/<class>/*.jpg` and `root/ood/<kind>/*.jpg`; -> root.

    `train`/`val`/`test` are images per class, `ood` images per out-of-distribution photo.
    """
    rng = np.random.default_rng(seed)
    root = Path(root)
    for cls, name in ID_PHOTOS.items():
        photo = _photo(name)
        for split, n in (("train", train), ("val", val), ("test", test)):
            d = root / split / cls
            d.mkdir(parents=True, exist_ok=True)
            for i, img in enumerate(_crops(photo, n, rng)):
                img.save(d / f"{cls}-{i:03d}.jpg", quality=90)
    for name in OOD_PHOTOS:
        d = root / "ood" / name
        d.mkdir(parents=True, exist_ok=True)
        for i, img in enumerate(_crops(_photo(name), ood, rng)):
            img.save(d / f"{name}-{i:03d}.jpg", quality=90)
    return root
