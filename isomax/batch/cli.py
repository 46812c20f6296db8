"""`isomax score BUNDLE_OR_MODELS_DIR INPUT... --out OUT`: a corpus through the service's
decode, graph and verdict (docs/batch-scoring.md)."""

from __future__ import annotations

import argparse
import contextlib
import logging
import signal
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

log = logging.getLogger("isomax.score")

EPILOG = """inputs: a folder (recursive), a file, a quoted glob ('dump/**/*.jpg'), or @LIST (a text
file of paths, one a line). Limits, device and operating point follow the service's ISOMAX_*
settings (docs/serving.md), so a file is judged as `isomax serve` judges it.
Exit status: 0 done, 2 bad arguments or bundle, 130 stopped (Ctrl-C): rerun to continue."""


def parser() -> argparse.ArgumentParser:
    from service.sessions import cores

    p = argparse.ArgumentParser(prog="isomax score", description=__doc__, epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("bundle", type=Path, help="a bundle directory, or a models directory")
    p.add_argument("inputs", nargs="+", help="folders, files, globs, @lists")
    p.add_argument("--out", type=Path, required=True, help="output folder (rerun to resume)")
    p.add_argument("--model", help="name or name:version, in a models directory of several")
    p.add_argument("--format", choices=("parquet", "jsonl", "csv"), default="parquet")
    p.add_argument("--engine", choices=("local", "ray"), default="local")
    p.add_argument("--workers", type=int, default=cores(),
                   help="decode processes (local engine; 0: decode in the main process); "
                   "default: the cores this process may use (%(default)s)")  # fmt: skip
    p.add_argument("--runs", type=int, default=cores(),
                   help="concurrent onnxruntime runs on the one session (local engine); "
                   "default: the cores (%(default)s)")  # fmt: skip
    p.add_argument("--threads", type=int, default=1,
                   help="onnxruntime threads per run (local engine)")  # fmt: skip
    p.add_argument("--batch-size", type=int, default=0,
                   help="images per onnxruntime run; 0: 256, fewer for large inputs (32 MiB "
                   "of float input a run)")  # fmt: skip
    p.add_argument("--part-size", type=int, default=10_000, help="rows per output part")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default=None,
                   help="as ISOMAX_DEVICE: cuda fails rather than run on CPU")  # fmt: skip
    p.add_argument("--target-tpr", type=float, default=None, help="operating point")
    p.add_argument("--global-threshold", action="store_true",
                   help="ignore the bundle's class thresholds")  # fmt: skip
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--no-picture", action="store_true", help="no summary.png")
    ray = p.add_argument_group("ray engine")
    ray.add_argument("--ray-address", default=None,
                     help="a running cluster (else RAY_ADDRESS, else a local instance)")  # fmt: skip
    ray.add_argument("--actors", type=int, default=1, help="scoring actors (one session each)")
    ray.add_argument("--actor-cpus", type=int, default=1,
                     help="CPUs per actor, and its onnxruntime threads")  # fmt: skip
    return p


@contextlib.contextmanager
def stop_on_signals() -> Iterator[threading.Event]:
    """SIGINT/SIGTERM set the event (the engine stops between chunks and writes what it has);
    a second Ctrl-C interrupts at once."""
    stop = threading.Event()

    def handler(signum: int, frame: Any) -> None:
        if stop.is_set() and signum == signal.SIGINT:
            raise KeyboardInterrupt
        log.warning("stopping: writing the rows scored so far (Ctrl-C again to abort)")
        stop.set()

    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        from isomax.batch.run import score
    except ModuleNotFoundError as e:
        print(f"isomax score needs the [batch] extra (missing module {e.name!r}): "
              "pip install 'isomax-serve[batch]'", file=sys.stderr)  # fmt: skip
        return 2
    args = parser().parse_args(argv)
    for name in ("workers", "runs", "threads", "batch_size", "part_size", "actors"):
        if getattr(args, name) < (0 if name in ("workers", "batch_size") else 1):
            parser().error(f"--{name.replace('_', '-')} is too small: {getattr(args, name)}")
    t0 = time.perf_counter()
    with stop_on_signals() as stop:
        return score(args, stop, t0)
