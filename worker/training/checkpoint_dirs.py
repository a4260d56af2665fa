"""A job's checkpoints directory, without torch: which checkpoints are complete, which one a
resume needs, and removing the others without ever leaving one that looks complete but is not.

Layout: ``<checkpoints_dir>/step-N`` is a checkpoint once its ``COMPLETE`` marker exists (the
last thing ``checkpoint.write_checkpoint`` writes). It can be resumed from while it also holds
``training_state.pt`` (optimizer, scheduler, data position, RNG states); without it, its
weights are still a servable model (``<model>:ckpt-step-N``). ``.tmp-step-N`` is one being
written and ``.trash-step-N`` one being removed: neither is ever read.

Retention: a job keeps its newest ``keep`` complete checkpoints and the one at each epoch's end.
Only the newest keeps its training state, since a resume starts from the newest complete
checkpoint and needs nothing older; the others keep their weights. A checkpoint is removed by
one atomic rename out of the ``step-N`` names, then deleted; a crash in between leaves a
``.trash-`` directory that the next pruning deletes. A training state goes by one unlink.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from app.core.storage import tree_bytes

STATE_FILE = "training_state.pt"
COMPLETE_MARKER = "COMPLETE"
_STEP_DIR = re.compile(r"^step-(\d+)$")
_IN_PROGRESS = re.compile(r"^\.(tmp|trash)-step-\d+$")

# Told which checkpoints are about to leave the disk (steps) and which lost their training
# state (step -> bytes left); True once that is recorded, and only then are the files removed.
Forget = Callable[[list[int], dict[int, int]], bool]


def fsync_path(path: Path) -> None:
    """fsync a file or a directory, so that names (not just bytes) survive a crash. Windows
    cannot open a directory for fsync; there the rename is the best we get."""
    flags = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) if path.is_dir() else os.O_RDONLY
    try:
        fd = os.open(path, flags)
    except OSError:
        if path.is_dir():
            return
        raise
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def complete_checkpoints(checkpoints_dir: Path) -> dict[int, Path]:
    """Step -> directory of every complete checkpoint, oldest first."""
    if not checkpoints_dir.is_dir():
        return {}
    found = {}
    for child in checkpoints_dir.iterdir():
        match = _STEP_DIR.match(child.name)
        if match and (child / COMPLETE_MARKER).is_file():
            found[int(match.group(1))] = child
    return dict(sorted(found.items()))


def latest_complete_checkpoint(checkpoints_dir: Path) -> Path | None:
    """The newest complete checkpoint that holds its training state (the one a resume goes on
    from), or None when there is none."""
    found = complete_checkpoints(checkpoints_dir)
    newest = _newest_resumable(found)
    return None if newest is None else found[newest]


def _newest_resumable(found: dict[int, Path]) -> int | None:
    """Of complete checkpoints (step -> directory), the newest step with its training state."""
    return max((step for step, path in found.items() if has_training_state(path)), default=None)


def has_training_state(path: Path) -> bool:
    return (path / STATE_FILE).is_file()


@dataclass(frozen=True)
class RetentionPlan:
    remove: list[int]  # checkpoints whose directories go
    weights_only: list[int]  # checkpoints that stay, without their training state


def plan_retention(
    steps: Iterable[int], *, resumable: int | None, keep: int, is_epoch_end: Callable[[int], bool]
) -> RetentionPlan:
    """Of the complete checkpoints at ``steps``, keep the newest ``keep``, each epoch's end and
    ``resumable`` (the newest with a training state, which keeps it)."""
    ordered = sorted(steps)
    kept = set(ordered[-keep:]) | {step for step in ordered if is_epoch_end(step)}
    if resumable is not None:
        kept.add(resumable)
    return RetentionPlan(
        remove=[step for step in ordered if step not in kept],
        weights_only=[step for step in ordered if step in kept and step != resumable],
    )


def prune_checkpoints(
    checkpoints_dir: Path, *, keep: int, is_epoch_end: Callable[[int], bool], forget: Forget
) -> RetentionPlan:
    """Apply the retention rule to ``checkpoints_dir`` (see the module's docstring). A
    checkpoint's directory is removed only after ``forget`` has recorded it gone, so no record
    ever points at missing files; when it cannot (the database is away), the next pruning
    tries again."""
    remove_debris(checkpoints_dir)
    found = complete_checkpoints(checkpoints_dir)
    plan = plan_retention(
        found, resumable=_newest_resumable(found), keep=keep, is_epoch_end=is_epoch_end
    )
    resized = {
        step: tree_bytes(found[step])
        for step in plan.weights_only
        if remove_training_state(found[step])
    }
    if (plan.remove or resized) and forget(plan.remove, resized):
        for step in plan.remove:
            remove_checkpoint(found[step])
    return plan


def remove_training_state(path: Path) -> bool:
    """Keep a checkpoint's weights, drop what only a resume needs; True if there was any."""
    try:
        (path / STATE_FILE).unlink()
    except FileNotFoundError:
        return False
    return True


def remove_checkpoint(path: Path) -> None:
    """Remove a checkpoint directory; a crash at any point leaves no ``step-N`` directory that
    is not whole (see the module's docstring)."""
    trash = path.with_name(f".trash-{path.name}")
    shutil.rmtree(trash, ignore_errors=True)  # left by a crash while removing this step
    try:
        os.replace(path, trash)
    except FileNotFoundError:
        return
    fsync_path(path.parent)
    shutil.rmtree(trash, ignore_errors=True)


def remove_debris(checkpoints_dir: Path) -> None:
    """Remove what interrupted writes and removals left: ``.tmp-`` and ``.trash-`` directories
    and ``step-N`` directories without their marker. Only while no write is under way (the
    trainer between its checkpoints, or the job's trainer gone)."""
    if not checkpoints_dir.is_dir():
        return
    for child in checkpoints_dir.iterdir():
        unfinished = _STEP_DIR.match(child.name) and not (child / COMPLETE_MARKER).is_file()
        if _IN_PROGRESS.match(child.name) or unfinished:
            shutil.rmtree(child, ignore_errors=True)


def weights_only(checkpoints_dir: Path) -> dict[int, int]:
    """For a job that has ended well: every training state and all debris removed; returns
    step -> bytes of each complete checkpoint left."""
    remove_debris(checkpoints_dir)
    sizes = {}
    for step, path in complete_checkpoints(checkpoints_dir).items():
        remove_training_state(path)
        sizes[step] = tree_bytes(path)
    return sizes
