"""The Ray engine: the same scoring through Ray Data, for a corpus beyond one machine.

    read_binary_files(paths) -> map_batches(ScoreActor, an actor pool) -> rows on the driver

Each actor opens the bundle once (`ScorerConfig.open`: the service's `load_model`, with the
driver's settings) and scores each batch as the local engine does: `decoding.stack` (the
contract's decode with the service's limits), then `Scorer.rows` (one onnxruntime run, the
service's result code). The driver receives rows only (about 200 bytes an image, never the
pixels) and writes them with the local engine's `PartWriter`, so the Parquet layout, the
atomic parts and resuming are the same.

Files that cannot be read, or are over `max_image_bytes`, become error rows on the driver
before Ray reads anything (`read_binary_files` would fail a whole read task on one
unreadable file, and read a huge one into memory). Every node must see the paths and the
bundle at the same place (a shared filesystem): docs/batch-scoring.md, "A Ray cluster".
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from isomax.batch.decoding import Meta, check_file, stack
from isomax.batch.local import Batches
from isomax.batch.output import to_table
from isomax.batch.scoring import ScorerConfig, row_of

log = logging.getLogger(__name__)


class ScoreActor:
    """One onnxruntime session per actor; `__call__` scores one batch of file bytes."""

    def __init__(self, config: ScorerConfig, threads: int) -> None:
        self.scorer = config.open(threads)
        self.spec = self.scorer.model.manifest.preprocess

    def __call__(self, batch: pa.Table) -> pa.Table:
        paths = batch.column("path").to_pylist()
        datas = batch.column("bytes").to_pylist()
        metas, pixels = stack(datas, paths, self.spec, self.scorer.limits)
        return to_table(self.scorer.rows(metas, pixels))


@dataclass(frozen=True)
class RayOptions:
    address: str | None = None  # None: RAY_ADDRESS, else a local instance
    actors: int = 1  # size of the actor pool
    actor_cpus: int = 1  # CPUs Ray reserves per actor; its onnxruntime threads
    object_store_mb: int = 512  # a local instance only


def _init(options: RayOptions) -> None:
    import ray

    if ray.is_initialized():
        return
    kw: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False}
    if options.address is None:
        import os

        if not os.environ.get("RAY_ADDRESS"):
            kw["object_store_memory"] = options.object_store_mb * 1024 * 1024
    ray.init(address=options.address, **kw)


def run_ray(
    batches: Batches,
    config: ScorerConfig,
    paths: list[str],
    stop: threading.Event,
    options: RayOptions,
) -> bool:
    """Score `paths` through Ray Data into `batches` (rows only); False when stopped early."""
    import ray

    limits = config.limits
    readable: list[str] = []
    errors = []
    for p in paths:
        error = check_file(p, limits)
        if error is None:
            readable.append(p)
        else:
            errors.append(row_of(Meta(p, error=error), None))
    if errors:
        batches.add_table(to_table(errors))
    if readable:
        _init(options)
        ds = ray.data.read_binary_files(readable, include_paths=True)
        ds = ds.map_batches(
            ScoreActor,
            fn_constructor_kwargs={"config": config, "threads": options.actor_cpus},
            batch_size=batches.batch_size,
            batch_format="pyarrow",
            concurrency=options.actors,
            num_cpus=options.actor_cpus,
        )
        for table in ds.iter_batches(batch_format="pyarrow", batch_size=None):
            assert isinstance(table, pa.Table)
            batches.add_table(table)
            if stop.is_set():
                break
    batches.flush()
    return not stop.is_set()
