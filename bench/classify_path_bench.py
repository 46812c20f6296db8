"""CPU per POST /classify on the event loop, in process: the endpoint's own work, nothing else.

    .venv/bin/python bench/classify_path_bench.py [--calls 1000]

Calls the direct /classify endpoint (`app.direct_posts`) of the real app over the default
bundle with one raw 28x28 PNG, the batcher answering zeros at once (no onnxruntime run, no
thread hand-off, no HTTP server): what is left is query, admission, body, decode, verdict,
metrics and JSON. Prints the three best of seven blocks of `--calls` calls, in us of process
CPU per call. To compare two revisions on a shared machine, run it in a worktree of each at the
same time (`A & B & wait`, a few times), so that both see the same load.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from service.app import create_app  # noqa: E402
from service.batching import Batcher  # noqa: E402
from service.settings import Settings  # noqa: E402


async def _zeros(self: Batcher, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return np.zeros((len(x), 10), np.float32), np.full(len(x), 0.9, np.float32)


def _png() -> bytes:
    buf = io.BytesIO()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (28, 28), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


async def measure(calls: int) -> list[float]:
    Batcher.submit = _zeros  # type: ignore[method-assign]
    app = create_app(Settings(models_dir=REPO / "models", reload_interval_s=0))
    data = _png()
    headers = [(b"content-type", b"image/png"), (b"content-length", str(len(data)).encode())]
    scope = {"type": "http", "method": "POST", "path": "/classify", "root_path": "",
             "query_string": b"", "headers": headers}  # fmt: skip
    message = {"type": "http.request", "body": data, "more_body": False}
    sent: list[Any] = []

    async def receive() -> dict[str, Any]:
        return message

    async def send(m: Any) -> None:
        sent.append(m)

    blocks = []
    async with app.router.lifespan_context(app):
        state = getattr(app, "service", None) or app.state  # app.state before the AppState
        state.registry.wait_loaded(60)
        endpoint = app.direct_posts["/classify"]
        for _ in range(300):
            await endpoint(scope, receive, send)
        for _ in range(7):
            sent.clear()
            t = time.process_time()
            for _ in range(calls):
                await endpoint(scope, receive, send)
            blocks.append((time.process_time() - t) / calls)
            assert sent[0]["status"] == 200, sent[:2]
    return sorted(blocks)[:3]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--calls", type=int, default=1000)
    args = ap.parse_args()
    best = asyncio.run(measure(args.calls))
    print(" ".join(f"{1e6 * b:.1f}" for b in best))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
