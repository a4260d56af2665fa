"""Checkpoints on disk stay bounded (issue 9, A13): a job checkpointing every step keeps the
newest few and each epoch's end, only the newest with its optimizer state; the records follow
the directories; a resume after pruning is still exact; removal is crash-safe; and a write that
fails on a full disk leaves nothing behind."""

from __future__ import annotations

import errno
import random
import shutil
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from app.core.storage import DiskFull, is_disk_full, tree_bytes
from tests.training.support import write_jsonl
from worker.training import checkpoint, checkpoint_dirs
from worker.training.checkpoint import write_checkpoint
from worker.training.checkpoint_dirs import (
    STATE_FILE,
    complete_checkpoints,
    latest_complete_checkpoint,
    plan_retention,
    prune_checkpoints,
    remove_checkpoint,
)
from worker.training.loop import train
from worker.training.spec import TrainingSpec, TrainingStopped

ROWS = 96  # 86 training rows after the held-out 10%: 6 steps of 16 per epoch
EPOCHS = 3
STEPS_PER_EPOCH = 6
KEEP = 2


@dataclass
class RowsReporter:
    """Keeps checkpoint records as the database does: added when written, forgotten or resized
    when pruned; `accept` False plays a database that is away."""

    stop_after_step: int | None = None
    accept: bool = True
    rows: dict[int, int] = field(default_factory=dict)  # step -> bytes
    step: int = 0

    def progress(self, step: int, total_steps: int) -> None:
        self.step = step

    def metrics(self, data: dict[str, float | int]) -> None:
        pass

    def message(self, text: str, level: str = "info") -> None:
        pass

    def checkpoint(self, step: int, path: Path, metrics: dict[str, float]) -> None:
        self.rows[step] = tree_bytes(path)

    def checkpoints_pruned(self, removed: list[int], resized: dict[int, int]) -> bool:
        if not self.accept:
            return False
        for step in removed:
            self.rows.pop(step, None)
        self.rows.update(resized)
        return True

    def should_stop(self) -> bool:
        return self.stop_after_step is not None and self.step >= self.stop_after_step

    def checkpoint_on_stop(self) -> bool:
        return False


@pytest.fixture(scope="module")
def rows_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    rng = random.Random(5)
    rows: list[dict[str, Any]] = []
    for _ in range(ROWS):
        x = [round(rng.uniform(-1, 1), 4) for _ in range(4)]
        rows.append({"features": x, "label": "up" if x[0] - x[1] > 0 else "down"})
    return write_jsonl(tmp_path_factory.mktemp("rows") / "train.jsonl", rows)


def make_spec(rows_file: Path, run_dir: Path, keep: int | None = KEEP) -> TrainingSpec:
    return TrainingSpec(
        job_id="ftjob-retention",
        task="tabular",
        base_model_dir=None,
        training_file=rows_file,
        validation_file=None,
        output_dir=run_dir / "model",
        checkpoints_dir=run_dir / "checkpoints",
        hyperparameters={
            "n_epochs": EPOCHS,
            "batch_size": 16,
            "learning_rate": 1e-2,
            "checkpoint_every_steps": 1,
        },
        seed=0,
        # Dropout draws from the RNG: a resume is exact only if its state came back too.
        method={"type": "supervised", "supervised": {"architecture": {"dropout": 0.2}}},
        keep_checkpoints=keep,
    )


def on_disk(checkpoints_dir: Path) -> dict[str, set[str]]:
    """Every entry of the checkpoints directory, with the files it holds."""
    return {child.name: {p.name for p in child.iterdir()} for child in checkpoints_dir.iterdir()}


