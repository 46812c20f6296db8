"""The local engine: decode in a process pool, infer in large batches on one session, overlap.

The main process keeps `inflight` chunks of files queued in the pool (a chunk is one task, so
that a 28x28 PNG does not pay a process hand-off of its own), takes their results in input
order, and runs onnxruntime on every `batch_size` decoded images. onnxruntime releases the GIL
while it computes, so the pool decodes the next batch during the run. Memory is bounded by
the queued chunks, one batch and one part of rows, whatever the number of files.

A stop request (Ctrl-C or SIGTERM, through `stop`) is honoured between chunks: the rows scored
so far are written as a last part, the queued chunks are dropped, and the output is complete
up to there (docs/batch-scoring.md, "Resuming").
"""

from __future__ import annotations

import logging
import multiprocessing
import signal
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from isomax.batch.decoding import Limits, Meta, decode_paths
from isomax.batch.output import PartWriter, to_table
from isomax.batch.scoring import Scorer
from isomax.contract.manifest import Preprocess

log = logging.getLogger(__name__)

Decoded = tuple[list[Meta], np.ndarray | None]  # one chunk: its metas, its decoded images


@dataclass
class Batches:
    """Decoded chunks -> batches scored in one run each -> parts of `part_size` rows."""

    scorer: Scorer | None  # None: tables come scored (the Ray engine)
    writer: PartWriter
    batch_size: int
    part_size: int
    on_rows: Callable[[pa.Table], None] = lambda table: None
    metas: list[Meta] = field(default_factory=list)
    pixels: list[np.ndarray] = field(default_factory=list)
    decoded: int = 0
    held: list[pa.Table] = field(default_factory=list)  # scored, not written yet
    rows: int = 0  # rows held
    # Concurrent onnxruntime runs on the one session (session.run is thread-safe and releases
    # the GIL): each run on one thread, the cores shared by whole batches rather than by one
    # batch's operators, so that no run waits for its slowest thread on a busy machine.
    runs: int = 1
    runners: ThreadPoolExecutor | None = None
    running: deque[Future[pa.Table]] = field(default_factory=deque)

    def add(self, metas: list[Meta], pixels: np.ndarray | None) -> None:
        self.metas.extend(metas)
        if pixels is not None:
            self.pixels.append(pixels)
            self.decoded += len(pixels)
        # Error rows cost nothing to score; bound them too, for a folder of non-images.
        if self.decoded >= self.batch_size or len(self.metas) >= 4 * self.batch_size:
            self.score()

    def score(self) -> None:
        """Score the images held in one onnxruntime run: on a runner thread when there are
        runners (its table is taken in order, once `runs` batches are in flight), else here."""
        if not self.metas:
            return
        assert self.scorer is not None
        pixels = np.concatenate(self.pixels) if self.pixels else None
        metas, scorer = self.metas, self.scorer
        self.metas, self.pixels, self.decoded = [], [], 0
        if self.runners is None:
            self.add_table(to_table(scorer.rows(metas, pixels)))
            return
        self.running.append(self.runners.submit(lambda: to_table(scorer.rows(metas, pixels))))
        while len(self.running) > self.runs:
            self.add_table(self.running.popleft().result())

    def drain(self) -> None:
        """Wait for the batches in flight and take their rows."""
        while self.running:
            self.add_table(self.running.popleft().result())

    def add_table(self, table: pa.Table) -> None:
        """Rows scored (here or by the Ray engine's actors): into the next parts."""
        self.held.append(table)
        self.rows += table.num_rows
        self.on_rows(table)
        while self.rows >= self.part_size:
            self.flush(self.part_size)

    def flush(self, n: int | None = None) -> None:
        """Write the first `n` rows held (all of them by default) as one part."""
        held = pa.concat_tables(self.held) if self.held else None
        if held is None:
            return
        n = held.num_rows if n is None else n
        # Taken before writing: a part is either renamed into place or re-scored next run.
        rest = held.slice(n)
        self.held, self.rows = ([rest] if rest.num_rows else []), rest.num_rows
        self.writer.write(held.slice(0, n))


def chunks(paths: list[str], size: int) -> Iterator[list[str]]:
    for i in range(0, len(paths), size):
        yield paths[i : i + size]


def _timed(paths: list[str], spec: Preprocess, limits: Limits) -> tuple[Decoded, float]:
    """`decode_paths` in a pool process, with the CPU seconds it took (for the run's log)."""
    t0 = time.process_time()
    decoded = decode_paths(paths, spec, limits)
    return decoded, time.process_time() - t0


def _quiet_worker() -> None:
    """Decode processes leave Ctrl-C to the main process (which stops them)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class Decoder:
    """Paths -> (metas, pixels) per chunk, in input order: in a pool of `workers` processes
    (0: in this process, lazily), keeping `inflight` chunks queued.

    The pool starts and takes its first chunks when the decoder is made, so that it decodes
    while the onnxruntime session opens and warms up.
    """

    def __init__(
        self,
        paths: list[str],
        spec: Preprocess,
        limits: Limits,
        workers: int,
        inflight: int,
        chunk_size: int = 32,
    ) -> None:
        self.spec, self.limits, self.inflight = spec, limits, inflight
        self._todo = chunks(paths, chunk_size)
        self._queued: deque[Future[tuple[Decoded, float]]] = deque()
        self.pool_cpu_s = 0.0  # CPU seconds the pool spent on the chunks taken
        self._pool: ProcessPoolExecutor | None = None
        if workers > 0:
            # forkserver: the pool is not forked from a process running onnxruntime's threads.
            ctx = multiprocessing.get_context("forkserver")
            self._pool = ProcessPoolExecutor(workers, mp_context=ctx, initializer=_quiet_worker)
            self._fill()

    def _fill(self) -> None:
        assert self._pool is not None
        while len(self._queued) < self.inflight:
            chunk = next(self._todo, None)
            if chunk is None:
                return
            self._queued.append(self._pool.submit(_timed, chunk, self.spec, self.limits))

    def __iter__(self) -> Iterator[Decoded]:
        if self._pool is None:
            for chunk in self._todo:
                yield decode_paths(chunk, self.spec, self.limits)
            return
        while self._queued:
            decoded, cpu_s = self._queued.popleft().result()
            self.pool_cpu_s += cpu_s
            self._fill()
            yield decoded

    def close(self, wait: bool = True) -> None:
        """Stop the pool; `wait=False` drops the queued chunks (a stop request)."""
        if self._pool is not None:
            self._pool.shutdown(wait=wait, cancel_futures=True)


def inflight_chunks(batch_size: int, workers: int, chunk_size: int = 32) -> int:
    """Enough queued chunks to decode the next batch while this one runs, and then some."""
    return max(2 * workers, -(-batch_size // chunk_size) + workers)


def run_local(batches: Batches, decoder: Decoder, stop: threading.Event) -> bool:
    """Score what `decoder` yields into `batches`; False when stopped early (what was scored
    is written)."""
    try:
        for metas, pixels in decoder:
            batches.add(metas, pixels)
            if stop.is_set():
                break
    finally:
        decoder.close(wait=not stop.is_set())
    finished = not stop.is_set()
    if finished:
        batches.score()
    batches.drain()  # even when stopped: those rows are scored already, or nearly
    batches.flush()
    return finished
