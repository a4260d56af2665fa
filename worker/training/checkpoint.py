"""Checkpoints that are either complete or absent.

A checkpoint is a directory `<checkpoints_dir>/step-N` holding the model in Hugging Face format
(safetensors), its tokenizer, and `training_state.pt`: everything else needed to resume exactly
(optimizer, scheduler, step, data-order position, RNG states). It is written into a temporary
directory beside the target, fsynced, renamed into place, and only then marked with a
`COMPLETE` file; a crash at any point leaves no directory that looks complete but is not, and a
write that fails (a full disk) leaves nothing at all. Which checkpoints stay on disk, and
removing the others, is `checkpoint_dirs.py`'s (no torch there: the worker's janitor uses it).

training_state.pt holds only tensors and plain containers, so it loads with
`torch.load(..., weights_only=True)`: nothing in a checkpoint is unpickled as code.
"""

from __future__ import annotations

import logging
import os
import random
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from app.core.storage import DiskFull, is_disk_full
from worker.training.checkpoint_dirs import (
    COMPLETE_MARKER,
    STATE_FILE,
    fsync_path,
    latest_complete_checkpoint,
)

__all__ = [
    "COMPLETE_MARKER",
    "STATE_FILE",
    "capture_rng_state",
    "latest_complete_checkpoint",
    "load_training_state",
    "restore_rng_state",
    "write_checkpoint",
]

logger = logging.getLogger(__name__)


def _fsync_tree(root: Path) -> None:
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            fsync_path(Path(dirpath) / name)
        fsync_path(Path(dirpath))


def write_checkpoint(
    checkpoints_dir: Path,
    step: int,
    save_model: Callable[[Path], None],
    training_state: dict[str, Any],
    *,
    delay: float = 0.0,
) -> Path:
    """Write `<checkpoints_dir>/step-<step>` atomically and return its path.

    `save_model(dir)` writes the model and tokenizer; `training_state` is saved beside them.
    `delay` (fault injection for the crash tests) waits that long with the files written but
    not yet renamed into place.
    """
    final = checkpoints_dir / f"step-{step}"
    tmp = checkpoints_dir / f".tmp-step-{step}"
    try:
        checkpoints_dir.mkdir(parents=True, exist_ok=True)
        if tmp.exists():  # left over by a crash while writing this same step
            shutil.rmtree(tmp)
        tmp.mkdir()
        save_model(tmp)
        torch.save(training_state, tmp / STATE_FILE)
        _fsync_tree(tmp)
        if delay:
            time.sleep(delay)
        if final.exists():  # an incomplete earlier attempt at this step: replace it whole
            shutil.rmtree(final)
        os.replace(tmp, final)
        fsync_path(checkpoints_dir)
        # The marker goes last: its presence is the only proof the directory is whole.
        marker = final / COMPLETE_MARKER
        with marker.open("w") as handle:
            handle.write(f"step {step}\n")
            handle.flush()
            os.fsync(handle.fileno())
        fsync_path(final)
    except Exception as exc:
        # Ask about the disk before freeing what the write took.
        full = is_disk_full(exc, checkpoints_dir)
        _remove_unfinished(tmp, final)
        if full:
            raise DiskFull(f"the checkpoint of step {step}") from exc
        raise
    logger.info("checkpoint written: %s", final)
    return final


def _remove_unfinished(tmp: Path, final: Path) -> None:
    """A failed write leaves nothing: neither its temporary directory nor a step directory
    without its marker (on a full disk, half-written checkpoints would pile up)."""
    shutil.rmtree(tmp, ignore_errors=True)
    if final.is_dir() and not (final / COMPLETE_MARKER).is_file():
        shutil.rmtree(final, ignore_errors=True)


def load_training_state(path: Path) -> dict[str, Any]:
    """The training state of the checkpoint directory `path` (tensors loaded on the CPU)."""
    if not (path / COMPLETE_MARKER).is_file():
        raise ValueError(f"{path} is not a complete checkpoint")
    return torch.load(path / STATE_FILE, map_location="cpu", weights_only=True)


def capture_rng_state(generator: torch.Generator) -> dict[str, Any]:
    """Every random stream a run draws from, as tensors and plain values."""
    np_state = np.random.get_state(legacy=False)  # a dict; its key array becomes a tensor
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {
            "bit_generator": np_state["bit_generator"],
            "key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
            "pos": int(np_state["state"]["pos"]),
            "has_gauss": int(np_state["has_gauss"]),
            "gauss": float(np_state["gauss"]),
        },
        "torch": torch.get_rng_state(),
        "data_generator": generator.get_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any], generator: torch.Generator) -> None:
    py_version, py_internal, py_gauss = state["python"]
    random.setstate((py_version, tuple(py_internal), py_gauss))
    np_state = state["numpy"]
    np.random.set_state(
        {
            "bit_generator": np_state["bit_generator"],
            "state": {"key": np_state["key"].numpy().astype(np.uint32), "pos": np_state["pos"]},
            "has_gauss": np_state["has_gauss"],
            "gauss": np_state["gauss"],
        }
    )
    torch.set_rng_state(state["torch"])
    generator.set_state(state["data_generator"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
