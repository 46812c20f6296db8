"""Dynamic batching: images from concurrent requests share one onnxruntime run.

Two knobs, as in BentoML and Triton: a batch runs as soon as it holds `max_batch_size` images,
or when its oldest image has waited `max_wait_s`. One batch per model runs at a time, in a
dedicated thread (onnxruntime releases the GIL while it computes, and parallelises inside the
run with its own threads). Batches are work-conserving, as Triton's dynamic batcher is by
default: when a run ends, what arrived during it forms the next batch at once (up to
`max_batch_size`), since it has already waited a whole run; `max_wait_s` is the latency a
request may pay to share a run when the model was idle.

The batching thread forms the batches itself, from a deque the event loop appends requests to:
when a run ends, the thread hands its outputs to the event loop (one `call_soon_threadsafe` per
batch) and takes the next batch at once, in the same hold of the GIL. It sleeps on a lock only
when no batch is due, and the event loop wakes it only then (when a request arrives, or a
batch fills). Two earlier designs cost more than the model: forming batches on the event loop
made every batch wait for the busy loop to notice the previous run had ended and for the
thread to win the GIL back on its wake-up, so the model sat idle for a large share of the time
between runs (bench/results/serving-log.md, "Design notes": the batching thread); a blocking
queue read per request in the thread paid that wake-up once per request.

Requests may hand over their images as decoded uint8 pixels: the thread converts the whole
batch to the graph's float input at once (`to_float`, the same values as per image), which
takes one numpy call per batch off the event loop instead of one per request.

A request with more images than fit in the current batch is split across batches. The number
of images accepted and not yet answered is bounded; beyond it `submit` raises `OverloadedError`
(503 + Retry-After) instead of letting latency grow without limit. `admit` applies the same
bound before a request's body is read (requests admitted and not yet submitted count as one
image each), so that overload is refused before it costs reading and decoding.

The queue is also bounded in time (`max_queue_wait_s`), as Triton's queue policy bounds it
(`max_queue_delay_microseconds`, then reject): a count alone let successful requests wait
seconds at p99 under overload (issue 24; serving log, "Measurements behind code choices"):
  - `admit` refuses a request whose expected wait, the images ahead of it over the rate at which
    images are answered while a queue stands (`_Rate`), exceeds the bound, at once;
  - a request still waiting for its first batch when its bound, counted from its submission
    plus `max_wait_s` (the chosen wait to fill a batch), has passed is answered 503 by the batching thread instead of running late. From the
    submission, not the request's arrival: the time it took to read and decode its own images
    is work done, not queueing (a request of three 3000x3000 16-bit PNGs decodes for longer).
Both refusals are `OverloadedError` (503 + Retry-After): the client can try another replica at
once instead of waiting for an answer it may no longer want.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Callable

import numpy as np

from isomax.contract.decode import graph_input, to_float
from service.errors import InferenceError, NotReadyError, OverloadedError

log = logging.getLogger(__name__)

# (images [B, C, H, W] float32 in [0, 1]) -> (logits [B, K], min_distance [B]); [B, 2] with the
# served score for a bundle that serves another (verdict_columns below)
RunFn = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]
# Called from the batching thread after each run: (batch size, seconds).
BatchObserver = Callable[[int, float], None]
# Called from the batching thread with a run's outputs (logits, min_distance): drift metrics.
OutputObserver = Callable[[np.ndarray, np.ndarray], None]
# Called on the event loop when a batch starts or ends: images accepted and not yet answered.
QueueObserver = Callable[[int], None]
# (job, first image, end) of the images of one job that go into a batch.
Part = tuple["_Job", int, int]


def verdict_columns(distance: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(min_distance [n], served score [n]) of what the batcher returns: `[n]` min_distance
    (which is then the served score too) or `[n, 2]` for a bundle serving another score."""
    if distance.ndim == 1:
        return distance, distance
    return np.ascontiguousarray(distance[:, 0]), np.ascontiguousarray(distance[:, 1])


class _Job:
    """The images of one request and where their outputs go."""

    __slots__ = (
        "deadline", "distance", "done", "enqueued", "error", "future", "images", "logits", "n",
        "taken",
    )  # fmt: skip

    def __init__(
        self, images: np.ndarray, future: asyncio.Future, enqueued: float, deadline: float
    ) -> None:
        self.images = images
        self.n = len(images)
        self.future = future
        self.enqueued = enqueued  # time.monotonic() at submit (compared in the thread)
        self.deadline = deadline  # time.monotonic() by which its first batch must start
        self.taken = 0  # images put into a batch (batching thread)
        self.done = 0  # images with outputs written (batching thread)
        self.logits: np.ndarray | None = None
        self.distance: np.ndarray | None = None
        self.error: BaseException | None = None


