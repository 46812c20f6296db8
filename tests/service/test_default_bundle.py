"""The committed default bundle, served for real: Fashion-MNIST items are classified, MNIST digits
look farther from every prototype. Skipped until models/fmnist-isomaxplus exists."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.service.conftest import REPO, run_server

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

MODELS = REPO / "models"
NAME = "fmnist-isomaxplus"
N = 60


def _png(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img.reshape(28, 28)).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    if not (MODELS / NAME).is_dir():
        pytest.skip(f"no default bundle at models/{NAME} yet")
    fmnist = pytest.importorskip("training.data.fmnist")
    ood = pytest.importorskip("training.data.ood")
    try:
        x, y = fmnist.load_split("test", None)
        digits = ood.load_mnist5k()
    except (FileNotFoundError, ImportError, ModuleNotFoundError) as e:
        pytest.skip(f"data for the default-bundle test is missing: {e}")
    rng = np.random.default_rng(0)
    i = rng.choice(len(x), N, replace=False)
    j = rng.choice(len(digits), N, replace=False)
    return x[i], y[i], digits[j]


def test_default_bundle_classifies_fashion_and_flags_digits(
    data: tuple[np.ndarray, np.ndarray, np.ndarray], tmp_path: Path
) -> None:
    items, labels, digits = data
    with run_server(MODELS, tmp_path / "log", "--models", NAME) as srv, srv.client() as c:

        def classify(images: np.ndarray) -> list[dict]:
            files = [("file", (f"{k}.png", _png(im), "image/png")) for k, im in enumerate(images)]
            r = c.post("/classify", files=files, params={"model": NAME})
            assert r.status_code == 200, r.text
            return r.json()["results"]

        fashion = classify(items)
        mnist = classify(digits)
        (info,) = c.get("/models").json()["models"]

    accuracy = np.mean([r["class_index"] == int(t) for r, t in zip(fashion, labels, strict=True)])
    assert accuracy >= 0.8, accuracy
    d_in = np.median([r["min_distance"] for r in fashion])
    d_out = np.median([r["min_distance"] for r in mnist])
    assert d_out > d_in, (d_in, d_out)
    ood_rate_in = np.mean([r["is_ood"] for r in fashion])
    ood_rate_out = np.mean([r["is_ood"] for r in mnist])
    assert ood_rate_out > ood_rate_in
    assert info["name"] == NAME and info["provider"] == "CPUExecutionProvider"
