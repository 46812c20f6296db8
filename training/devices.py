"""Where training runs: one CPU or GPU, or one of several data-parallel processes (torchrun).

The training loop is the same everywhere; this module holds the differences: the device, the
mixed-precision mode, and the torch.distributed set-up (DDP) that `torchrun` asks for through
its environment variables (WORLD_SIZE, RANK, LOCAL_RANK, MASTER_ADDR, MASTER_PORT).
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field

import torch
from torch import nn


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """`auto` is CUDA when torch sees a GPU, else CPU; under torchrun, GPU `local_rank`."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' requested but torch sees no CUDA device")
    if name not in ("cpu", "cuda"):
        raise ValueError(f"unknown device {name!r}; choose auto, cpu or cuda")
    return torch.device("cuda", local_rank) if name == "cuda" else torch.device("cpu")


@dataclass
class Precision:
    """Mixed precision on CUDA: bf16 where the GPU has it, else fp16 with a gradient scaler.

    On CPU (or with `amp` off) everything is a no-op and training is plain float32.
    """

    dtype: torch.dtype | None
    device_type: str
    scaler: torch.amp.GradScaler = field(repr=False)

    @classmethod
    def for_device(cls, device: torch.device, amp: bool) -> Precision:
        dtype = None
        if amp and device.type == "cuda":
            dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
        return cls(dtype, device.type, scaler)

    @property
    def name(self) -> str:
        return "float32" if self.dtype is None else f"mixed precision ({self.dtype})"

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)


@dataclass
class Distributed:
    """This process's place in a torchrun job; world 1 (no torch.distributed) otherwise."""

    rank: int
    world: int
    device: torch.device

    @classmethod
    def from_env(cls, device_name: str) -> Distributed:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls(0, 1, resolve_device(device_name))
        import torch.distributed as dist

        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        device = resolve_device(device_name, local_rank)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        return cls(dist.get_rank(), dist.get_world_size(), device)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def local_batch(self, batch_size: int) -> int:
        """Each process's share of the global batch; the global batch is the recipe."""
        if batch_size % self.world:
            raise ValueError(
                f"batch_size {batch_size} does not split evenly over {self.world} processes"
            )
        return batch_size // self.world

    def sync_buffers(self, model: nn.Module) -> None:
        """Give every process rank 0's buffers (BatchNorm running statistics).

        DDP averages gradients, so parameters stay equal, but each process updates its running
        statistics from its own share of the batch; rank 0's are the ones checkpointed.
        """
        if self.world == 1:
            return
        import torch.distributed as dist

        for buf in model.buffers():
            dist.broadcast(buf, src=0)

    def weight_spread(self, model: nn.Module) -> float:
        """Largest difference of any parameter or buffer between the processes (0: in sync)."""
        import torch.distributed as dist

        flat = torch.cat([t.detach().float().flatten() for t in model.state_dict().values()])
        hi, lo = flat.clone(), flat.clone()
        dist.all_reduce(hi, op=dist.ReduceOp.MAX)
        dist.all_reduce(lo, op=dist.ReduceOp.MIN)
        return float((hi - lo).max())

    def wrap(self, model: nn.Module, find_unused: bool = False) -> nn.Module:
        """DDP around `model` (gradients averaged over processes), or `model` itself."""
        if self.world == 1:
            return model
        from torch.nn.parallel import DistributedDataParallel

        ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids, find_unused_parameters=find_unused)

    def close(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()
            dist.destroy_process_group()
