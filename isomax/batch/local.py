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
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from isomax.batch.decoding import Limits, Meta, decode_paths
from isomax.batch.output import PartWriter, to_table
from isomax.batch.scoring import Scorer
from isomax.contract.manifest import Preprocess

log = logging.getLogger(__name__)

Rows = list[dict[str, Any]]


@dataclass
class Batches:
    """Decoded chunks -> batches scored in one run each -> parts of `part_size` rows."""

    scorer: Scorer | None  # None: rows come scored (the Ray engine)
    writer: PartWriter
    batch_size: int
    part_size: int
    on_rows: Callable[[Rows], None] = lambda rows: None
    metas: list[Meta] = field(default_factory=list)
    pixels: list[np.ndarray] = field(default_factory=list)
    decoded: int = 0
    rows: Rows = field(default_factory=list)

    def add(self, metas: list[Meta], pixels: np.ndarray | None) -> None:
        self.metas.extend(metas)
        if pixels is not None:
            self.pixels.append(pixels)
            self.decoded += len(pixels)
        # Error rows cost nothing to score; bound them too, for a folder of non-images.
        if self.decoded >= self.batch_size or len(self.metas) >= 4 * self.batch_size:
            self.score()

    def score(self) -> None:
        if not self.metas:
            return
        pixels = np.concatenate(self.pixels) if self.pixels else None
        assert self.scorer is not None
        rows = self.scorer.rows(self.metas, pixels)
        self.metas, self.pixels, self.decoded = [], [], 0
        self.add_rows(rows)

    def add_rows(self, rows: Rows) -> None:
        """Rows scored (here or by the Ray engine's actors): into the next part."""
        self.rows.extend(rows)
        self.on_rows(rows)
        while len(self.rows) >= self.part_size:
            self.flush(self.part_size)

    def flush(self, n: int | None = None) -> None:
        """Write the first `n` rows held (all of them by default) as one part."""
        # Taken before writing: a part is either renamed into place or re-scored next run.
        rows, self.rows = self.rows[:n], self.rows[len(self.rows) if n is None else n :]
        self.writer.write(to_table(rows))


def chunks(paths: list[str], size: int) -> Iterator[list[str]]:
    for i in range(0, len(paths), size):
        yield paths[i : i + size]


def _quiet_worker() -> None:
    """Decode processes leave Ctrl-C to the main process (which stops them)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def run_local(
    batches: Batches,
    paths: list[str],
    workers: int,
    stop: threading.Event,
    chunk_size: int = 32,
) -> bool:
    """Score `paths` into `batches`; False when stopped early (what was scored is written)."""
    assert batches.scorer is not None
    spec = batches.scorer.model.manifest.preprocess
    limits = batches.scorer.limits
    todo = chunks(paths, chunk_size)
    if workers == 0:  # decode in this process: no overlap, no pool to start
        for chunk in todo:
            if stop.is_set():
                break
            batches.add(*decode_paths(chunk, spec, limits))
    else:
        _pooled(batches, todo, workers, stop, spec, limits, chunk_size)
    finished = not stop.is_set()
    if finished:
        batches.score()
    batches.flush()
    return finished


def _pooled(
    batches: Batches,
    todo: Iterator[list[str]],
    workers: int,
    stop: threading.Event,
    spec: Preprocess,
    limits: Limits,
    chunk_size: int,
) -> None:
    # forkserver: the pool is not forked from a process that runs onnxruntime's threads.
    ctx = multiprocessing.get_context("forkserver")
    # Enough queued chunks to decode the next batch while this one runs, and then some.
    inflight = max(2 * workers, -(-batches.batch_size // chunk_size) + workers)
    pool = ProcessPoolExecutor(workers, mp_context=ctx, initializer=_quiet_worker)
    queued: deque[Future[tuple[list[Meta], np.ndarray | None]]] = deque()
    try:
        for chunk in todo:
            queued.append(pool.submit(decode_paths, chunk, spec, limits))
            if len(queued) >= inflight:
                batches.add(*queued.popleft().result())
            if stop.is_set():
                return
        while queued and not stop.is_set():
            batches.add(*queued.popleft().result())
    finally:
        pool.shutdown(wait=not stop.is_set(), cancel_futures=True)
