"""A bundle with a temperature: probability = softmax(logits / T); nothing else moves."""

from __future__ import annotations

import math
from pathlib import Path

from isomax.contract.manifest import Manifest
from tests.service.bundles import sample_images, write_bundle
from tests.service.cases import TEST_LIMITS
from tests.service.conftest import app_client, wait_ready
from tests.service.expected import assert_results_equal, expected_results

IMAGES = sample_images(6, 2)
T = 0.25  # < 1 sharpens: the tiny model's logits are -10 * distance


def files() -> list[tuple[str, tuple[str, bytes, str]]]:
    return [("file", (n, d, "image/png")) for n, d in IMAGES]


def test_probabilities_follow_the_manifest_temperature_and_nothing_else_moves(
    tmp_path: Path,
) -> None:
    plain = write_bundle(tmp_path / "a", "tiny", "1")
    tempered = write_bundle(tmp_path / "b", "tiny", "1")
    m = Manifest.read(tempered)
    m.model_copy(update={"calibration": m.calibration.model_copy(update={"temperature": T})}).write(
        tempered
    )
    answers = []
    for root in (tmp_path / "a", tmp_path / "b"):
        with app_client(models_dir=root, max_wait_ms=1, **TEST_LIMITS) as c:
            wait_ready(c)
            answers.append(c.post("/classify", files=files(), params={"top_k": 4}).json())
            (info,) = c.get("/models").json()["models"]
            assert info["calibration"]["temperature"] == (None if root.name == "a" else T)
    before, after = (a["results"] for a in answers)
    assert_results_equal(after, expected_results(tempered, IMAGES, top_k=4))  # softmax(z / T)
    assert_results_equal(before, expected_results(plain, IMAGES, top_k=4))  # softmax(z)
    for b, a in zip(before, after, strict=True):
        for key in ("class_index", "label", "min_distance", "threshold", "is_ood"):
            assert a[key] == b[key]
        assert [t["label"] for t in a["top_k"]] == [t["label"] for t in b["top_k"]]
        # T < 1 sharpens: p_T = p^(1/T) / sum(p_k^(1/T)) for the same softmax p.
        assert a["probability"] > b["probability"]
        ratio = b["top_k"][0]["probability"] / b["top_k"][1]["probability"]
        tempered_ratio = a["top_k"][0]["probability"] / a["top_k"][1]["probability"]
        assert math.isclose(tempered_ratio, ratio ** (1 / T), rel_tol=1e-3)
