"""The process group of a multi-process job, as the loop sees it.

The worker starts the group with torchrun's elastic agent and the training process joins it
(worker/runner.py) before the loop runs; here is only what the loop asks of it. With one
process every call is a no-op, so the loop reads the same either way.

Rank 0 speaks for the group: it reports events and progress, writes checkpoints and the final
model, and decides for everyone whether a stop saves a checkpoint and whether the job ran out
of time. Every rank sees the same batches (the data order is drawn from the same seed) and
trains on its own share of each one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Group:
    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")  # where collectives' tensors live (NCCL: GPU)

    @classmethod
    def current(cls, device: torch.device) -> Group:
        if dist.is_available() and dist.is_initialized():
            return cls(dist.get_rank(), dist.get_world_size(), device)
        return cls(device=device)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def share(self, indices: list[int]) -> list[int]:
        """This rank's rows of a batch. Batches are sorted longest first, so striding gives
        every rank rows of about the same lengths."""
        return indices[self.rank :: self.world_size]

    def any(self, *flags: bool) -> tuple[bool, ...]:
        """Each flag, true when it is true on any rank (one all-reduce for all of them)."""
        if not self.distributed:
            return flags
        tensor = torch.tensor([int(flag) for flag in flags], device=self.device)
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        return tuple(bool(value) for value in tensor.tolist())

    def sum(self, value: float) -> float:
        """`value` added up over the ranks, on every rank."""
        if not self.distributed:
            return value
        tensor = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return float(tensor.item())

    def main_says(self, flag: bool) -> bool:
        """Rank 0's value of `flag`, on every rank."""
        if not self.distributed:
            return flag
        tensor = torch.tensor([int(flag)], device=self.device)
        dist.broadcast(tensor, src=0)
        return bool(tensor.item())

    def gather(self, value: Any) -> list[Any]:
        """Every rank's `value` (plain data: RNG states), in rank order, on every rank."""
        if not self.distributed:
            return [value]
        values: list[Any] = [None] * self.world_size
        dist.all_gather_object(values, value)
        return values

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        """The model that trains: DistributedDataParallel over the group, or the model itself.
        DDP averages gradients over the ranks in the backward of each synced micro-batch."""
        if not self.distributed:
            return model
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=device_ids)
