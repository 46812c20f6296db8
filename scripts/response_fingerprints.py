"""Fingerprints of the service's answers, to prove a refactor changed no byte of them.

POSTs a fixed set of images to the default bundle through the app in process (raw bodies with
three query variants each, and six-image multipart requests), and the same images to the v2
(KServe) infer endpoint as encoded files in JSON requests of six, and writes the sha256 of every
response body with its status. Run it before and after a change and compare the two files:

    .venv/bin/python scripts/response_fingerprints.py before.json    # on the old commit
    .venv/bin/python scripts/response_fingerprints.py after.json     # on the new one
    cmp before.json after.json

`--errors` adds bad requests (to /classify and v2: bad types, bodies, parameters, models), each
with its status, headers and body, so that a change in how errors are answered shows too.

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
from typing import Any

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


def _answer(r: Any) -> str:
    """status, headers (without Date) and the body's sha256 of one response."""
    headers = ";".join(f"{k}={v}" for k, v in r.headers.items() if k != "date")
    return f"{hashlib.sha256(r.content).hexdigest()} {r.status_code} {headers}"


def error_fingerprints(c: TestClient, png: bytes) -> dict[str, str]:
    """Bad requests of every kind the two endpoints refuse, answered in full."""
    ct = {"content-type": "image/png"}
    m = "/v2/models/fmnist-isomaxplus"
    bad_b64 = base64.b64encode(b"zz").decode()
    cases = {
        "empty": ("/classify", {"content": b"", "headers": ct}),
        "nobody": ("/classify", {}),
        "text": ("/classify", {"content": b"hi", "headers": {"content-type": "text/plain"}}),
        "badimg": ("/classify", {"content": b"notapng", "headers": ct}),
        "unknown": ("/classify?model=nope", {"content": png, "headers": ct}),
        "top_k0": ("/classify?top_k=0", {"content": png, "headers": ct}),
        "version": ("/classify?version=abc", {"content": png, "headers": ct}),
        "version9": ("/classify?version=9", {"content": png, "headers": ct}),
        "boundary": ("/classify", {"content": b"--x", "headers": {"content-type": "multipart/form-data"}}),
        "field": ("/classify", {"files": [("img", ("a.png", png, "image/png"))]}),
        "parttype": ("/classify", {"files": [("file", ("a.txt", b"hi", "text/plain"))]}),
        "partbad": ("/classify", {"files": [("file", ("a.png", b"x", "image/png"))]}),
        "form": ("/classify", {"data": {"x": "1"}}),
        "v2-json": (m + "/infer", {"content": b"{", "headers": {"content-type": "application/json"}}),
        "v2-gzip": (m + "/infer", {"content": b"{}", "headers": {"content-encoding": "gzip"}}),
        "v2-input": (m + "/infer", {"json": {"inputs": [{"name": "q", "datatype": "FP32", "shape": [1], "data": [0]}]}}),
        "v2-badimg": (m + "/infer", {"json": {"inputs": [{"name": "image_bytes", "datatype": "BYTES", "shape": [1], "data": [bad_b64]}]}}),
        "v2-unknown": ("/v2/models/nope/infer", {"json": {}}),
        "v2-version": (m + "/versions/x1/infer", {"json": {}}),
    }  # fmt: skip
    out = {f"error-{k}": _answer(c.post(url, **kw)) for k, (url, kw) in cases.items()}
    out["error-get-classify"] = _answer(c.get("/classify"))
    out["error-v2-meta"] = _answer(c.get("/v2/models/nope"))
    return out


def fingerprints(models_dir: Path, errors: bool = False) -> dict[str, str]:
    imgs = images()
    out: dict[str, str] = {}
    # Only settings this checkout knows, so the script also runs on older commits.
    # No bound in time on the queue: on a loaded machine a slow run would otherwise get a 503.
    wanted = {
        "models_dir": models_dir, "max_wait_ms": 0, "reload_interval_s": 0, "max_queue_wait_ms": 0,
    }  # fmt: skip
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
        if errors:
            out.update(error_fingerprints(c, imgs[0]))
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", type=Path, help="where to write the fingerprints (JSON)")
    p.add_argument("--models-dir", type=Path, default=REPO / "models")
    p.add_argument("--errors", action="store_true", help="add bad requests, headers included")
    a = p.parse_args()
    fp = fingerprints(a.models_dir, a.errors)
    a.out.write_text(json.dumps(fp, indent=0, sort_keys=True) + "\n")
    print(f"{len(fp)} responses fingerprinted -> {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
