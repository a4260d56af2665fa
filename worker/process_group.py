"""A job's torch.distributed process group on one worker (docs/distributed.md).

The supervisor starts ``python -m worker.runner --processes N``, which runs torchrun's elastic
agent (``run_agent``); the agent starts N ranks, each ``python -m worker.runner`` with
``RANK``/``WORLD_SIZE`` in its environment. Rank 0 reports and finishes the job as a lone
training process does (``worker.runner``); the other ranks train in step with it and write
nothing (``RankReporter``). A rank that dies makes the agent stop the group and exit non-zero:
the supervisor's crash path puts the job back in the queue, and the whole group restarts from
the newest complete checkpoint.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from pathlib import Path
from typing import Any

from app.core.logs import ATTEMPT_ENV, configure_logging
from app.core.process import die_with_parent
from app.core.settings import Settings, get_settings

log = logging.getLogger("tunehouse.training")


class RankReporter:
    """The reporter of ranks 1 to N-1 of a process group. They run the same loop as rank 0,
    in step with it, but write nothing: rank 0 reports progress, events and checkpoints, holds
    the lease and finishes the job. A rank stops when its own SIGTERM (sent by the elastic
    agent to every rank) asks it to; the loop agrees on stopping across ranks."""

    def __init__(self) -> None:
        self._stop = threading.Event()

    def request_stop(self) -> None:
        self._stop.set()

    def should_stop(self) -> bool:
        return self._stop.is_set()

    def checkpoint_on_stop(self) -> bool:
        return False  # rank 0 decides, and writes the checkpoint

    def progress(self, step: int, total_steps: int) -> None:
        pass

    def metrics(self, data: dict[str, float | int]) -> None:
        pass

    def message(self, text: str, level: str = "info") -> None:
        pass

    def checkpoint(self, step: int, path: Path, metrics: dict[str, float]) -> None:
        pass

    def checkpoints_pruned(self, removed: list[int], resized: dict[int, int]) -> bool:
        return True  # nothing of rank 0's to record

    def finished(self) -> None:
        self._stop.set()


def log_as_trainer(settings: Settings, job_id: str, rank: int | None = None) -> None:
    """A training process's logging (``log_format``): every line names the job, the attempt
    its worker gave it and, in a group, its rank."""
    attempt = os.environ.get(ATTEMPT_ENV, "")
    fixed: dict[str, object] = {"job_id": job_id, "rank": rank}
    if attempt.isdigit():
        fixed["attempt"] = int(attempt)
    configure_logging(settings.log_level, settings.log_format, fixed=fixed)


def rank_environment() -> tuple[int, int]:
    """(rank, world size) as torchrun's agent sets them; (0, 1) for a lone process."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def join_group(device: Any, world_size: int) -> None:
    """Join the job's process group (its rendezvous is torchrun's, in the environment)."""
    import torch
    import torch.distributed as dist

    if world_size == 1:
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl", device_id=device)
    else:
        dist.init_process_group(backend="gloo")


def leave_group() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        with contextlib.suppress(Exception):  # a peer may be gone already
            dist.destroy_process_group()


def group_broke(exc: BaseException) -> bool:
    """Whether an error of one rank says that another rank of its group is gone (killed, or
    failed on its own): a collective that lost its peer. That is a crash of the group, which
    restarts from its checkpoint, not a failure of the job."""
    import torch.distributed as dist

    if isinstance(exc, dist.DistError):
        return True
    text = str(exc)
    signs = ("gloo", "NCCL", "Connection reset by peer", "Connection closed by peer")
    return isinstance(exc, RuntimeError) and any(sign in text for sign in signs)


def run_agent(job_id: str, owner: str, processes: int, shutdown_timeout: float) -> int:
    """The elastic agent of a job's process group: torchrun (``torch.distributed.run``) in
    this process, which starts ``processes`` ranks of ``python -m worker.runner`` on this
    machine (a standalone c10d rendezvous on a free port), watches them, and stops them all
    when one dies (no restarts of its own: the supervisor restarts the job from its
    checkpoint). It forwards SIGTERM to every rank and SIGKILLs those still there after
    ``shutdown_timeout`` seconds.

    Run here rather than as ``python -m torch.distributed.run`` so that it dies with the worker
    (a parent-death signal): each rank starts a session of its own, out of reach of a signal
    to this process's group, and dies with this process in turn."""
    die_with_parent()
    if os.getppid() == 1:  # the worker died before the line above took effect
        return 0
    log_as_trainer(get_settings(), job_id)
    # torch's threads: this machine's CPUs shared between the ranks (torchrun sets 1).
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (cpus or 1) // processes)))

    from torch.distributed.run import main as torchrun

    try:
        torchrun(
            [
                "--standalone",
                "--nproc-per-node", str(processes),
                "--max-restarts", "0",
                "--shutdown-timeout", str(max(1, round(shutdown_timeout))),
                "-m", "worker.runner", job_id, owner,
            ]
        )  # fmt: skip
    except Exception as exc:  # a rank failed, or the agent was asked to stop
        log.warning("the process group of %s ended: %s", job_id, type(exc).__name__)
        return 1
    return 0
