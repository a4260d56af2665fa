"""Request and response shapes: OpenAI's, plus Tunehouse's additive extensions."""

from __future__ import annotations

import re
from typing import Annotated, Any, Generic, Literal, TypeVar

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator, model_validator

from app.core.defaults import (
    LORA_ALPHA,
    LORA_DROPOUT,
    LORA_R,
    MLP_ACTIVATION,
    MLP_DROPOUT,
    MLP_HIDDEN_SIZES,
    Activation,
)
from app.core.settings import QUEUE_NAME

T = TypeVar("T")

Auto = Literal["auto"]


class ListResponse(BaseModel, Generic[T]):
    object: Literal["list"] = "list"
    data: list[T]
    has_more: bool = False
    first_id: str | None = None
    last_id: str | None = None


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody


class DeletedResponse(BaseModel):
    id: str
    object: str
    deleted: bool = True


# ---- files -------------------------------------------------------------------------------


class FileObject(BaseModel):
    id: str
    object: Literal["file"] = "file"
    bytes: int
    created_at: int
    filename: str
    purpose: str
    status: Literal["uploaded", "processed", "error"]
    status_details: str | None = None
    expires_at: int | None = None
    # Extensions.
    sha256: str
    format: str | None = None
    stats: dict[str, Any] | None = None


# ---- fine-tuning ---------------------------------------------------------------------------


# As a request gives them; app/services/hyperparameters.py resolves them into the numbers the
# job stores (the worker's TrainingHyperparameters).
class HyperparametersRequest(BaseModel):
    """OpenAI's three (each may be "auto"), plus Tunehouse's training knobs."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, title="Hyperparameters")

    n_epochs: Auto | int | None = Field(default=None, description="1-50, or auto")
    batch_size: Auto | int | None = Field(default=None, description="1-256, or auto")
    learning_rate_multiplier: Auto | float | None = Field(default=None, description="> 0, or auto")
    learning_rate: float | None = Field(default=None, gt=0, le=1)
    warmup_ratio: float | None = Field(default=None, ge=0, lt=1)
    weight_decay: float | None = Field(default=None, ge=0, le=1)
    max_seq_length: int | None = Field(default=None, ge=8, le=8192)
    gradient_accumulation_steps: int | None = Field(
        default=None,
        ge=1,
        le=128,
        description="Micro-batches each batch is cut into (ignored when micro_batch_size is set)",
    )
    micro_batch_size: int | None = Field(
        default=None,
        ge=1,
        le=256,
        description="Rows per forward pass on each device; batch_size stays the rows per "
        "optimizer step, reached by gradient accumulation. Default: as many as fit",
    )
    precision: Literal["auto", "fp32", "bf16", "fp16"] | None = Field(
        default=None,
        description="auto: bf16 autocast on GPUs that support it, fp16 with a gradient scaler "
        "on older GPUs, fp32 on CPUs",
    )
    packing: bool | None = Field(
        default=None,
        description="Pack several chat, completion or text rows into each sequence, each "
        "attending only to itself. Default: on for those formats",
    )
    gradient_checkpointing: bool | None = Field(
        default=None, description="Recompute activations in the backward pass to save memory"
    )
    torch_compile: bool | None = Field(default=None, description="torch.compile the model")
    eval_every_steps: int | None = Field(default=None, ge=1, le=1_000_000)
    checkpoint_every_steps: int | None = Field(default=None, ge=1, le=1_000_000)
    max_grad_norm: float | None = Field(default=None, gt=0, le=1000)
    max_duration: int | None = Field(
        default=None,
        ge=1,
        le=30 * 24 * 3600,
        description="Seconds of training (over all attempts, pauses excluded) before the job "
        "fails with max_duration_exceeded",
    )

    @field_validator("n_epochs")
    @classmethod
    def _n_epochs(cls, v: Any) -> Any:
        if isinstance(v, int) and not 1 <= v <= 50:
            raise ValueError("n_epochs must be between 1 and 50")
        return v

    @field_validator("batch_size")
    @classmethod
    def _batch_size(cls, v: Any) -> Any:
        if isinstance(v, int) and not 1 <= v <= 256:
            raise ValueError("batch_size must be between 1 and 256")
        return v

    @field_validator("learning_rate_multiplier")
    @classmethod
    def _lr_multiplier(cls, v: Any) -> Any:
        if isinstance(v, float | int) and not 0 < v <= 100:
            raise ValueError("learning_rate_multiplier must be greater than 0 (at most 100)")
        return v


class LoraAdapter(BaseModel):
    """``method.supervised.adapter`` as a LoRA spec (the other choice is the string "full")."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    type: Literal["lora"]
    r: int = Field(default=LORA_R, ge=1, le=256)
    alpha: float = Field(default=LORA_ALPHA, gt=0, le=4096)
    dropout: float = Field(default=LORA_DROPOUT, ge=0, le=1)
    # None: the per-architecture default modules.
    target_modules: list[Annotated[str, Field(min_length=1, max_length=128)]] | None = Field(
        default=None, min_length=1, max_length=64
    )
    merge: bool = False


