"""The loop on a process group of two (gloo on the CPU), as torchrun starts it for a job with
`resources.processes: 2`: the ranks share each batch and train the same weights as one process
would; rank 0 alone writes; a stop asked of rank 0 stops every rank at the same step; a run
resumed from the group's checkpoint ends with the weights of one that never stopped."""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tests.support import TRAIN_QUESTIONS, fact_chat_rows, fact_texts
from tests.tiny_models import build_causal_lm
from tests.training.support import Reporter, write_jsonl
from tests.training.test_batches_and_precision import assert_close_weights
from worker.training.loop import train
from worker.training.spec import TrainingSpec, TrainingStopped

HYPERPARAMETERS: dict[str, Any] = {
    "n_epochs": 2,
    "batch_size": 8,
    "learning_rate": 3e-3,
    "packing": False,
    "checkpoint_every_steps": 4,
}


class StoppingReporter(Reporter):
    """Stops after a step, saving a checkpoint first (a pause)."""

    def checkpoint_on_stop(self) -> bool:
        return True


def _rank(
    rank: int, world: int, init_file: str, spec: TrainingSpec, stop_after: int | None
) -> None:
    """One rank: join the group, train, report how it ended in a file of its own."""
    torch.set_num_threads(1)  # two ranks on two cores
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    outcome = spec.output_dir.parent / f"rank-{rank}.txt"
    # Only rank 0's reporter asks for the stop: the others learn of it from the group.
    reporter = StoppingReporter(stop_after_step=stop_after if rank == 0 else None)
    try:
        result = train(spec, reporter)
        outcome.write_text(f"finished {result.steps} {result.trained_tokens}")
    except TrainingStopped as stop:
        outcome.write_text(f"stopped {stop.step} {stop.checkpointed}")
    finally:
        dist.destroy_process_group()


def run_group(spec: TrainingSpec, tmp: Path, stop_after: int | None = None) -> list[str]:
    init_file = tmp / f"init-{os.urandom(4).hex()}"
    spec.output_dir.parent.mkdir(parents=True, exist_ok=True)
    mp.spawn(_rank, args=(2, str(init_file), spec, stop_after), nprocs=2, join=True)
    return [(spec.output_dir.parent / f"rank-{r}.txt").read_text() for r in range(2)]


def spec_for(base: Path, rows_file: Path, run_dir: Path) -> TrainingSpec:
    return TrainingSpec(
        job_id="ftjob-ddp",
        task="chat",
        base_model_dir=base,
        training_file=rows_file,
        validation_file=None,
        output_dir=run_dir / "model",
        checkpoints_dir=run_dir / "checkpoints",
        hyperparameters=dict(HYPERPARAMETERS),
        seed=0,
        resources={"processes": 2},
    )


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("ddp")
    base = build_causal_lm(root / "tiny-llama", fact_texts())
    # 27 rows: the last batch of each epoch (3 rows) is not a multiple of the group's size.
    rows = fact_chat_rows(TRAIN_QUESTIONS)[:27]
    return base, write_jsonl(root / "train.jsonl", rows)


@pytest.fixture(scope="module")
def two_processes(setup: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Any:
    base, rows_file = setup
    tmp = tmp_path_factory.mktemp("group")
    spec = spec_for(base, rows_file, tmp / "run")
    return spec, run_group(spec, tmp)


def test_two_processes_train_the_weights_one_process_trains(
    setup: tuple[Path, Path], two_processes: Any, tmp_path: Path
) -> None:
    base, rows_file = setup
    spec, outcomes = two_processes
    alone = replace(spec_for(base, rows_file, tmp_path / "alone"), resources={})
    result = train(alone, Reporter())

    assert outcomes == [f"finished {result.steps} {result.trained_tokens}"] * 2
    assert_close_weights(alone.output_dir, spec.output_dir)
    # Rank 0 alone wrote the model and the checkpoints.
    assert sorted(p.name for p in spec.checkpoints_dir.iterdir()) == [
        "step-4",
        "step-8",
    ]


def test_a_stop_reaches_every_rank_and_the_group_resumes_to_the_same_weights(
    setup: tuple[Path, Path], two_processes: Any, tmp_path: Path
) -> None:
    base, rows_file = setup
    whole, _ = two_processes
    spec = spec_for(base, rows_file, tmp_path / "run")
    outcomes = run_group(spec, tmp_path, stop_after=5)
    # Rank 1 was never asked to stop: it stopped at the same step, with the checkpoint saved.
    assert outcomes == ["stopped 5 True"] * 2
    assert (spec.checkpoints_dir / "step-5" / "COMPLETE").is_file()

    run_group(replace(spec, resume_from=spec.checkpoints_dir / "step-5"), tmp_path)
    assert_close_weights(whole.output_dir, spec.output_dir, atol=0.0)
