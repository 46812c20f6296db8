"""The batcher alone, with a fake model that records the batches it is given."""

from __future__ import annotations

import asyncio
import random
import threading
import time

import numpy as np
import pytest

from service.batching import Batcher
from service.errors import InferenceError, NotReadyError, OverloadedError


class FakeModel:
    """logits[i] = (image id, 2*id), distance[i] = id / 1000; records batch sizes."""

    def __init__(self, delay: float = 0.0) -> None:
        self.batches: list[list[int]] = []
        self.delay = delay
        self.gate = threading.Event()
        self.gate.set()
        self.fail = False

    def __call__(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        self.gate.wait(10)
        if self.fail:
            raise RuntimeError("boom")
        time.sleep(self.delay)
        ids = x[:, 0, 0, 0]
        self.batches.append([int(i) for i in ids])
        return np.stack([ids, 2 * ids], axis=1), ids / 1000.0


def images(*ids: int) -> np.ndarray:
    x = np.zeros((len(ids), 1, 2, 2), np.float32)
    x[:, 0, 0, 0] = ids
    return x


def make(model: FakeModel, **kw: float) -> Batcher:
    opts = dict(max_batch_size=4, max_wait_s=0.005, max_queue_images=100)
    opts.update(kw)
    return Batcher("fake", model, **opts)  # type: ignore[arg-type]


def run(coro_fn):  # type: ignore[no-untyped-def]
    return asyncio.run(coro_fn())


def test_concurrent_requests_share_batches_and_get_their_own_outputs() -> None:
    model = FakeModel()

    async def main() -> None:
        b = make(model, max_batch_size=8, max_wait_s=0.05)
        b.start(asyncio.get_running_loop())
        outs = await asyncio.gather(*[b.submit(images(i)) for i in range(8)])
        for i, (logits, dist) in enumerate(outs):
            assert logits.tolist() == [[i, 2 * i]] and dist.tolist() == [pytest.approx(i / 1000)]
        b.stop()

    run(main)
    assert model.batches == [list(range(8))]  # one full batch, in arrival order


def test_a_request_larger_than_a_batch_is_split_and_reassembled_in_order() -> None:
    model = FakeModel()

    async def main() -> None:
        b = make(model, max_batch_size=4)
        b.start(asyncio.get_running_loop())
        logits, dist = await b.submit(images(*range(10)))
        assert logits[:, 0].tolist() == list(range(10))
        assert dist.shape == (10,)
        b.stop()

    run(main)
    assert model.batches == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]


def test_a_lone_request_waits_at_most_max_wait() -> None:
    model = FakeModel()

    async def main() -> float:
        b = make(model, max_batch_size=32, max_wait_s=0.2)
        b.start(asyncio.get_running_loop())
        t0 = time.perf_counter()
        await b.submit(images(1))
        waited = time.perf_counter() - t0
        b.stop()
        return waited

    waited = run(main)
    assert 0.18 <= waited < 1.0


def test_a_full_batch_does_not_wait() -> None:
    model = FakeModel()

    async def main() -> float:
        b = make(model, max_batch_size=4, max_wait_s=5.0)
        b.start(asyncio.get_running_loop())
        t0 = time.perf_counter()
        await b.submit(images(1, 2, 3, 4))
        waited = time.perf_counter() - t0
        b.stop()
        return waited

    assert run(main) < 1.0


def test_requests_arriving_during_a_run_form_the_next_batch() -> None:
    model = FakeModel()
    model.gate.clear()

    async def main() -> None:
        b = make(model, max_batch_size=8, max_wait_s=0.0)
        b.start(asyncio.get_running_loop())
        first = asyncio.ensure_future(b.submit(images(0)))
        await asyncio.sleep(0.05)  # the first batch is stuck in the model
        rest = [asyncio.ensure_future(b.submit(images(i))) for i in range(1, 6)]
        await asyncio.sleep(0.05)
        model.gate.set()
        await asyncio.gather(first, *rest)
        b.stop()

    run(main)
    assert model.batches == [[0], [1, 2, 3, 4, 5]]


def test_a_full_queue_refuses_at_once() -> None:
    model = FakeModel()
    model.gate.clear()

    async def main() -> None:
        b = make(model, max_batch_size=4, max_queue_images=6, max_wait_s=0.0)
        b.start(asyncio.get_running_loop())
        held = asyncio.ensure_future(b.submit(images(1, 2, 3, 4, 5)))
        await asyncio.sleep(0.02)
        assert b.pending == 5
        with pytest.raises(OverloadedError, match="5 images queued"):
            await b.submit(images(6, 7))
        ok = asyncio.ensure_future(b.submit(images(6)))  # exactly at the limit: accepted
        await asyncio.sleep(0.02)
        model.gate.set()
        await asyncio.gather(held, ok)
        assert b.pending == 0
        b.stop()

    run(main)


def test_a_failing_run_fails_its_requests_only(caplog: pytest.LogCaptureFixture) -> None:
    """The request gets the service's words; the engine's message goes to the log only."""
    model = FakeModel()

    async def main() -> None:
        b = make(model, max_wait_s=0.0)
        b.start(asyncio.get_running_loop())
        model.fail = True
        with pytest.raises(InferenceError, match="inference failed") as e:
            await b.submit(images(1))
        assert "boom" not in str(e.value)
        model.fail = False
        logits, _ = await b.submit(images(2))
        assert logits[0, 0] == 2
        b.stop()

    run(main)
    assert "boom" in caplog.text


