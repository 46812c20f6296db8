"""One `isomax score` run: bundle, inputs, output folder, an engine, the summary."""

from __future__ import annotations

import argparse
import logging
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError
from tqdm import tqdm

from isomax.batch.inputs import InputError, collect
from isomax.batch.local import Batches, Rows, run_local
from isomax.batch.output import OutputMismatchError, PartWriter, read_rows
from isomax.batch.report import write_summary
from isomax.batch.scoring import BundleNotFoundError, ScorerConfig, scorer_config
from isomax.contract.manifest import Manifest
from isomax.contract.verdict import Thresholds
from service.models import ConfigError, ModelLoadError
from service.sessions import cores
from service.settings import Settings

log = logging.getLogger("isomax.score")


@dataclass
class Tally:
    """The progress bar's figures: images/s (tqdm's rate), OOD share so far, errors."""

    bar: tqdm
    scored: int = 0
    ood: int = 0
    errors: int = 0

    def __call__(self, rows: Rows) -> None:
        for r in rows:
            if r["error"] is None:
                self.scored += 1
                self.ood += bool(r["is_ood"])
            else:
                self.errors += 1
        share = f"{self.ood / self.scored:.1%}" if self.scored else "-"
        self.bar.set_postfix_str(f"OOD {share}, {self.errors} errors", refresh=False)
        self.bar.update(len(rows))


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
    manifest = Manifest.read(config.bundle)  # type: ignore[arg-type]
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
    try:
        finished = _run_engine(args, config, writer, todo, stop, Tally(bar))
    except ModelLoadError as e:
        log.error("isomax score: %s", e)
        return 2
    finally:
        bar.close()
    table = read_rows(args.out)
    if not finished:
        log.warning("stopped: %d rows in %s; run the same command again to continue",
                    table.num_rows, args.out)  # fmt: skip
        return 130
    summary = write_summary(
        args.out, table, manifest, thresholds, config.limits, picture=not args.no_picture
    )
    del summary
    sys.stdout.write((args.out / "summary.txt").read_text())
    log.info("done in %.1f s: %s", time.perf_counter() - t0, args.out)
    return 0


def _run_engine(
    args: argparse.Namespace,
    config: ScorerConfig,
    writer: PartWriter,
    todo: list[str],
    stop: threading.Event,
    tally: Tally,
) -> bool:
    if args.engine == "ray":
        from isomax.batch.ray_engine import RayOptions, run_ray

        batches = Batches(None, writer, args.batch_size, args.part_size, tally)
        options = RayOptions(args.ray_address, args.actors, args.actor_cpus)
        return run_ray(batches, config, todo, stop, options)
    scorer = config.open(args.threads or cores())
    log.info("%s on %s, %d onnxruntime threads, %d decode processes",
             scorer.model.ref.key, scorer.model.provider, scorer.settings.intra_op_threads,
             args.workers)  # fmt: skip
    batches = Batches(scorer, writer, args.batch_size, args.part_size, tally)
    return run_local(batches, todo, args.workers, stop)
