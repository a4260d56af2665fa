"""What a training run is given and what it hands back. No torch here: the worker's parent
process and the tests build these without loading PyTorch."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from app.services.lineage import Start


@dataclass(frozen=True)
class TrainingSpec:
    job_id: str
    task: str  # the dataset format (app/core/kinds.py), the task kind's name in the registry
    base_model_dir: Path | None  # a registered base model; None for a model built from scratch
    training_file: Path  # stored, already-validated dataset file
    validation_file: Path | None
    output_dir: Path  # final model (HF format) is written here
    checkpoints_dir: Path  # checkpoints go in step-N subdirectories here
    hyperparameters: dict[str, Any]  # resolved: n_epochs, batch_size, learning_rate, warmup_ratio,
    # weight_decay, max_seq_length, gradient_accumulation_steps,
    # eval_every_steps (int|None), max_grad_norm
    seed: int
    resume_from: Path | None = None
    # The job's method: {"type": "supervised", "supervised": {"adapter": "full" | {"type":
    # "lora", ...}, "architecture": {...}}} or {"type": "dpo", "dpo": {"adapter": ...}}; see
    # docs/model-kinds.md.
    method: dict[str, Any] = field(default_factory=dict)
    # Also checkpoint when this long has passed since the last checkpoint (None: never).
    checkpoint_every_seconds: float | None = None
    # The server's max_dataset_line_bytes: the files were validated with it.
    max_dataset_line_bytes: int | None = None
    # Fault injection for crash tests: a pause inside each checkpoint write, before its rename.
    debug_checkpoint_delay_seconds: float = 0.0
    # Checkpoints kept besides each epoch's end, newest first (checkpoint_dirs.py); None keeps
    # every one, with its training state.
    keep_checkpoints: int | None = None
    # The job's `resources`: {"device": "cpu" | "gpu" | <queue name>, "processes": int}; {} when
    # the job gave none (the worker's own device, one process).
    resources: dict[str, Any] = field(default_factory=dict)
    # The job's model id (a base, or the model it continues from) and `integrations` (OpenAI's
    # shape: [{"type": "wandb", "wandb": {...}}]), for the trainer's W&B run.
    model: str = ""
    integrations: list[dict[str, Any]] = field(default_factory=list)

    @property
    def method_settings(self) -> dict[str, Any]:
        """The settings of the job's method type: method.supervised, or method.dpo for a DPO
        job ({} when the job gave none)."""
        if not isinstance(self.method, dict):
            return {}
        settings = self.method.get(self.method.get("type") or "supervised")
        return settings if isinstance(settings, dict) else self.supervised

    # The fine-tuned model (or checkpoint) the job continues from (app/services/lineage.py);
    # None for a job on a base model. base_model_dir is then the parent's own directory for a
    # full model, the root base's for a LoRA adapter, None for a tabular model.
    parent: Start | None = None

    @property
    def supervised(self) -> dict[str, Any]:
        """The method's supervised settings ({} when the job gave none)."""
        settings = self.method.get("supervised") if isinstance(self.method, dict) else None
        return settings if isinstance(settings, dict) else {}

    def require_base_model_dir(self) -> Path:
        if self.base_model_dir is None:
            raise ValueError(f"task {self.task!r} needs a base model directory")
        # The base may have changed since the job was accepted: check it again, unloaded.
        from app.services.models import unsafe_weights

        problem = unsafe_weights(self.base_model_dir)
        if problem:
            raise ValueError(f"the base model cannot be loaded: {problem}")
        return self.base_model_dir


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
    def checkpoints_pruned(
        self, removed: list[int], resized: dict[int, int]
    ) -> bool: ...  # the checkpoints of `removed` steps are about to be deleted, those in `resized` lost their training state (step -> bytes left): record it; True once recorded  # noqa: E501
    def should_stop(self) -> bool: ...  # polled each step; True => raise TrainingStopped
    def checkpoint_on_stop(
        self,
    ) -> bool: ...  # asked once stopping: save a checkpoint first (pause, shutdown)?