def test_stop_refuses_new_work() -> None:
    async def main() -> None:
        b = make(FakeModel())
        b.start(asyncio.get_running_loop())
        b.stop()
        with pytest.raises(NotReadyError):
            await b.submit(images(1))

    run(main)


def test_batch_observer_sees_every_run() -> None:
    seen: list[int] = []
    model = FakeModel()

    async def main() -> None:
        b = Batcher(
            "fake", model, max_batch_size=3, max_wait_s=0.0, max_queue_images=100,
            on_batch=lambda size, seconds: seen.append(size),
        )  # fmt: skip
        b.start(asyncio.get_running_loop())
        await b.submit(images(*range(7)))
        b.stop()

    run(main)
    assert seen == [3, 3, 1]


def test_a_full_batch_is_handed_over_while_the_previous_one_runs() -> None:
    """The next full batch waits in the thread, not on the event loop: with the loop blocked
    right after the first run is released, the second batch still runs."""
    model = FakeModel()
    model.gate.clear()

    async def main() -> None:
        b = make(model, max_batch_size=4, max_wait_s=0.0)
        b.start(asyncio.get_running_loop())
        first = asyncio.ensure_future(b.submit(images(0, 1, 2, 3)))
        await asyncio.sleep(0.05)  # the first batch is in the model, held by the gate
        second = asyncio.ensure_future(b.submit(images(4, 5, 6, 7)))
        await asyncio.sleep(0.05)
        model.gate.set()
        time.sleep(0.5)  # blocks the event loop: nothing can be dispatched from it now
        assert model.batches == [[0, 1, 2, 3], [4, 5, 6, 7]]
        await asyncio.gather(first, second)
        b.stop()

    run(main)


def test_admission_counts_queued_images_and_requests_being_read() -> None:
    model = FakeModel()
    model.gate.clear()

    async def main() -> None:
        b = make(model, max_batch_size=4, max_queue_images=3, max_wait_s=0.0)
        b.start(asyncio.get_running_loop())
        for _ in range(3):
            b.admit()
        with pytest.raises(OverloadedError, match="0 images queued and 3 requests being read"):
            b.admit()
        for _ in range(3):
            b.release()
        held = asyncio.ensure_future(b.submit(images(1, 2)))  # 2 images queued (gate closed)
        await asyncio.sleep(0.02)
        b.admit()  # 2 + 1 fits
        with pytest.raises(OverloadedError, match="2 images queued and 1 requests"):
            b.admit()
        b.release()
        model.gate.set()
        await held
        b.stop()

    run(main)


def test_uint8_pixels_become_the_float_input_and_mix_with_float_requests() -> None:
    """Pixels are converted per batch (pixels / 255, as `isomax.contract.decode.to_float`); a
    float request in the same batch is passed through unchanged."""
    seen: list[np.ndarray] = []

    def model(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        seen.append(x.copy())
        return x.reshape(len(x), -1)[:, :2], x[:, 0, 0, 0]

    pixels = np.array([[[[0, 51], [102, 255]]]], np.uint8)  # [1, 1, 2, 2]
    floats = np.full((1, 1, 2, 2), 0.5, np.float32)

    async def main() -> None:
        b = Batcher("fake", model, max_batch_size=4, max_wait_s=0.05, max_queue_images=100)
        b.start(asyncio.get_running_loop())
        (_, da), (_, db) = await asyncio.gather(b.submit(pixels), b.submit(floats))
        assert da.tolist() == [0.0] and db.tolist() == [0.5]
        b.stop()

    run(main)
    assert len(seen) == 1 and seen[0].dtype == np.float32
    assert np.array_equal(seen[0][0], pixels[0].astype(np.float32) / np.float32(255.0))
    assert np.array_equal(seen[0][1], floats[0])


@pytest.mark.parametrize("seed", range(6))
def test_no_request_is_lost_or_mixed_up_under_random_arrivals(seed: int) -> None:
    """The event loop and the batching thread share the queue without a lock (module doc):
    with random request sizes, arrival gaps, loop stalls and run times, every request gets its
    own outputs and nothing hangs (a lost wake-up would time out here)."""
    rng = random.Random(seed)
    max_batch = rng.choice([1, 2, 4, 8])

    def model(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if rng.random() < 0.3:
            time.sleep(rng.random() * 0.001)
        ids = x[:, 0, 0, 0]
        return np.stack([ids, 2 * ids], axis=1), ids / 1000.0

    async def main() -> None:
        b = Batcher(
            "fake", model, max_batch_size=max_batch, max_wait_s=rng.choice([0.0, 0.0002, 0.001]),
            max_queue_images=10**6,
        )  # fmt: skip
        b.start(asyncio.get_running_loop())

        async def client(k: int) -> None:
            for i in range(40):
                n = rng.randint(1, 5)
                x = np.zeros((n, 1, 1, 1), np.float32)
                x[:, 0, 0, 0] = np.arange(n) + 1000 * k + 10 * i
                if rng.random() < 0.5:
                    await asyncio.sleep(rng.random() * 0.0005)
                if rng.random() < 0.2:
                    time.sleep(0.0003)  # the event loop is busy elsewhere
                logits, _ = await b.submit(x)
                assert logits[:, 0].tolist() == x[:, 0, 0, 0].tolist()

        await asyncio.wait_for(asyncio.gather(*[client(k) for k in range(30)]), 60)
        assert b.pending == 0
        b.stop()

    run(main)
