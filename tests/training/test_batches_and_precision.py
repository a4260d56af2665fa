"""The effective batch and precision: `batch_size` rows per optimizer step however they are cut
into micro-batches, fp16 with a gradient scaler that resumes exactly, bf16 on the CPU, and the
figures every job reports (tokens/s, peak memory).

A tiny Llama without dropout is deterministic, so two runs that compute the same gradients end
with the same weights to within float rounding."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from tests.support import TRAIN_QUESTIONS, fact_chat_rows, fact_texts
from tests.tiny_models import build_causal_lm
from tests.training.support import Reporter, write_jsonl
from worker.training.checkpoint import load_training_state
from worker.training.loop import train
from worker.training.spec import TrainingSpec, TrainingStopped

HYPERPARAMETERS: dict[str, Any] = {
    "n_epochs": 2,
    "batch_size": 8,
    "learning_rate": 3e-3,
    "packing": False,  # one conversation per row: the micro-batches differ in token counts
}


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_causal_lm(tmp_path_factory.mktemp("bases") / "tiny-llama", fact_texts())


@pytest.fixture(scope="module")
def rows_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    rows = fact_chat_rows(TRAIN_QUESTIONS)
    return write_jsonl(tmp_path_factory.mktemp("data") / "train.jsonl", rows)


def spec_for(base: Path, rows_file: Path, run_dir: Path, **hp: Any) -> TrainingSpec:
    return TrainingSpec(
        job_id="ftjob-batches",
        task="chat",
        base_model_dir=base,
        training_file=rows_file,
        validation_file=None,
        output_dir=run_dir / "model",
        checkpoints_dir=run_dir / "checkpoints",
        hyperparameters={**HYPERPARAMETERS, **hp},
        seed=0,
    )


def weights(model_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(model_dir / "model.safetensors")


def assert_close_weights(a: Path, b: Path, atol: float = 2e-5) -> None:
    first, second = weights(a), weights(b)
    assert first.keys() == second.keys()
    for name in first:
        assert torch.allclose(first[name], second[name], atol=atol, rtol=1e-4), name


@pytest.fixture(scope="module")
def whole_batches(base: Path, rows_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Any:
    spec = spec_for(base, rows_file, tmp_path_factory.mktemp("whole"))
    reporter = Reporter()
    return spec, reporter, train(spec, reporter)


@pytest.mark.parametrize(
    "split",
    [{"micro_batch_size": 3}, {"gradient_accumulation_steps": 4}, {"micro_batch_size": 1}],
    ids=["micro-3", "accumulate-4", "micro-1"],
)
def test_the_split_into_micro_batches_does_not_change_the_weights(
    whole_batches: Any, base: Path, rows_file: Path, tmp_path: Path, split: dict[str, int]
) -> None:
    spec, _, result = whole_batches
    cut = spec_for(base, rows_file, tmp_path, **split)
    reporter = Reporter()
    cut_result = train(cut, reporter)

    # batch_size is the effective batch: the same number of optimizer steps either way.
    assert cut_result.steps == result.steps
    assert cut_result.trained_tokens == result.trained_tokens
    assert_close_weights(spec.output_dir, cut.output_dir)
    rows = 3 if split.get("micro_batch_size") == 3 else 1 if "micro_batch_size" in split else 2
    assert any(f"{rows} rows per forward pass" in text for text, _ in reporter.messages)
    losses = [e["train_loss"] for e in result.metrics_history]
    assert [e["train_loss"] for e in cut_result.metrics_history] == pytest.approx(losses, rel=1e-4)


def test_every_metrics_event_reports_throughput_and_peak_memory(whole_batches: Any) -> None:
    _, reporter, result = whole_batches
    assert reporter.metrics_events
    for event in reporter.metrics_events:
        assert event["samples_per_second"] >= event["steps_per_second"] > 0  # rows per step
        assert event["tokens_per_second"] > event["samples_per_second"]  # rows have many tokens
        assert event["peak_memory_bytes"] > 50 * 2**20  # at least torch's own resident memory
        assert "mfu" not in event  # only on a GPU whose peak is known
    started = next(text for text, _ in reporter.messages if text.startswith("training chat"))
    assert " on cpu in fp32" in started
    assert result.trained_tokens > 0


def test_a_run_in_micro_batches_resumes_exactly(
    base: Path, rows_file: Path, tmp_path: Path
) -> None:
    whole = spec_for(base, rows_file, tmp_path / "whole", micro_batch_size=3)
    train(whole, Reporter())
    run = spec_for(
        base, rows_file, tmp_path / "stopped", micro_batch_size=3, checkpoint_every_steps=5
    )
    with pytest.raises(TrainingStopped):
        train(run, Reporter(stop_after_step=7))
    train(replace(run, resume_from=run.checkpoints_dir / "step-5"), Reporter())
    assert_close_weights(whole.output_dir, run.output_dir, atol=0.0)


def test_fp16_resumes_exactly_with_its_gradient_scaler(
    base: Path, rows_file: Path, tmp_path: Path
) -> None:
    """fp16 autocast with a scaler (allowed on the CPU): a run resumed from a checkpoint ends
    with the same weights as one that never stopped, because the scaler's state (its loss scale
    and growth tracker) is in the checkpoint."""
    whole = spec_for(base, rows_file, tmp_path / "whole", precision="fp16")
    reporter = Reporter()
    train(whole, reporter)
    assert any(" in fp16" in text for text, _ in reporter.messages)

    run = spec_for(
        base, rows_file, tmp_path / "stopped", precision="fp16", checkpoint_every_steps=3
    )
    with pytest.raises(TrainingStopped):
        train(run, Reporter(stop_after_step=4))
    checkpoint = run.checkpoints_dir / "step-3"
    scaler = load_training_state(checkpoint)["scaler"]
    # The scaler backed off from its initial 2**16 after an overflow: a resume that started
    # from a fresh scaler would skip another step and end elsewhere.
    assert 0 < scaler["scale"] < 2.0**16 and "_growth_tracker" in scaler
    train(replace(run, resume_from=checkpoint), Reporter())
    assert_close_weights(whole.output_dir, run.output_dir, atol=0.0)


def test_bf16_autocast_on_the_cpu_trains(base: Path, rows_file: Path, tmp_path: Path) -> None:
    spec = spec_for(base, rows_file, tmp_path, precision="bf16", n_epochs=3)
    reporter = Reporter()
    result = train(spec, reporter)
    assert any(" in bf16" in text for text, _ in reporter.messages)
    losses = [e["train_loss"] for e in result.metrics_history]
    assert losses[-1] < losses[0] * 0.8, losses
    # The weights stay float32: autocast computes in bf16, AdamW updates in full precision.
    assert all(t.dtype == torch.float32 for t in weights(spec.output_dir).values())


def test_the_last_steps_checkpoint_skips_the_optimizer_and_resumes_to_the_final_model(
    whole_batches: Any, tmp_path: Path
) -> None:
    spec, _, result = whole_batches
    first_epoch = load_training_state(spec.checkpoints_dir / f"step-{result.steps // 2}")
    last = spec.checkpoints_dir / f"step-{result.steps}"
    assert first_epoch["optimizer"] is not None  # training goes on from there
    assert load_training_state(last)["optimizer"] is None  # nothing is left to optimize

    resumed = replace(spec, output_dir=tmp_path / "model", resume_from=last)
    again = train(resumed, Reporter())
    assert again.steps == result.steps and again.final_metrics == result.final_metrics
    assert_close_weights(spec.output_dir, resumed.output_dir, atol=0.0)
