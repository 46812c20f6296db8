"""onnxruntime sessions: which provider, how many threads, which options.

Threads (`ISOMAX_INTRA_OP_THREADS=0`, the default) follow the model's cost, measured at load:
  - a light model (one image costs under `HEAVY_MODEL_S` of CPU at one thread, like the
    28x28 Fashion-MNIST bundle) gets the cores left after one per worker's event loop: the
    loop's HTTP, decode and JSON work per request is as large as the model's, and two
    onnxruntime threads fighting the loop for its core served fewer requests per second at
    more CPU per request;
  - a heavy model (like a 224-px ResNet-18) gets every core of its worker: the event loop
    needs a small share of one core for the same requests, and leaving a core to it held the
    model well below raw onnxruntime's throughput (bench/serve224_bench.py).
  The figures: bench/results/serving-log.md, "Design notes" (onnxruntime's threads).
A set value is used as is for every model. "Cores" are those the process may use: its CPU
affinity, capped by its cgroup's CPU limit (`cores`), so that a container limited to 2 CPUs
on a 64-core node does not start 63 threads.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import onnxruntime as ort

from service.settings import Settings

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"

# CPU seconds per image at one thread above which a model gets every core of its worker.
HEAVY_MODEL_S = 0.002


class NoProviderError(RuntimeError):
    """ISOMAX_DEVICE=cuda on an onnxruntime without the CUDA provider."""


def providers(device: str) -> list[str]:
    """The execution providers to ask onnxruntime for, in order of preference."""
    available = ort.get_available_providers()
    if device == "cpu":
        return [CPU]
    if device == "cuda":
        if CUDA not in available:
            raise NoProviderError(
                f"ISOMAX_DEVICE=cuda but this onnxruntime has no CUDA provider (available: "
                f"{available}); install onnxruntime-gpu with a matching CUDA, or use device=cpu"
            )
        return [CUDA, CPU]
    return [CUDA, CPU] if CUDA in available else [CPU]


CGROUP = Path("/sys/fs/cgroup")


def cgroup_cpu_limit(root: Path = CGROUP) -> int | None:
    """The CPU limit of this process's cgroup, rounded up to whole cores; None when unlimited.

    A container's CPU limit (Kubernetes `resources.limits.cpu`, `docker run --cpus`) is a CFS
    quota, not a set of cores: the node's cores all stay visible, and a thread per visible core
    would be throttled. cgroup v2 keeps it in `cpu.max` ("200000 100000": 2 cores), v1 in
    `cpu/cpu.cfs_quota_us` and `cpu/cpu.cfs_period_us` (-1: none).
    """
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]
        if quota == "max":
            return None
        return max(1, math.ceil(int(quota) / int(period)))
    except (OSError, ValueError):
        pass
    try:
        quota_us = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period_us = int((root / "cpu" / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return max(1, math.ceil(quota_us / period_us)) if quota_us > 0 and period_us > 0 else None


def cores() -> int:
    """The cores this process may use: its CPU affinity (a cpuset), capped by its cgroup's CPU
    limit (a quota)."""
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    limit = cgroup_cpu_limit()
    return min(n or 1, limit) if limit else (n or 1)


def intra_op_threads(settings: Settings, heavy: bool = False) -> int:
    """The setting, else (module doc) every core of a worker for a heavy model, or the cores
    left after one per worker's event loop for a light one; at least 1."""
    if settings.intra_op_threads:
        return settings.intra_op_threads
    if heavy:
        return max(1, cores() // settings.workers)
    return max(1, (cores() - settings.workers) // settings.workers)


def is_heavy(seconds_per_image: float, threads: int) -> bool:
    """Whether a model that ran at `seconds_per_image` on `threads` threads is heavy: its
    cost at one thread (approximated as seconds x threads) is at least HEAVY_MODEL_S."""
    return seconds_per_image * threads >= HEAVY_MODEL_S


def session_options(threads: int) -> ort.SessionOptions:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    # Idle onnxruntime threads would otherwise spin on the cores the event loop needs.
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.log_severity_level = 3
    return opts