def weights(model_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(model_dir / "model.safetensors")


def test_the_plan_keeps_the_newest_and_each_epochs_end() -> None:
    plan = plan_retention(range(1, 13), resumable=12, keep=3, is_epoch_end=lambda s: s % 4 == 0)
    assert plan.remove == [1, 2, 3, 5, 6, 7, 9]
    assert plan.weights_only == [4, 8, 10, 11]  # only step 12 keeps its training state
    # The newest that a resume can use is kept whatever `keep` says.
    plan = plan_retention([3, 5, 6], resumable=3, keep=1, is_epoch_end=lambda s: False)
    assert (plan.remove, plan.weights_only) == ([5], [6])


def test_checkpointing_every_step_keeps_what_the_rule_says(rows_file: Path, tmp_path: Path) -> None:
    spec = make_spec(rows_file, tmp_path)
    reporter = RowsReporter()
    train(spec, reporter)

    total = EPOCHS * STEPS_PER_EPOCH
    epoch_ends = {STEPS_PER_EPOCH * e for e in range(1, EPOCHS + 1)}
    kept = epoch_ends | {total - 1, total}
    assert on_disk(spec.checkpoints_dir).keys() == {f"step-{s}" for s in kept}
    for step in kept:  # each one whole, servable; the newest alone resumable
        files = on_disk(spec.checkpoints_dir)[f"step-{step}"]
        assert {"COMPLETE", "config.json", "model.safetensors"} <= files
        assert (STATE_FILE in files) == (step == total), (step, files)
    # The records follow the directories, with each one's size.
    assert reporter.rows == {
        step: tree_bytes(path) for step, path in complete_checkpoints(spec.checkpoints_dir).items()
    }


def test_a_resume_after_pruning_ends_with_the_same_model(rows_file: Path, tmp_path: Path) -> None:
    straight = make_spec(rows_file, tmp_path / "straight")
    train(straight, RowsReporter())

    run = make_spec(rows_file, tmp_path / "stopped")
    with pytest.raises(TrainingStopped):
        train(run, RowsReporter(stop_after_step=8))
    resume_from = latest_complete_checkpoint(run.checkpoints_dir)
    assert resume_from == run.checkpoints_dir / "step-8"
    assert not (run.checkpoints_dir / "step-7" / STATE_FILE).exists()  # pruned before the stop
    train(replace(run, resume_from=resume_from), RowsReporter())

    a, b = weights(straight.output_dir), weights(run.output_dir)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_files_go_only_once_their_records_are_gone(rows_file: Path, tmp_path: Path) -> None:
    spec = make_spec(rows_file, tmp_path, keep=None)  # every checkpoint, as before pruning
    reporter = RowsReporter()
    train(spec, reporter)
    everything = set(complete_checkpoints(spec.checkpoints_dir))
    assert len(everything) == EPOCHS * STEPS_PER_EPOCH

    def is_epoch_end(step: int) -> bool:
        return step % STEPS_PER_EPOCH == 0

    reporter.accept = False  # the database is away: nothing may leave the disk
    prune_checkpoints(
        spec.checkpoints_dir, keep=1, is_epoch_end=is_epoch_end, forget=reporter.checkpoints_pruned
    )
    assert set(complete_checkpoints(spec.checkpoints_dir)) == everything == set(reporter.rows)
    assert latest_complete_checkpoint(spec.checkpoints_dir) == spec.checkpoints_dir / "step-18"

    reporter.accept = True  # the next pruning goes through
    prune_checkpoints(
        spec.checkpoints_dir, keep=1, is_epoch_end=is_epoch_end, forget=reporter.checkpoints_pruned
    )
    assert set(complete_checkpoints(spec.checkpoints_dir)) == {6, 12, 18} == set(reporter.rows)


def test_a_crash_while_removing_leaves_nothing_that_looks_complete(
    rows_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = make_spec(rows_file, tmp_path, keep=None)
    with pytest.raises(TrainingStopped):
        train(spec, RowsReporter(stop_after_step=3))
    victim = spec.checkpoints_dir / "step-3"

    def dies_halfway(path: Path, ignore_errors: bool = False) -> None:
        if not path.exists():  # no trash left by an earlier crash
            return
        (path / "model.safetensors").unlink()  # one file gone, then the process dies
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint_dirs.shutil, "rmtree", dies_halfway)
    with pytest.raises(KeyboardInterrupt):
        remove_checkpoint(victim)
    monkeypatch.undo()

    # Half removed, but under a name nobody reads: step 2 is the newest complete checkpoint.
    assert sorted(on_disk(spec.checkpoints_dir)) == [".trash-step-3", "step-1", "step-2"]
    assert latest_complete_checkpoint(spec.checkpoints_dir) == spec.checkpoints_dir / "step-2"
    # A checkpoint written over an interrupted one is not mistaken for it either.
    (spec.checkpoints_dir / "step-4").mkdir()  # renamed into place, marker not yet written
    assert set(complete_checkpoints(spec.checkpoints_dir)) == {1, 2}
    # The next pruning clears what the crashes left.
    prune_checkpoints(
        spec.checkpoints_dir, keep=5, is_epoch_end=lambda s: False, forget=lambda *_: True
    )
    assert sorted(on_disk(spec.checkpoints_dir)) == ["step-1", "step-2"]


# ---- a full disk ---------------------------------------------------------------------------------


def save_small_model(directory: Path) -> None:
    (directory / "config.json").write_text("{}")
    (directory / "model.safetensors").write_bytes(b"\0" * 1024)


def full_disk(*_: object, **__: object) -> None:
    raise OSError(errno.ENOSPC, "No space left on device")


def test_a_full_disk_during_a_checkpoint_leaves_no_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    checkpoints_dir = tmp_path / "checkpoints"
    write_checkpoint(checkpoints_dir, 1, save_small_model, {"step": 1})
    monkeypatch.setattr(checkpoint.torch, "save", full_disk)
    with pytest.raises(DiskFull) as raised:
        write_checkpoint(checkpoints_dir, 2, save_small_model, {"step": 2})
    assert raised.value.errno == errno.ENOSPC and is_disk_full(raised.value)
    assert "disk is full" in str(raised.value) and str(tmp_path) not in str(raised.value)
    # The model files were written before the training state failed: they are gone too.
    assert sorted(on_disk(checkpoints_dir)) == ["step-1"]


def test_a_full_disk_when_marking_complete_leaves_no_half_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    checkpoints_dir = tmp_path / "checkpoints"
    real_fsync = checkpoint.fsync_path

    def fsync_fails_on_the_directory(path: Path) -> None:
        if path == checkpoints_dir:  # right after the rename, before the marker
            full_disk()
        real_fsync(path)

    monkeypatch.setattr(checkpoint, "fsync_path", fsync_fails_on_the_directory)
    with pytest.raises(DiskFull):
        write_checkpoint(checkpoints_dir, 1, save_small_model, {"step": 1})
    assert on_disk(checkpoints_dir) == {}


def test_torch_saying_only_write_failed_on_a_full_disk_is_a_full_disk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def torch_write_failed(*_: object, **__: object) -> None:
        raise RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed")

    checkpoints_dir = tmp_path / "checkpoints"
    monkeypatch.setattr(checkpoint.torch, "save", torch_write_failed)
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr("app.core.storage.shutil.disk_usage", lambda _: usage._replace(free=4096))
    with pytest.raises(DiskFull):
        write_checkpoint(checkpoints_dir, 1, save_small_model, {"step": 1})
    assert on_disk(checkpoints_dir) == {}
    # With room on the disk, the same error is what it says.
    monkeypatch.undo()
    monkeypatch.setattr(checkpoint.torch, "save", torch_write_failed)
    with pytest.raises(RuntimeError, match="file write failed"):
        write_checkpoint(checkpoints_dir, 1, save_small_model, {"step": 1})
    assert on_disk(checkpoints_dir) == {}
