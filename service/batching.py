"""Dynamic batching: images from concurrent requests share one onnxruntime run.

Two knobs, as in BentoML and Triton: a batch runs as soon as it holds `max_batch_size` images,
or when its oldest image has waited `max_wait_s`. One batch per model runs at a time, in a
dedicated thread (onnxruntime releases the GIL while it computes, and parallelises inside the
run with its own threads); requests that arrive while it runs queue up, and when it finishes
the next batch starts at once if it is full or its oldest image has already waited
`max_wait_s`. Under load, when a run takes longer than `max_wait_s`, batches therefore run
back to back and fill by themselves; `max_wait_s` is the latency a request may pay to share a
run when the model is idle or fast.

Batches are formed on the event loop (appending to a deque, one timer while idle); the thread is
woken once per batch and answers with one `call_soon_threadsafe` per batch. An earlier version
formed batches in the thread with a blocking queue read per request: each read had to win the
GIL back from the busy event loop, which made the thread, not the model, the bottleneck.

While a batch runs, the next one is handed to the thread as soon as it is full, so that the
model starts it the moment the current run ends. Without that, each run waited for the event
loop to take its results and form the next batch: under overload, with thousands of
connections, one turn of the loop takes long, and the model idled (busy 77% -> 11% of the time
at 1,000 -> 2,048 connections, docs/serving.md). At most two batches are with the thread.

A request with more images than fit in the current batch is split across batches. The number
of images accepted and not yet answered is bounded; beyond it `submit` raises `OverloadedError`
(503 + Retry-After) instead of letting latency grow without limit. `admit` applies the same
bound before a request's body is read (requests admitted and not yet submitted count as one
image each), so that overload is refused before it costs reading and decoding.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable

import numpy as np

from service.errors import InferenceError, NotReadyError, OverloadedError

log = logging.getLogger(__name__)

# (images [B, C, H, W] float32) -> (logits [B, K], min_distance [B])
RunFn = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]
# Called from the batching thread after each run: (batch size, seconds).
BatchObserver = Callable[[int, float], None]
# Called on the event loop when a batch starts or ends: images accepted and not yet answered.
QueueObserver = Callable[[int], None]
# (job, first image, end) of the images of one job that go into a batch.
Part = tuple["_Job", int, int]


class _Job:
    """The images of one request and where their outputs go."""

    __slots__ = (
        "distance", "done", "enqueued", "error", "future", "images", "logits", "n", "taken",
    )  # fmt: skip

    def __init__(self, images: np.ndarray, future: asyncio.Future, enqueued: float) -> None:
        self.images = images
        self.n = len(images)
        self.future = future
        self.enqueued = enqueued  # loop.time() at submit
        self.taken = 0  # images put into a batch (event loop)
        self.done = 0  # images with outputs written (batching thread)
        self.logits: np.ndarray | None = None
        self.distance: np.ndarray | None = None
        self.error: BaseException | None = None


_STOP = object()


class Batcher:
    def __init__(
        self,
        name: str,
        run: RunFn,
        *,
        max_batch_size: int,
        max_wait_s: float,
        max_queue_images: int,
        on_batch: BatchObserver | None = None,
        on_queue: QueueObserver | None = None,
    ) -> None:
        self.name = name
        self._run_fn = run
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self.max_queue_images = max_queue_images
        self._on_batch = on_batch
        self._on_queue = on_queue
        # Event-loop state.
        self._waiting: deque[_Job] = deque()  # jobs with images not yet in a batch
        self._waiting_images = 0
        self._pending = 0  # images accepted and not yet answered
        self._admitted = 0  # requests admitted and not yet submitted (or given up)
        self._inflight = 0  # batches handed to the thread and not yet back (0, 1 or 2)
        self._timer: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = True
        # Thread.
        self._work: queue.SimpleQueue[list[Part] | object] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None

    @property
    def pending(self) -> int:
        """Images accepted and not yet answered."""
        return self._pending

    def admit(self) -> None:
        """Reserve room for a request about to be read (one image); `release` when submitted.

        Raises OverloadedError when the queue is full, before anything is read or decoded.
        """
        if self._pending + self._admitted >= self.max_queue_images:
            raise OverloadedError(
                f"model {self.name} has {self._pending} images queued and {self._admitted} "
                f"requests being read (limit {self.max_queue_images}); retry later"
            )
        self._admitted += 1

    def release(self) -> None:
        """The admitted request was submitted, or failed before it could be."""
        self._admitted -= 1

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._closed = False
        self._thread = threading.Thread(
            target=self._worker, name=f"batcher-{self.name}", daemon=True
        )
        self._thread.start()

    async def submit(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Queue `images` [n, C, H, W]; wait for (logits [n, K], min_distance [n])."""
        loop = self._loop
        if self._closed or loop is None:
            raise NotReadyError(f"model {self.name} is shutting down")
        n = len(images)
        if self._pending + n > self.max_queue_images:
            raise OverloadedError(
                f"model {self.name} has {self._pending} images queued (limit "
                f"{self.max_queue_images}); retry later"
            )
        job = _Job(images, loop.create_future(), loop.time())
        self._waiting.append(job)
        self._waiting_images += n
        self._pending += n
        self._maybe_dispatch()
        return await job.future

    def stop(self, timeout: float = 10.0) -> None:
        """Let the running batch finish, end the thread; queued jobs get NotReadyError."""
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._thread is not None:
            self._work.put(_STOP)
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.warning("batcher %s did not stop within %.1f s", self.name, timeout)
            self._thread = None
        error = NotReadyError(f"model {self.name} is shutting down")
        while self._waiting:
            job = self._waiting.popleft()
            if not job.future.done():
                job.future.set_exception(error)

    # -- event loop --------------------------------------------------------------------------

    def _maybe_dispatch(self) -> None:
        if not self._waiting or self._loop is None or self._inflight >= 2:
            return
        if self._inflight == 1:
            # A batch runs: queue the next one behind it only when it is full (a partial one
            # may still grow while the run lasts).
            if self._waiting_images >= self.max_batch_size:
                self._dispatch()
            return
        due = self._waiting[0].enqueued + self.max_wait_s
        if self._waiting_images >= self.max_batch_size or self._loop.time() >= due:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            self._dispatch()
        elif self._timer is None:
            self._timer = self._loop.call_at(due, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        if self._inflight == 0 and self._waiting:
            self._dispatch()

    def _dispatch(self) -> None:
        """Move up to max_batch_size waiting images into a batch and hand it to the thread."""
        parts: list[Part] = []
        size = 0
        while self._waiting and size < self.max_batch_size:
            job = self._waiting[0]
            take = min(job.n - job.taken, self.max_batch_size - size)
            parts.append((job, job.taken, job.taken + take))
            job.taken += take
            size += take
            if job.taken == job.n:
                self._waiting.popleft()
        self._waiting_images -= size
        self._inflight += 1
        self._work.put(parts)
        if self._on_queue is not None:
            self._on_queue(self._pending)

    def _batch_done(self, finished: list[_Job]) -> None:
        """A batch came back: wake its finished requests, start the next batch."""
        self._inflight -= 1
        for job in finished:
            self._pending -= job.n
            if job.future.done():  # the request was cancelled (client gone, shutdown timeout)
                continue
            if job.error is not None:
                job.future.set_exception(job.error)
            else:
                job.future.set_result((job.logits, job.distance))
        if not self._closed:
            self._maybe_dispatch()
            self._maybe_dispatch()  # with none in flight, a second full batch can follow
        if self._inflight == 0 and self._on_queue is not None:
            self._on_queue(self._pending)

    # -- batching thread ---------------------------------------------------------------------

    def _worker(self) -> None:
        while True:
            parts = self._work.get()
            if parts is _STOP:
                return
            assert isinstance(parts, list)
            finished = self._run_batch(parts)
            assert self._loop is not None
            # A closed loop (RuntimeError) means nobody is waiting any more.
            with contextlib.suppress(RuntimeError):
                self._loop.call_soon_threadsafe(self._batch_done, finished)

    def _run_batch(self, parts: list[Part]) -> list[_Job]:
        if len(parts) == 1:
            job, a, b = parts[0]
            x = job.images if (a, b) == (0, job.n) else job.images[a:b]
        else:
            x = np.concatenate([job.images[a:b] for job, a, b in parts])
        size = len(x)
        t0 = time.perf_counter()
        error: BaseException | None = None
        try:
            logits, distance = self._run_fn(x)
        except Exception:
            log.exception("model %s: onnxruntime run failed (batch of %d)", self.name, size)
            # The client gets no onnxruntime message (paths, graph internals): the log has it.
            error = InferenceError(f"model {self.name}: inference failed (see the server log)")
        if self._on_batch is not None:
            self._on_batch(size, time.perf_counter() - t0)
        finished: list[_Job] = []
        offset = 0
        for job, a, b in parts:
            m = b - a
            if error is not None:
                job.error = error
            elif a == 0 and m == job.n:  # the whole job in this batch: views, no copy
                job.logits = logits[offset : offset + m]
                job.distance = distance[offset : offset + m]
            else:
                if job.logits is None or job.distance is None:
                    job.logits = np.empty((job.n, logits.shape[1]), dtype=logits.dtype)
                    job.distance = np.empty(job.n, dtype=distance.dtype)
                job.logits[a:b] = logits[offset : offset + m]
                job.distance[a:b] = distance[offset : offset + m]
            offset += m
            job.done += m
            if job.done == job.n:
                finished.append(job)
        return finished
