"""What a training run is given and what it hands back. No torch here: the worker's parent
process and the tests build these without loading PyTorch."""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Protocol


@dataclass(frozen=True)
class TrainingSpec:
    job_id: str
    task: str  # task-kind name in the registry, e.g. "classification"
    base_model_dir: Path
    training_file: Path  # stored, already-validated dataset file
    validation_file: Path | None
    output_dir: Path  # final model (HF format) is written here
    checkpoints_dir: Path  # checkpoints go in step-N subdirectories here
    hyperparameters: dict[str, Any]  # resolved: n_epochs, batch_size, learning_rate, warmup_ratio,
    # weight_decay, max_seq_length, gradient_accumulation_steps,
    # eval_every_steps (int|None), max_grad_norm
    seed: int
    resume_from: Path | None = None


class Reporter(Protocol):
    def progress(
        self, step: int, total_steps: int
    ) -> None: ...  # called after every optimizer step (and once with step=0 before training); must be cheap  # noqa: E501
    def metrics(
        self, data: dict[str, float | int]
    ) -> None: ...  # one "metrics" event (at least every 10 steps and after each evaluation)  # noqa: E501
    def message(self, text: str, level: str = "info") -> None: ...  # a message event
    def checkpoint(
        self, step: int, path: Path, metrics: dict[str, float]
    ) -> None: ...  # a complete checkpoint exists at path  # noqa: E501
    def should_stop(self) -> bool: ...  # polled each step; True => raise TrainingStopped


@dataclass
class TrainingResult:
    labels: list[str]
    metrics_history: list[dict[str, float | int]]  # one dict per metrics event, for the result CSV
    final_metrics: dict[str, float]  # last evaluation (valid_loss, valid_accuracy, ...)  # noqa: E501
    trained_tokens: int  # non-padding tokens seen in training, all epochs  # noqa: E501
    steps: int


class TrainingStopped(Exception):
    """The reporter asked the run to stop (cancel or pause); the last checkpoint stands."""


@dataclass(frozen=True)
class Hyperparameters:
    """The resolved hyperparameters the loop reads, typed. Keys the loop does not use yet
    (precision, early_stopping_patience, adapter settings) are ignored here."""

    n_epochs: int = 3  # full passes over the training rows
    batch_size: int = 16  # rows per forward pass (micro-batch)
    learning_rate: float = 5e-5  # peak LR, reached at the end of warmup
    warmup_ratio: float = 0.0  # share of optimizer steps spent warming up
    weight_decay: float = 0.0  # AdamW decay, never on biases or LayerNorm
    max_seq_length: int = 128  # longer texts are truncated
    gradient_accumulation_steps: int = 1  # micro-batches per optimizer step
    eval_every_steps: int | None = None  # extra evaluations between epoch ends
    checkpoint_every_steps: int | None = None  # extra checkpoints between epoch ends
    max_grad_norm: float = 1.0  # clip the global gradient norm to this

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> Hyperparameters:
        known = {f.name for f in fields(cls)}
        chosen = {k: v for k, v in values.items() if k in known and v is not None}
        hp = cls(**chosen)
        for name in ("n_epochs", "batch_size", "max_seq_length", "gradient_accumulation_steps"):
            if int(getattr(hp, name)) < 1:
                raise ValueError(f"hyperparameter {name} must be at least 1")
        return hp
