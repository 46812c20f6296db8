"""Fingerprints of the service's answers, to prove a refactor changed no byte of them.

POSTs a fixed set of images to the default bundle through the app in process (raw bodies with
three query variants each, and six-image multipart requests), and the same images to the v2
(KServe) infer endpoint as encoded files in JSON requests of six, and writes the sha256 of every
response body with its status. Run it before and after a change and compare the two files:

    .venv/bin/python scripts/response_fingerprints.py before.json    # on the old commit
    .venv/bin/python scripts/response_fingerprints.py after.json     # on the new one
    cmp before.json after.json

Images: the first 200 Fashion-MNIST test images, 100 MNIST digits, 20 uniform-noise images and
10 RGB 64x48 noise images (resized by the service), all as PNG. Needs the [train] extra (the
data loaders).
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import io
import json
import sys
from pathlib import Path

import numpy as np
from fastapi.testclient import TestClient
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from service.app import create_app  # noqa: E402
from service.settings import Settings  # noqa: E402
from training.data.fmnist import load_split  # noqa: E402
from training.data.ood import load_mnist5k  # noqa: E402


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    return buf.getvalue()


def images() -> list[bytes]:
    fashion, _ = load_split("test")  # (N, 1, 28, 28) uint8
    digits = load_mnist5k()
    rng = np.random.default_rng(0)
    out = [_png(x[0]) for x in fashion[:200]] + [_png(x[0]) for x in digits[:100]]
    out += [_png(rng.integers(0, 256, (28, 28), dtype=np.uint8)) for _ in range(20)]
    out += [_png(rng.integers(0, 256, (64, 48, 3), dtype=np.uint8)) for _ in range(10)]
    return out


def fingerprints(models_dir: Path) -> dict[str, str]:
    imgs = images()
    out: dict[str, str] = {}
    # Only settings this checkout knows, so the script also runs on older commits.
    wanted = {"models_dir": models_dir, "max_wait_ms": 0, "reload_interval_s": 0}
    app = create_app(
        Settings.model_validate({k: v for k, v in wanted.items() if k in Settings.model_fields})
    )
    with TestClient(app) as c:
        # The app's state (`app.service`); `app.state` on commits before the typed AppState.
        state = getattr(app, "service", None) or app.state
        state.registry.wait_loaded(60)
        for i, im in enumerate(imgs):
            for q in ("", "?top_k=10", "?top_k=1&model=fmnist-isomaxplus"):
                r = c.post("/classify" + q, content=im, headers={"content-type": "image/png"})
                out[f"raw{i}{q}"] = f"{hashlib.sha256(r.content).hexdigest()} {r.status_code}"
        for j in range(0, 60, 6):
            files = [("file", (f"f{k}.png", imgs[k], "image/png")) for k in range(j, j + 6)]
            r = c.post("/classify?top_k=5", files=files)
            out[f"multi{j}"] = f"{hashlib.sha256(r.content).hexdigest()} {r.status_code}"
        for j in range(0, len(imgs), 6):
            data = [base64.b64encode(im).decode() for im in imgs[j : j + 6]]
            body = {"inputs": [{"name": "image_bytes", "datatype": "BYTES",
                                "shape": [len(data)], "data": data}]}  # fmt: skip
            r = c.post("/v2/models/fmnist-isomaxplus/infer", json=body)
            out[f"v2-{j}"] = f"{hashlib.sha256(r.content).hexdigest()} {r.status_code}"
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", type=Path, help="where to write the fingerprints (JSON)")
    p.add_argument("--models-dir", type=Path, default=REPO / "models")
    a = p.parse_args()
    fp = fingerprints(a.models_dir)
    a.out.write_text(json.dumps(fp, indent=0, sort_keys=True) + "\n")
    print(f"{len(fp)} responses fingerprinted -> {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
