"""Multi-process training with torch.distributed: init from torchrun's environment, shard, all-reduce.

``torchrun --nproc_per_node N -m mnistrec train ...`` sets ``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``; :func:`setup` sees them and
joins the process group (NCCL when training on CUDA, gloo on the CPU). Without them
it returns a single-process context whose methods do nothing, so ``train()`` has
one code path.

Sharding follows :class:`torch.utils.data.DistributedSampler` exactly: every rank
draws the *same* permutation (same seed), pads it by repeating its head to a
multiple of the world size, and takes every ``world_size``-th index from ``rank``.
With the per-rank batch ``batch_size // world_size``, step ``s`` of all ranks
together sees exactly the indices ``padded[s*B:(s+1)*B]`` that a single process
with batch ``B`` sees, and DDP's gradient average equals the single process's mean.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from .errors import MnistrecError


@dataclass(frozen=True)
class DistContext:
    """Where this process stands: ``rank`` of ``world_size``, and the device it trains on."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        """Rank 0 logs, shows progress bars and writes files; the others only compute."""
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    def per_rank_batch(self, batch_size: int) -> int:
        """``--batch-size`` is the global batch: split it evenly over the ranks."""
        if batch_size % self.world_size:
            raise MnistrecError(
                f"--batch-size {batch_size} is the global batch and must be divisible by the {self.world_size} processes"
            )
        return batch_size // self.world_size

    def shard(self, order: torch.Tensor) -> torch.Tensor:
        """This rank's part of ``order`` (a permutation identical on every rank), DistributedSampler style."""
        if not self.enabled:
            return order
        total = -(-len(order) // self.world_size) * self.world_size
        if total > len(order):  # pad by repeating the head (wrapping again for tiny sets)
            order = torch.cat([order, order.repeat(-(-total // len(order)))[: total - len(order)]])
        return order[self.rank : total : self.world_size]

    def wrap(self, model: nn.Module) -> nn.Module:
        """``DistributedDataParallel(model)`` when distributed (gradients are averaged over ranks), else ``model``."""
        if not self.enabled:
            return model
        from torch.nn.parallel import DistributedDataParallel

        ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)

    def all_reduce_sum(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Sum each tensor over all ranks (in place, and returned for convenience)."""
        if self.enabled:
            for t in tensors:
                dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return tensors

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def alone(self) -> "DistContext":
        """This process by itself (rank 0 of 1) on the same device: for work that is split by task, not by data."""
        return DistContext(device=self.device)

    def gather(self, obj: Any) -> list[Any] | None:
        """Every rank's picklable ``obj`` on rank 0, in rank order; ``None`` on the other ranks, ``[obj]`` alone."""
        if not self.enabled:
            return [obj]
        gathered: list[Any] | None = [None] * self.world_size if self.is_main else None
        dist.gather_object(obj, gathered, dst=0)
        return gathered


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def setup(device: torch.device) -> DistContext:
    """Join the process group if torchrun started us (idempotent); otherwise a single-process context."""
    if not launched_by_torchrun():
        return DistContext(device=device)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    elif device.type != "cpu":
        raise MnistrecError(f"distributed training runs on CUDA (NCCL) or the CPU (gloo), not on {device.type}")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method="env://")
    return DistContext(rank, world, local_rank, device)


def shutdown() -> None:
    """Leave the process group (no-op when not distributed)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def is_main_process() -> bool:
    """True outside torchrun and on rank 0: the process that prints and writes files."""
    return int(os.environ.get("RANK", "0")) == 0