def batch_input(arrays: list[np.ndarray]) -> np.ndarray:
    """The images of a batch as one float32 array: uint8 pixels converted once, after the
    concatenation when they all are (the usual case), else part by part."""
    if all(a.dtype == np.uint8 for a in arrays):
        x = arrays[0] if len(arrays) == 1 else np.concatenate(arrays)
        return to_float(x)
    floats = [graph_input(a) for a in arrays]
    return floats[0] if len(floats) == 1 else np.concatenate(floats)


class _Rate:
    """Images answered per second of time with a queue standing (event loop only).

    Busy time only: an idle model answers at the arrival rate, which says nothing about how fast
    it could answer. At low load this underestimates what batching could do (it sees the rate of
    small batches), which makes the expected wait err on the side of refusing a sudden burst.
    """

    WINDOW_S = 0.25  # busy seconds per estimate; each new estimate has half the weight

    def __init__(self) -> None:
        self.per_s = 0.0  # 0: not measured yet
        self._mark = time.monotonic()
        self._busy = 0.0
        self._images = 0

    def tick(self, queued: int, answered: int = 0) -> None:
        """Called before the queue changes: `queued` images stood since the last tick."""
        now = time.monotonic()
        if queued > 0:
            self._busy += now - self._mark
        self._mark = now
        self._images += answered
        if self._busy >= self.WINDOW_S:
            rate = self._images / self._busy
            self.per_s = rate if not self.per_s else (self.per_s + rate) / 2
            self._busy, self._images = 0.0, 0


