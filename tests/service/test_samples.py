"""The quick start works in any order: the sample images ship in `samples/`, the README's
answer is what a real server gives for them, and they are what `isomax data --samples` writes.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tests.service.conftest import REPO, run_server

SAMPLES = REPO / "samples"
README = (REPO / "README.md").read_text()


def _quick_start() -> tuple[list[str], dict]:
    """The README's multipart curl (its file names and query) and the JSON printed under it."""
    section = README[README.index("## Quick start") : README.index("## The default bundle")]
    curl = next(line for line in section.splitlines() if line.startswith("curl -s -F"))
    answer = re.search(r"```json\n(.*?)```", section, re.S)
    assert answer, "the quick start lost its JSON answer"
    return re.findall(r"file=@(\S+)", curl), json.loads(answer.group(1))


def _rounded(value: object) -> object:
    """The answer as the README prints it: floats to 4 decimals, compared to within float32's
    precision (a score near 443 has 7 significant digits there, and onnxruntime's float32 kernels
    differ in the last one between CPUs)."""
    if isinstance(value, float):
        return pytest.approx(round(value, 4), abs=2e-4)  # one step of the 4th decimal
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_rounded(v) for v in value]
    return value


@pytest.mark.e2e
@pytest.mark.slow
def test_the_readme_answer_is_what_the_server_gives_for_the_shipped_samples(
    tmp_path: Path,
) -> None:
    files, want = _quick_start()
    assert [Path(f).parent.name for f in files] == ["samples"] * 3
    with run_server(REPO / "models", tmp_path / "log") as srv, srv.client() as c:
        parts = [("file", (Path(f).name, (REPO / f).read_bytes(), "image/png")) for f in files]
        got = c.post("/classify", params={"top_k": 1}, files=parts)
        first = c.post(
            "/classify",
            content=(SAMPLES / "fmnist-000-ankle-boot.png").read_bytes(),
            headers={"content-type": "image/png"},
        )
    assert got.status_code == 200, got.text
    assert _rounded(got.json()) == want
    assert first.status_code == 200 and first.json()["results"][0]["label"] == "Ankle boot"


def test_shipped_samples_are_what_isomax_data_writes(tmp_path: Path) -> None:
    fmnist = pytest.importorskip("training.data.fmnist")
    ood = pytest.importorskip("training.data.ood")
    from training.cli import _write_samples

    try:
        x, y = fmnist.load_split("test", None)
        digits = ood.load_mnist5k()
    except (FileNotFoundError, ModuleNotFoundError) as e:
        pytest.skip(f"data for the samples are missing: {e}")
    _write_samples(tmp_path, x, y, digits, 3)
    made = sorted(p.name for p in tmp_path.iterdir())
    assert made == sorted(p.name for p in SAMPLES.glob("*.png"))
    for name in made:
        assert (tmp_path / name).read_bytes() == (SAMPLES / name).read_bytes(), name
