"""Admission by expected wait (ISOMAX_MAX_QUEUE_WAIT_MS, service/batching.py) on a real batcher
over a real onnxruntime session of a test bundle.

The model's run is held at least RUN_S (and, while `gate` is clear, until it opens), so the rate
the batcher measures is at most BATCH / RUN_S images per second whatever the machine: an
expected wait computed from it is a lower bound the test can rely on without timing anything.
"""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from service.batching import Batcher
from service.errors import RETRY_AFTER, OverloadedError, error_status
from tests.service.bundles import write_bundle

BATCH = 8
RUN_S = 0.01  # at least this per run: the measured rate is at most 800 images/s
BOUND_S = 1.0  # max_queue_wait_s
AHEAD = 2000  # images queued behind a held run: an expected wait of at least 2.5 s
LIMIT = 10_000  # max_queue_images, far above AHEAD: a refusal is by time, not count


class HeldModel:
    """The bundle's onnxruntime session; each run takes at least RUN_S, and waits for `gate`."""

    def __init__(self, bundle: Path) -> None:
        self.session = ort.InferenceSession(
            str(bundle / "model.onnx"), providers=["CPUExecutionProvider"]
        )
        self.gate = threading.Event()
        self.gate.set()

    def __call__(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        t0 = time.monotonic()
        self.gate.wait(30)
        logits, distance = self.session.run(["logits", "min_distance"], {"image": x})
        time.sleep(max(0.0, RUN_S - (time.monotonic() - t0)))
        return logits, distance


def pixels(n: int) -> np.ndarray:
    return np.zeros((n, 1, 28, 28), np.uint8)


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> HeldModel:
    return HeldModel(write_bundle(tmp_path_factory.mktemp("models"), "tiny", "1"))


def test_a_request_over_the_expected_wait_is_refused_at_once_one_within_is_admitted(
    model: HeldModel,
) -> None:
    async def main() -> None:
        b = Batcher(
            "tiny", model, max_batch_size=BATCH, max_wait_s=0.0, max_queue_images=LIMIT,
            max_queue_wait_s=BOUND_S,
        )  # fmt: skip
        b.start(asyncio.get_running_loop())
        try:
            # The rate is measured over 0.25 s of busy time: 40 requests one after another.
            for _ in range(40):
                logits, _ = await b.submit(pixels(BATCH))
                assert logits.shape == (BATCH, 10)
            b.admit()  # nothing queued: admitted
            b.release()

            model.gate.clear()  # the next run holds the model; what follows stands in the queue
            first = asyncio.ensure_future(b.submit(pixels(1)))
            await asyncio.sleep(0)  # it is submitted (and taken by the held run)
            b.admit()  # 1 image ahead: well within the bound
            b.release()

            queued = [asyncio.ensure_future(b.submit(pixels(BATCH))) for _ in range(AHEAD // 8)]
            await asyncio.sleep(0)
            assert b.pending == 1 + AHEAD < LIMIT
            with pytest.raises(OverloadedError) as refused:
                b.admit()  # synchronous: refused before any of its body would be read
            assert "expected wait" in refused.value.detail, refused.value.detail
            assert b.pending == 1 + AHEAD  # nothing was taken for the refused request
        finally:
            model.gate.set()
        # The held requests end with an answer, or a 503 at their own deadline; none is lost.
        for r in await asyncio.gather(first, *queued, return_exceptions=True):
            assert isinstance(r, tuple | OverloadedError), r
        assert b.pending == 0
        b.admit()  # the queue is gone: admitted again
        b.release()
        b.stop()
        # What the client reads: 503 with Retry-After (the one status table, service/errors.py).
        assert error_status(refused.value) == 503 and isinstance(refused.value, RETRY_AFTER)

    asyncio.run(main())