class Batcher:
    """One model's queue of images and the thread that runs its batches (module doc).

    State shared by the two threads is written by one side only: the event loop appends jobs
    to `_waiting` and counts `_submitted`; the thread pops them and counts `_taken`. Under the
    GIL, single-writer updates and deque append/popleft need no lock.
    """

    def __init__(
        self,
        name: str,
        run: RunFn,
        *,
        max_batch_size: int,
        max_wait_s: float,
        max_queue_images: int,
        max_queue_wait_s: float = 0.0,
        on_batch: BatchObserver | None = None,
        on_queue: QueueObserver | None = None,
        on_outputs: OutputObserver | None = None,
    ) -> None:
        self.name = name
        self._run_fn = run
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self.max_queue_images = max_queue_images
        self.max_queue_wait_s = max_queue_wait_s  # 0: no bound in time
        self._on_batch = on_batch
        self._on_queue = on_queue
        self._on_outputs = on_outputs
        # Shared with the thread.
        self._waiting: deque[_Job] = deque()  # jobs with images not yet in a batch
        self._submitted = 0  # images ever submitted (event loop writes)
        self._taken = 0  # images ever put into a batch (thread writes)
        self._wants = 0  # the sleeping thread's wish: 0 none, else waiting images to wake for
        self._bell = threading.Lock()  # locked; the event loop releases it to wake the thread
        self._bell.acquire()
        self._closed = True
        # Event-loop state.
        self._pending = 0  # images accepted and not yet answered
        self._admitted = 0  # requests admitted and not yet submitted (or given up)
        self._rate = _Rate()
        self._expired: list[_Job] = []  # batching thread: jobs refused at their deadline
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    @property
    def pending(self) -> int:
        """Images accepted and not yet answered."""
        return self._pending

    def admit(self) -> None:
        """Reserve room for a request about to be read (one image); `release` when submitted.

        Raises OverloadedError when the queue is full, before anything is read or decoded.
        """
        ahead = self._pending + self._admitted
        if ahead >= self.max_queue_images:
            raise OverloadedError(
                f"model {self.name} has {self._pending} images queued and {self._admitted} "
                f"requests being read (limit {self.max_queue_images}); retry later"
            )
        rate = self._rate.per_s
        if self.max_queue_wait_s and rate and ahead / rate > self.max_queue_wait_s:
            raise OverloadedError(
                f"model {self.name}: {ahead} images ahead at {rate:.0f} per second, an expected "
                f"wait of {ahead / rate:.2f} s over the limit of {self.max_queue_wait_s:g} s; "
                "retry later"
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
        """Queue `images` [n, C, H, W], float32 graph input or uint8 pixels (converted with
        `to_float` in the thread); wait for (logits [n, K], min_distance [n])."""
        loop = self._loop
        if self._closed or loop is None:
            raise NotReadyError(f"model {self.name} is shutting down")
        n = len(images)
        if self._pending + n > self.max_queue_images:
            raise OverloadedError(
                f"model {self.name} has {self._pending} images queued (limit "
                f"{self.max_queue_images}); retry later"
            )
        now = time.monotonic()
        wait = self.max_queue_wait_s
        # Beyond the batching delay itself (max_wait_s: the wait to fill a batch is chosen).
        deadline = now + self.max_wait_s + wait if wait else float("inf")
        job = _Job(images, loop.create_future(), now, deadline)
        self._rate.tick(self._pending)
        self._waiting.append(job)
        self._submitted += n
        self._pending += n
        wants = self._wants
        if wants and self._submitted - self._taken >= wants:
            self._ring()
        return await job.future

    def stop(self, timeout: float = 10.0) -> None:
        """Let the running batch finish, end the thread; queued jobs get NotReadyError."""
        self._closed = True
        if self._thread is not None:
            self._ring()
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.warning("batcher %s did not stop within %.1f s", self.name, timeout)
            self._thread = None
        error = NotReadyError(f"model {self.name} is shutting down")
        self._taken = self._submitted
        while self._waiting:
            job = self._waiting.popleft()
            if not job.future.done():
                job.future.set_exception(error)

    def _ring(self) -> None:
        """Wake the thread (only the event loop releases the bell, so the check is not racy)."""
        if self._bell.locked():
            self._bell.release()

    # -- event loop --------------------------------------------------------------------------

    def _batch_done(self, finished: list[_Job]) -> None:
        """A batch came back: wake its finished requests."""
        self._rate.tick(self._pending, sum(j.n for j in finished if j.error is None))
        for job in finished:
            self._pending -= job.n
            if job.future.done():  # the request was cancelled (client gone, shutdown timeout)
                continue
            if job.error is not None:
                job.future.set_exception(job.error)
            else:
                job.future.set_result((job.logits, job.distance))
        if self._on_queue is not None:
            self._on_queue(self._pending)

    # -- batching thread ---------------------------------------------------------------------

    def _worker(self) -> None:
        loop = self._loop
        assert loop is not None
        busy = False
        while True:
            parts = self._next_batch(busy)
            busy = True
            if parts is None:
                return
            finished = self._run_batch(parts) if parts else []
            if self._expired:
                finished += self._expired
                self._expired = []
            if finished:
                # A closed loop (RuntimeError) means nobody is waiting any more.
                with contextlib.suppress(RuntimeError):
                    loop.call_soon_threadsafe(self._batch_done, finished)

    def _next_batch(self, busy: bool) -> list[Part] | None:
        """Wait until a batch is due and take it; None once the batcher is closed.

        Due: full, or anything waiting right after a run (`busy`: work-conserving), or its
        oldest image has waited max_wait_s."""
        while not self._closed:
            waiting = self._submitted - self._taken
            if waiting >= self.max_batch_size:
                return self._take()
            if waiting:
                if busy:
                    return self._take()
                delay = self._waiting[0].enqueued + self.max_wait_s - time.monotonic()
                if delay <= 0:
                    return self._take()
                wants, timeout = self.max_batch_size, delay
            else:
                wants, timeout = 1, -1.0
            busy = False
            # Announce the wish, then look again: a submit in between may not have rung.
            self._wants = wants
            if self._submitted - self._taken < wants and not self._closed:
                self._bell.acquire(timeout=timeout)
            self._wants = 0
        return None

    def _take(self) -> list[Part]:
        """Move up to max_batch_size waiting images into a batch (none if every waiting job
        was past its deadline: those go to `_expired`)."""
        parts: list[Part] = []
        size = 0
        waiting = self._waiting
        now = time.monotonic()
        while waiting and size < self.max_batch_size:
            job = waiting[0]
            if job.taken == 0 and job.deadline < now:
                waiting.popleft()
                job.error = OverloadedError(
                    f"model {self.name}: the request waited over {self.max_queue_wait_s:g} s "
                    "for its batch; retry later"
                )
                self._taken += job.n
                self._expired.append(job)
                continue
            take = min(job.n - job.taken, self.max_batch_size - size)
            parts.append((job, job.taken, job.taken + take))
            job.taken += take
            size += take
            if job.taken == job.n:
                waiting.popleft()
        self._taken += size
        return parts

    def _run_batch(self, parts: list[Part]) -> list[_Job]:
        x = batch_input([job.images[a:b] for job, a, b in parts])
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
        if self._on_outputs is not None and error is None:
            try:
                self._on_outputs(logits, distance)
            except Exception:  # a metrics bug must not fail the answers
                log.exception("model %s: output observer failed", self.name)
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
                    job.distance = np.empty((job.n, *distance.shape[1:]), dtype=distance.dtype)
                job.logits[a:b] = logits[offset : offset + m]
                job.distance[a:b] = distance[offset : offset + m]
            offset += m
            job.done += m
            if job.done == job.n:
                finished.append(job)
        return finished
