"""ORM rows to contract shapes."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from app.models import Checkpoint, File, Job, JobEvent
from app.schemas import (
    CheckpointMetrics,
    CheckpointObject,
    FileObject,
    JobEventObject,
    JobObject,
    ListResponse,
    ModelObject,
    Resources,
)
from app.services.models import ModelInfo


def ts(value: datetime | None) -> int | None:
    return int(value.timestamp()) if value is not None else None


def file_object(file: File) -> FileObject:
    return FileObject(
        id=file.id,
        bytes=file.bytes,
        created_at=int(file.created_at.timestamp()),
        filename=file.filename,
        purpose=file.purpose,
        status=file.status,
        status_details=file.status_details,
        expires_at=ts(file.expires_at),
        sha256=file.sha256,
        format=file.format,
        stats=file.stats,
    )


def job_object(job: Job) -> JobObject:
    hp = job.hyperparameters
    return JobObject(
        id=job.id,
        created_at=int(job.created_at.timestamp()),
        error=job.error,
        fine_tuned_model=job.fine_tuned_model,
        finished_at=ts(job.finished_at),
        hyperparameters=hp,
        model=job.model,
        organization_id=job.organization_id,
        result_files=list(job.result_files or []),
        seed=job.seed,
        status=job.status,
        trained_tokens=job.trained_tokens,
        training_file=job.training_file,
        validation_file=job.validation_file,
        estimated_finish=ts(job.estimated_finish),
        integrations=list(job.integrations or []),
        metadata=job.metadata_,
        method=job.method,
        suffix=job.suffix,
        steps_completed=job.steps_completed,
        total_steps=job.total_steps,
        started_at=ts(job.started_at),
        attempt=job.attempt,
        resources=job_resources(job),
        device=job.device,
        lineage=job.lineage,
    )


def job_resources(job: Job) -> Resources | None:
    """The queue the job went to and its processes; None for a job from before queues."""
    if job.queue is None:
        return None
    return Resources(device=job.queue, processes=int((job.resources or {}).get("processes", 1)))


def event_object(event: JobEvent) -> JobEventObject:
    return JobEventObject(
        id=event.id,
        created_at=int(event.created_at.timestamp()),
        level=event.level,
        message=event.message,
        type=event.type,
        data=event.data,
    )


def checkpoint_object(checkpoint: Checkpoint, model_name: str) -> CheckpointObject:
    return CheckpointObject(
        id=checkpoint.id,
        created_at=int(checkpoint.created_at.timestamp()),
        fine_tuned_model_checkpoint=f"{model_name}:ckpt-step-{checkpoint.step_number}",
        fine_tuning_job_id=checkpoint.job_id,
        step_number=checkpoint.step_number,
        metrics=checkpoint_metrics(checkpoint.step_number, checkpoint.metrics or {}),
    )


def checkpoint_metrics(step: int, stored: dict[str, Any]) -> CheckpointMetrics:
    """OpenAI's key set from what the trainer stored: its evaluation covers the whole
    validation set, so it is both valid_* and full_valid_*; a classifier's accuracy (rows
    right) stands for the token accuracy. What was not measured stays null."""
    loss = stored.get("valid_loss")
    accuracy = stored.get("valid_mean_token_accuracy", stored.get("valid_accuracy"))
    return CheckpointMetrics(
        **{
            **stored,
            "step": step,
            "valid_loss": loss,
            "valid_mean_token_accuracy": accuracy,
            "full_valid_loss": stored.get("full_valid_loss", loss),
            "full_valid_mean_token_accuracy": stored.get(
                "full_valid_mean_token_accuracy", accuracy
            ),
        }
    )


def model_object(info: ModelInfo) -> ModelObject:
    return ModelObject(
        id=info.id,
        created=info.created,
        owned_by=info.owned_by,
        task=info.task,
        base_model=info.base_model,
        job_id=info.job_id,
        labels=info.labels,
    )


def list_response(data: list[Any], more: bool = False) -> ListResponse[Any]:
    return ListResponse(
        data=data,
        has_more=more,
        first_id=data[0].id if data else None,
        last_id=data[-1].id if data else None,
    )
