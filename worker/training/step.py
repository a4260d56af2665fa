"""One optimizer step's forward and backward passes: micro-batches, precision, processes.

A batch is `batch_size` rows (the effective batch). Each rank takes its share of the rows
(distributed.Group.share) and cuts it into micro-batches; every micro-batch's summed loss is
divided by the count of the whole batch (rows, or predicted tokens), so the gradients add up to
those of the batch in one piece whatever the split: more micro-batches, or more processes,
change the arithmetic's rounding and nothing else.

Under DDP only the last micro-batch of a rank synchronises gradients (the others run under
`no_sync`), and DDP averages over the ranks, which the loss's scale (the world size) undoes.
A rank whose share of a short last batch is empty still runs one micro-batch, with its loss
scaled to zero, so that every rank joins the gradient all-reduce.

On a GPU, when the job did not fix `micro_batch_size`, a micro-batch that runs out of memory is
halved and the step runs again from zero gradients: the micro-batch is chosen to fit.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from worker.training.devices import Precision
from worker.training.distributed import Group
from worker.training.registry import Batch, Collate, Features, TaskKind

logger = logging.getLogger(__name__)


def to_device(batch: Batch, device: torch.device) -> Batch:
    """The batch on the device; on a GPU through pinned memory, without waiting for the copy."""
    if device.type != "cuda":
        return {key: value.to(device) for key, value in batch.items()}
    return {key: value.pin_memory().to(device, non_blocking=True) for key, value in batch.items()}


def autocast(device: torch.device, precision: Precision) -> contextlib.AbstractContextManager[None]:
    if precision.autocast_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=precision.autocast_dtype)


@dataclass
class Stepper:
    kind: TaskKind
    train_model: torch.nn.Module  # the model as it trains: DDP-wrapped or compiled, or not
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    precision: Precision
    group: Group
    device: torch.device
    collate: Collate
    features: Sequence[Features]
    counts: Sequence[int]  # loss_count of each row, computed once
    micro: int  # rows per forward pass on this rank
    may_shrink: bool  # halve `micro` when a micro-batch runs out of GPU memory
    on_shrink: Callable[[int], None] = lambda micro: None

    def backward(self, indices: list[int]) -> float:
        """Gradients of the batch `indices` (all ranks' rows) accumulated into the model's
        .grad; returns this rank's part of the batch's mean loss (the ranks' parts add up to
        it)."""
        count = max(1, sum(self.counts[i] for i in indices))
        share = self.group.share(indices)
        weight = float(self.group.world_size)
        if not share:  # a short last batch: join the all-reduce with a zero gradient
            share, weight = indices[:1], 0.0
        while True:
            try:
                loss = self._backward(share, weight / count) / self.group.world_size
            except torch.OutOfMemoryError:
                if not self.may_shrink or self.micro == 1:
                    raise
                self.optimizer.zero_grad(set_to_none=True)
                torch.cuda.empty_cache()
                self.micro = max(1, self.micro // 2)
                logger.info("micro-batch lowered to %d rows to fit in memory", self.micro)
                self.on_shrink(self.micro)
                continue
            if not weight:  # the stand-in row's figures are not this rank's
                self.kind.begin_step()
            return loss

    def _backward(self, share: list[int], scale: float) -> float:
        self.kind.begin_step()
        chunks = [share[i : i + self.micro] for i in range(0, len(share), self.micro)]
        total = torch.zeros((), device=self.device)
        for n, chunk in enumerate(chunks):
            batch = to_device(self.collate([self.features[i] for i in chunk]), self.device)
            last = n == len(chunks) - 1
            sync = contextlib.nullcontext()
            if self.group.distributed and not last:
                sync = self.train_model.no_sync()  # type: ignore[operator]
            with sync:
                with autocast(self.device, self.precision):
                    loss = self.kind.loss_sum(self.train_model, batch) * scale
                self.scaler.scale(loss).backward()
            total += loss.detach().float()
        return float(total)  # one device sync per step, not one per micro-batch

    def step(self, max_grad_norm: float, parameters: Sequence[torch.nn.Parameter]) -> None:
        """Clip the global gradient norm (after unscaling fp16 gradients), step, clear."""
        if max_grad_norm > 0:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(parameters, max_grad_norm)
        self.scaler.step(self.optimizer)  # skipped when fp16 gradients overflowed
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