def _full_is_no_adapter(value: Any) -> Any:
    # "full" (the default) means no adapter; any other string is refused here so the error
    # points at the field itself rather than at a member of a union.
    if value == "full":
        return None
    if isinstance(value, str):
        raise ValueError('adapter must be \'full\' or a LoRA spec ({"type": "lora", ...})')
    return value


Adapter = Annotated[LoraAdapter | None, BeforeValidator(_full_is_no_adapter)]


class Architecture(BaseModel):
    """``method.supervised.architecture``: the layers of a model designed from scratch."""

    model_config = ConfigDict(extra="forbid")

    hidden_sizes: list[Annotated[int, Field(ge=1, le=4096)]] = Field(
        default_factory=lambda: list(MLP_HIDDEN_SIZES), min_length=1, max_length=8
    )
    activation: Activation = MLP_ACTIVATION
    dropout: float = Field(default=MLP_DROPOUT, ge=0, lt=1)


class SupervisedMethod(BaseModel):
    model_config = ConfigDict(extra="forbid")

    hyperparameters: HyperparametersRequest | None = None
    adapter: Adapter = Field(default=None, description='"full" (default) or a LoRA spec')
    architecture: Architecture | None = None


DpoLoss = Literal["sigmoid", "ipo", "simpo"]


class DpoHyperparametersRequest(HyperparametersRequest):
    """``method.dpo.hyperparameters``: OpenAI's (``beta`` and the three of every method), plus
    Tunehouse's training knobs and its DPO extensions (``loss``, ``rpo_alpha``,
    ``simpo_gamma``)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, title="DpoHyperparameters")

    beta: Auto | Annotated[float, Field(gt=0, le=100)] | None = Field(
        default=None,
        description="How far the model may move from the reference (the starting model): "
        "the scale of the log-ratios in the loss. auto: 0.1, as TRL's DPOConfig",
    )
    loss: DpoLoss | None = Field(
        default=None,
        description="sigmoid (default): DPO's loss; ipo: IPO's squared loss on length-averaged "
        "log-probs; simpo: SimPO's, with no reference model and a margin simpo_gamma",
    )
    rpo_alpha: float | None = Field(
        default=None,
        ge=0,
        le=100,
        description="Weight of an SFT term (the preferred output's mean token NLL) added to "
        "the loss (RPO). Default: none",
    )
    simpo_gamma: float | None = Field(
        default=None,
        ge=0,
        le=100,
        description="SimPO's target reward margin (loss simpo only). Default: 0.5, as TRL's",
    )


class DpoMethod(BaseModel):
    model_config = ConfigDict(extra="forbid")

    hyperparameters: DpoHyperparametersRequest | None = None
    adapter: Adapter = Field(default=None, description='"full" (default) or a LoRA spec')


class Method(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["supervised", "dpo"] = "supervised"
    supervised: SupervisedMethod | None = None
    dpo: DpoMethod | None = None

    @model_validator(mode="after")
    def _settings_of_its_type(self) -> Method:
        for other in ("supervised", "dpo"):
            if other != self.type and getattr(self, other) is not None:
                raise ValueError(
                    f"method.{other} is given but method.type is '{self.type}': give the "
                    f"settings of the method's own type (method.{self.type})"
                )
        return self


MAX_PROCESSES = 64


class Resources(BaseModel):
    """Tunehouse's ``resources``: where a job trains. ``device`` names the worker queue (a
    device kind) and ``processes`` how many processes train it together (torch.distributed,
    one per device); see docs/distributed.md."""

    model_config = ConfigDict(extra="forbid")

    # The pattern is stated for OpenAPI and checked by _queue_name, whose 400 says it in words.
    device: (
        Annotated[str, Field(json_schema_extra={"pattern": QUEUE_NAME, "maxLength": 63})] | None
    ) = Field(
        default=None,
        description='"cpu", "gpu" or another worker queue\'s name. Default: the server\'s '
        "default queue (TUNEHOUSE_DEFAULT_QUEUE)",
    )
    processes: int = Field(
        default=1,
        ge=1,
        le=MAX_PROCESSES,
        description="Processes that train the job together, one per device "
        "(DistributedDataParallel); at most the devices of one worker",
    )

    @field_validator("device")
    @classmethod
    def _queue_name(cls, v: str | None) -> str | None:
        if v is not None and not re.fullmatch(QUEUE_NAME, v):
            raise ValueError(
                "device must be 'cpu', 'gpu' or a worker queue's name: 1-63 lowercase letters, "
                "digits, '-' or '_', starting with a letter or digit"
            )
        return v


class WandbIntegration(BaseModel):
    """OpenAI's ``integrations[].wandb``: the W&B run the job's metrics go to."""

    model_config = ConfigDict(extra="forbid")

    project: str = Field(min_length=1, max_length=128)
    name: str | None = Field(default=None, min_length=1, max_length=128)
    entity: str | None = Field(default=None, min_length=1, max_length=128)
    tags: list[Annotated[str, Field(min_length=1, max_length=64)]] | None = Field(
        default=None, max_length=50
    )


class Integration(BaseModel):
    """One of ``integrations``: OpenAI's shape; "wandb" is the only type."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["wandb"]
    wandb: WandbIntegration


class JobCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1, max_length=256)
    training_file: str = Field(min_length=1, max_length=64)
    validation_file: str | None = Field(default=None, max_length=64)
    hyperparameters: HyperparametersRequest | None = None
    method: Method | None = None
    suffix: str | None = Field(default=None, min_length=1, max_length=64, pattern=r"^[\w.-]+$")
    seed: int | None = Field(default=None, ge=0, le=2**31 - 1)
    metadata: dict[str, str] | None = Field(default=None, max_length=16)
    integrations: list[Integration] | None = Field(
        default=None,
        max_length=4,
        description="A wandb integration logs the job's metrics to a W&B run (id: the job's "
        "id; name: wandb.name, else the job's id). It needs the wandb package and W&B "
        "configured (WANDB_API_KEY, or WANDB_MODE=offline) in the server's environment; "
        "without them the job is refused (400)",
    )
    # Extensions.
    resources: Resources | None = None
    parent_adapter: Literal["continue", "merge"] | None = Field(
        default=None,
        description="When model is a fine-tuned LoRA model (or one of its checkpoints): "
        '"continue" (default) trains its adapter further, over the same base model; "merge" '
        "folds it into its base and trains a new adapter over the merged weights (the new "
        "model is stored merged). Refused (400) for any other model",
    )

    @field_validator("metadata")
    @classmethod
    def _metadata(cls, v: dict[str, str] | None) -> dict[str, str] | None:
        for key, value in (v or {}).items():
            if len(key) > 64 or len(value) > 512:
                raise ValueError("metadata keys are at most 64 characters, values at most 512")
        return v


class JobError(BaseModel):
    code: str
    message: str
    param: str | None = None


class JobLineage(BaseModel):
    """Tunehouse's ``lineage`` of a job whose ``model`` is a fine-tuned model or checkpoint."""

    parent_model: str = Field(description="The fine-tuned model the job continues from")
    checkpoint_step: int | None = Field(
        default=None, description="The step of its checkpoint the job starts from, if one"
    )
    base_model: str = Field(
        description="The root base model: the new model's name keeps it, as OpenAI's does"
    )
    parent_adapter: Literal["continue", "merge"] | None = Field(
        default=None, description="How a LoRA parent's adapter is used; null for a full model"
    )


class JobObject(BaseModel):
    id: str
    object: Literal["fine_tuning.job"] = "fine_tuning.job"
    created_at: int
    error: JobError | None = None
    fine_tuned_model: str | None = None
    finished_at: int | None = None
    hyperparameters: dict[str, Any]
    model: str
    organization_id: str
    result_files: list[str]
    seed: int
    status: str
    trained_tokens: int | None = None
    training_file: str
    validation_file: str | None = None
    estimated_finish: int | None = None
    integrations: list[Integration] | None = None
    metadata: dict[str, str] | None = None
    method: dict[str, Any]
    suffix: str | None = None
    # Extensions.
    steps_completed: int = 0
    total_steps: int | None = None
    started_at: int | None = None
    attempt: int = 0
    # The queue the job goes to and its processes (null for jobs from before resources).
    resources: Resources | None = None
    # What the job trained on, e.g. "cuda:0 (NVIDIA H200)" or "2 × cpu (gloo)"; null until
    # training starts.
    device: str | None = None
    # The fine-tuned model the job continues from; null when model is a base model.
    lineage: JobLineage | None = None


class JobEventObject(BaseModel):
    id: str
    object: Literal["fine_tuning.job.event"] = "fine_tuning.job.event"
    created_at: int
    level: Literal["info", "warn", "error"]
    message: str
    type: Literal["message", "metrics"]
    data: dict[str, Any] | None = None


class CheckpointMetrics(BaseModel):
    """OpenAI's checkpoint metrics, each measured at the checkpoint's step or null. Tunehouse
    evaluates the whole validation set, so valid_* and full_valid_* hold the same figures;
    for classifiers (and tunehouse/mlp) *_mean_token_accuracy is the accuracy over rows.
    Training accuracy is not measured (null). Other keys the trainer stored follow."""

    model_config = ConfigDict(extra="allow")

    step: int
    train_loss: float | None = None
    train_mean_token_accuracy: float | None = None
    valid_loss: float | None = None
    valid_mean_token_accuracy: float | None = None
    full_valid_loss: float | None = None
    full_valid_mean_token_accuracy: float | None = None


class CheckpointObject(BaseModel):
    id: str
    object: Literal["fine_tuning.job.checkpoint"] = "fine_tuning.job.checkpoint"
    created_at: int
    fine_tuned_model_checkpoint: str
    fine_tuning_job_id: str
    step_number: int
    metrics: CheckpointMetrics


# ---- models --------------------------------------------------------------------


class ModelObject(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str
    # Extensions.
    task: str | None = None
    base_model: str | None = None
    job_id: str | None = None
    labels: list[str] | None = None