@dataclass
class TrainingResult:
    labels: list[str]  # class names in id order; [] for generative kinds
    metrics_history: list[dict[str, float | int]]  # one dict per metrics event, for the result CSV
    final_metrics: dict[str, float]  # last evaluation (valid_loss, valid_accuracy, ...)  # noqa: E501
    trained_tokens: int  # non-padding tokens seen in training, all epochs (rows for tabular)
    steps: int
    model_kind: str  # the stored model's kind (app/core/kinds.py)
    adapter: bool  # the stored model is a LoRA adapter of the base, not a full model


class DeadlineExceeded(Exception):
    """Training ran past the job's ``max_duration``."""

    def __init__(self, step: int, total_steps: int, seconds: float):
        super().__init__(
            f"Training ran past max_duration ({seconds:g} s) at step {step} of {total_steps}; "
            "raise max_duration, or train fewer epochs or rows."
        )


class TrainingStopped(Exception):
    """The reporter asked the run to stop (cancel, pause, shutdown) at ``step``; with
    ``checkpointed`` a checkpoint of that very step was saved first."""

    def __init__(self, step: int, total_steps: int, checkpointed: bool):
        super().__init__(
            f"stopped at step {step} of {total_steps}"
            + (" after saving a checkpoint" if checkpointed else "")
        )
        self.step, self.total_steps, self.checkpointed = step, total_steps, checkpointed


@dataclass(frozen=True)
class TrainingHyperparameters:
    """The resolved hyperparameters the loop reads, typed. Keys the loop does not use yet
    (early_stopping_patience, adapter settings) are ignored here. A job's values were resolved
    when it was created (app/services/hyperparameters.py); these defaults only fill in for a
    spec built by hand (tests, benchmarks)."""

    n_epochs: int = 3  # full passes over the training rows
    batch_size: int = 16  # rows per optimizer step (the effective batch, over every process)
    learning_rate: float = 5e-5  # peak LR, reached at the end of warmup
    warmup_ratio: float = 0.0  # share of optimizer steps spent warming up
    weight_decay: float = 0.0  # AdamW decay, never on biases or LayerNorm
    max_seq_length: int = 128  # longer texts are truncated
    # The effective batch is cut into micro-batches of micro_batch_size rows (per process);
    # without it, into gradient_accumulation_steps micro-batches; without either, the
    # micro-batch is as big as memory allows (the whole batch on a CPU).
    gradient_accumulation_steps: int = 1
    micro_batch_size: int | None = None
    precision: str = "auto"  # "auto" | "fp32" | "bf16" | "fp16" (autocast; fp16 with a scaler)
    packing: bool | None = None  # several short rows per sequence; None: where the kind can
    gradient_checkpointing: bool = False  # recompute activations in backward: less memory
    torch_compile: bool = False  # torch.compile the model before training
    eval_every_steps: int | None = None  # extra evaluations between epoch ends
    checkpoint_every_steps: int | None = None  # extra checkpoints between epoch ends
    max_grad_norm: float = 1.0  # clip the global gradient norm to this
    max_duration: float | None = None  # seconds of training, all attempts, before giving up

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainingHyperparameters:
        known = {f.name for f in fields(cls)}
        chosen = {k: v for k, v in values.items() if k in known and v is not None}
        hp = cls(**chosen)
        for name in ("n_epochs", "batch_size", "max_seq_length", "gradient_accumulation_steps"):
            if int(getattr(hp, name)) < 1:
                raise ValueError(f"hyperparameter {name} must be at least 1")
        if hp.micro_batch_size is not None and hp.micro_batch_size < 1:
            raise ValueError("hyperparameter micro_batch_size must be at least 1")
        if hp.precision not in PRECISIONS:
            raise ValueError(f"hyperparameter precision must be one of {', '.join(PRECISIONS)}")
        return hp


PRECISIONS = ("auto", "fp32", "bf16", "fp16")
