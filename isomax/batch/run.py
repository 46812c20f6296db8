"""One `isomax score` run: bundle, inputs, output folder, an engine, the summary."""

from __future__ import annotations

import argparse
import logging
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
from pydantic import ValidationError
from tqdm import tqdm

from isomax.batch.inputs import InputError, collect
from isomax.batch.local import Batches, Decoder, inflight_chunks, run_local
from isomax.batch.output import OutputMismatchError, PartWriter, read_rows
from isomax.batch.report import write_summary
from isomax.batch.scoring import BundleNotFoundError, ScorerConfig, scorer_config
from isomax.contract.manifest import Manifest, Preprocess
from isomax.contract.verdict import Thresholds
from service.discovery import ConfigError, ModelLoadError
from service.settings import Settings

log = logging.getLogger("isomax.score")


@dataclass
class Tally:
    """The progress bar's figures: images/s (tqdm's rate), OOD share so far, errors."""

    bar: tqdm
    scored: int = 0
    ood: int = 0
    errors: int = 0

    def __call__(self, rows: pa.Table) -> None:
        scored = rows.column("error").null_count  # rows without an error
        self.scored += scored
        self.errors += rows.num_rows - scored
        self.ood += pc.sum(rows.column("is_ood")).as_py() or 0
        share = f"{self.ood / self.scored:.1%}" if self.scored else "-"
        self.bar.set_postfix_str(f"OOD {share}, {self.errors} errors", refresh=False)
        self.bar.update(rows.num_rows)


def _config(args: argparse.Namespace) -> ScorerConfig:
    overrides: dict[str, Any] = {}
    if args.device is not None:
        overrides["device"] = args.device
    if args.global_threshold:
        overrides["class_thresholds"] = False
    return scorer_config(args.bundle, args.model, target_tpr=args.target_tpr, **overrides)


def run_record(config: ScorerConfig) -> tuple[Manifest, Thresholds, dict[str, Any]]:
    """The manifest, the thresholds in force (the lookup `load_model` makes) and what
    `_run.json` records: what must not change between a run and its resumption."""
    manifest = Manifest.read(Path(config.bundle))
    settings = Settings(**config.settings)
    thresholds = Thresholds.lookup(
        manifest.calibration,
        settings.target_tpr.get(manifest.name),
        per_class=settings.class_thresholds,
    )
    limits = config.limits
    run = {
        "model": f"{manifest.name}:{manifest.version}",
        "onnx_sha256": manifest.onnx.sha256,
        "target_tpr": thresholds.target_tpr,
        "class_thresholds": thresholds.per_class is not None,
        "limits": vars(limits),
    }
    return manifest, thresholds, run


def score(args: argparse.Namespace, stop: threading.Event, t0: float) -> int:
    try:
        config = _config(args)
        manifest, thresholds, run = run_record(config)
        paths = collect(args.inputs)
        writer = PartWriter(args.out, args.format, run)
    except (BundleNotFoundError, ConfigError, InputError, OutputMismatchError) as e:
        log.error("isomax score: %s", e)
        return 2
    except (ValidationError, ValueError) as e:  # settings, manifest, target_tpr out of range
        log.error("isomax score: %s", e)
        return 2
    todo = [p for p in paths if p not in writer.done]
    log.info("%s: %d files, %d already in %s, %d to score (%s engine)", run["model"],
             len(paths), len(paths) - len(todo), args.out, len(todo), args.engine)  # fmt: skip
    bar = tqdm(total=len(paths), initial=len(paths) - len(todo), unit="img",
               disable=True if args.no_progress else None, file=sys.stderr)  # fmt: skip
    tally = Tally(bar)
    try:
        t_engine, cpu0 = time.perf_counter(), time.process_time()
        finished, pool_cpu_s = _run_engine(args, config, writer, todo, stop, tally)
        seconds, cpu_s = time.perf_counter() - t_engine, time.process_time() - cpu0 + pool_cpu_s
    except ModelLoadError as e:
        log.error("isomax score: %s", e)
        return 2
    finally:
        bar.close()
    n = tally.scored + tally.errors
    # From opening the session to the last part written; CPU of this process and the pool.
    log.info("scored %d files in %.2f s: %.1f images/s, %.3f ms of CPU per file", n, seconds,
             n / seconds if seconds else 0.0, 1e3 * cpu_s / max(n, 1))  # fmt: skip
    table = read_rows(args.out)
    if not finished:
        log.warning("stopped: %d rows in %s; run the same command again to continue",
                    table.num_rows, args.out)  # fmt: skip
        return 130
    write_summary(args.out, table, manifest, thresholds, config.limits, not args.no_picture)
    sys.stdout.write((args.out / "summary.txt").read_text())
    log.info("done in %.1f s: %s", time.perf_counter() - t0, args.out)
    return 0


def batch_size(asked: int, spec: Preprocess) -> int:
    """`asked`, or for 0: 256 images, fewer when that is over 32 MiB of float input."""
    per_image = 4 * spec.channels * spec.height * spec.width
    return asked or max(1, min(256, (32 << 20) // per_image))


def _run_engine(
    args: argparse.Namespace,
    config: ScorerConfig,
    writer: PartWriter,
    todo: list[str],
    stop: threading.Event,
    tally: Tally,
) -> tuple[bool, float]:
    """(finished, CPU seconds of the decode pool)."""
    if args.engine == "ray":
        from isomax.batch.ray_engine import RayOptions, run_ray

        spec = Manifest.read(Path(config.bundle)).preprocess
        batches = Batches(None, writer, batch_size(args.batch_size, spec), args.part_size, tally)
        options = RayOptions(args.ray_address, args.actors, args.actor_cpus)
        return run_ray(batches, config, todo, stop, options), 0.0
    spec = Manifest.read(Path(config.bundle)).preprocess
    batch = batch_size(args.batch_size, spec)
    inflight = inflight_chunks(batch * args.runs, args.workers)
    decoder = Decoder(todo, spec, config.limits, args.workers, inflight)
    try:
        scorer = config.open(args.threads)
    except BaseException:
        decoder.close(wait=False)
        raise
    log.info("%s on %s: %d concurrent runs of %d images, %d onnxruntime thread(s) each; %d "
             "decode processes", scorer.model.ref.key, scorer.model.provider, args.runs,
             batch, scorer.settings.intra_op_threads, args.workers)  # fmt: skip
    batches = Batches(scorer, writer, batch, args.part_size, tally, runs=args.runs)
    with ThreadPoolExecutor(args.runs, thread_name_prefix="onnxruntime") as runners:
        batches.runners = runners
        return run_local(batches, decoder, stop), decoder.pool_cpu_s
