"""The service turns a file into exactly the tensor training made of the same file.

Training reads users' image folders with `training.data.folders.load_image_folder`; the service
decodes uploads with `service.classify.decode_uploads` and its batcher turns the pixels into the
graph's input (`service.batching.batch_input`). Both must agree bit for bit, for every
format people upload, or a model would be served inputs it was never trained on.
"""

from __future__ import annotations

import asyncio
import io
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from isomax.contract.manifest import Preprocess
from service.batching import batch_input
from service.classify import Upload, decode_uploads
from service.settings import Settings
from training.data.folders import load_image_folder


def _images() -> dict[str, bytes]:
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (40, 30, 3), dtype=np.uint8), "RGB")
    out: dict[str, bytes] = {}

    def save(name: str, img: Image.Image, fmt: str, **kw) -> None:
        buf = io.BytesIO()
        img.save(buf, fmt, **kw)
        out[name] = buf.getvalue()

    save("gray.png", rgb.convert("L"), "PNG")
    save("gray16.png", Image.fromarray(rng.integers(0, 65536, (33, 21), dtype=np.uint16)), "PNG")
    save(
        "palette.png",
        rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=16),
        "PNG",
        transparency=3,
    )
    rgba = rgb.convert("RGBA")
    rgba.putalpha(Image.fromarray(rng.integers(0, 256, (40, 30), dtype=np.uint8)))
    save("rgba.png", rgba, "PNG")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    save("exif.jpg", rgb, "JPEG", quality=90, exif=exif.tobytes())
    save("photo.webp", rgb, "WEBP", quality=80)
    save("bitmap.bmp", rgb, "BMP")
    frames = [rgb.convert("P"), Image.fromarray(255 - np.asarray(rgb)).convert("P")]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:], duration=100)
    out["animated.gif"] = buf.getvalue()
    return out


SPECS = {
    "fmnist-like": Preprocess(
        height=28, width=28, channels=1, color_mode="L", resize_filter="bilinear"
    ),
    "rgb-center-crop": Preprocess(
        height=16,
        width=16,
        channels=3,
        color_mode="RGB",
        resize_filter="bicubic",
        resize_mode="center_crop",
        alpha_background=255,
    ),
}


@pytest.mark.parametrize("spec_name", list(SPECS))
def test_service_tensor_equals_training_tensor(tmp_path, spec_name):
    spec = SPECS[spec_name]
    files = _images()
    for name, data in files.items():
        (tmp_path / "cls" / name).parent.mkdir(exist_ok=True)
        (tmp_path / "cls" / name).write_bytes(data)
    train_x, _, _ = load_image_folder(tmp_path, spec)  # sorted by file name
    model = SimpleNamespace(manifest=SimpleNamespace(preprocess=spec))  # all decode_uploads reads
    uploads = [Upload(name, files[name]) for name in sorted(files)]
    pixels = asyncio.run(decode_uploads(uploads, model, Settings()))  # type: ignore[arg-type]
    served = batch_input([pixels])  # what the batcher hands the graph
    assert served.dtype == np.float32 and served.shape == train_x.shape
    assert np.array_equal(served, train_x.astype(np.float32) / np.float32(255.0))
    # The inputs really differ (in gray, the lossless BMP and gray.png hold the same pixels).
    assert len({a.tobytes() for a in train_x}) >= len(files) - 1
