"""Helpers of the training tests: a reporter that records what the loop says, JSONL files, the
spec of a causal-LM run."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from worker.training.spec import TrainingSpec


@dataclass
class Reporter:
    """Records what the loop reports, with each message's level; stops when asked to."""

    stop_after_step: int | None = None
    messages: list[tuple[str, str]] = field(default_factory=list)
    metrics_events: list[dict[str, float | int]] = field(default_factory=list)
    step: int = 0

    def progress(self, step: int, total_steps: int) -> None:
        self.step = step

    def metrics(self, data: dict[str, float | int]) -> None:
        self.metrics_events.append(dict(data))

    def message(self, text: str, level: str = "info") -> None:
        self.messages.append((text, level))

    def checkpoint(self, step: int, path: Path, metrics: dict[str, float]) -> None:
        pass

    def checkpoints_pruned(self, removed: list[int], resized: dict[int, int]) -> bool:
        return True

    def should_stop(self) -> bool:
        return self.stop_after_step is not None and self.step >= self.stop_after_step

    def checkpoint_on_stop(self) -> bool:
        return False


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


# A random tiny model is no base for LoRA: with its norms and (tied) embeddings frozen at their
# initial scale, its logits cannot become confident, whatever the adapter learns. LoRA adapts a
# pretrained model; this makes one, cheaply, that already speaks the fact task's format but
# gives each keyword another keyword's code word.
PRETRAIN_HYPERPARAMETERS: dict[str, Any] = {"n_epochs": 30, "batch_size": 8, "learning_rate": 3e-3}


def pretrain_on_other_facts(base: Path, work_dir: Path) -> Path:
    """A full fine-tune of `base` on the fact task with the code words rotated by one; returns
    the directory of the resulting model (weights and tokenizer, with the chat template)."""
    from tests.support import FACTS, TRAIN_QUESTIONS, fact_chat_rows
    from worker.training.loop import train
    from worker.training.spec import TrainingSpec

    codes = list(FACTS.values())
    rotated = dict(zip(FACTS, codes[1:] + codes[:1], strict=True))
    rows = fact_chat_rows(TRAIN_QUESTIONS)
    for row in rows:
        messages = row["messages"]
        assert isinstance(messages, list)
        messages[-1]["content"] = rotated[next(k for k in FACTS if k in messages[-2]["content"])]
    spec = TrainingSpec(
        job_id="ftjob-pretrain",
        task="chat",
        base_model_dir=base,
        training_file=write_jsonl(work_dir / "other-facts.jsonl", rows),
        validation_file=None,
        output_dir=work_dir / "model",
        checkpoints_dir=work_dir / "checkpoints",
        hyperparameters=dict(PRETRAIN_HYPERPARAMETERS),
        seed=0,
    )
    train(spec, Reporter())
    return spec.output_dir


def make_spec(
    task: str,
    base: Path,
    training_file: Path,
    run_dir: Path,
    hyperparameters: dict[str, Any],
    validation_file: Path | None = None,
    adapter: Any = "full",
    *,
    method_type: str = "supervised",
) -> TrainingSpec:
    """A causal-LM run of ``method_type`` (supervised, dpo) with its adapter, in ``run_dir``."""
    return TrainingSpec(
        job_id=f"ftjob-{method_type}",
        task=task,
        base_model_dir=base,
        training_file=training_file,
        validation_file=validation_file,
        output_dir=run_dir / "model",
        checkpoints_dir=run_dir / "checkpoints",
        hyperparameters=hyperparameters,
        seed=0,
        method={"type": method_type, method_type: {"adapter": adapter}},
    )
