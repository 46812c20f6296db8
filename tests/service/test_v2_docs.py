"""The tritonclient example of docs/deployment.md runs as written against a real server.

The Python block after the marker comment is executed with the server's address in place of
localhost:8000, in a directory holding the two image files it opens; what it prints must be
what POST /classify answers for the same files.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.service.bundles import sample_images
from tests.service.conftest import REPO, Server, run_server

pytest.importorskip("tritonclient.http")

pytestmark = pytest.mark.e2e

DOC = REPO / "docs" / "deployment.md"
MARKER = "<!-- tests/service/test_v2_docs.py runs this block against a real server -->"
MODEL = "fmnist-isomaxplus"


def example() -> str:
    text = DOC.read_text()
    assert MARKER in text, "the marked example is gone from docs/deployment.md"
    block = re.search(r"```python\n(.*?)```", text[text.index(MARKER) :], re.S)
    assert block is not None
    return block.group(1)


@pytest.fixture(scope="module")
def default_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    if not any((REPO / "models" / MODEL).glob("*/manifest.json")):
        pytest.fail(f"the default bundle models/{MODEL} is missing")
    log = tmp_path_factory.mktemp("docs") / "server.log"
    with run_server(REPO / "models", log, "--models", MODEL) as s:
        yield s


def test_the_tritonclient_example_prints_what_classify_answers(
    default_server: Server, tmp_path: Path
) -> None:
    (_, in_dist), (_, unlike) = sample_images(1, 1)
    files = {"boot.png": in_dist, "digit.png": unlike}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    code = example()
    assert "localhost:8000" in code
    code = code.replace("localhost:8000", default_server.url.removeprefix("http://"))

    out = io.StringIO()
    cwd = os.getcwd()
    try:
        os.chdir(tmp_path)
        with contextlib.redirect_stdout(out):
            exec(compile(code, str(DOC), "exec"), {"__name__": "__docs__"})
    finally:
        os.chdir(cwd)

    with default_server.client() as http:
        multipart = [("file", (n, d, "image/png")) for n, d in files.items()]
        r = http.post("/classify", params={"model": MODEL}, files=multipart)
        assert r.status_code == 200, r.text
    want = [
        f"{x['label']}: min_distance {x['min_distance']:.4f}, threshold {x['threshold']:.4f}, "
        f"{'OOD' if x['is_ood'] else 'in'}"
        for x in r.json()["results"]
    ]
    assert out.getvalue().splitlines() == want
