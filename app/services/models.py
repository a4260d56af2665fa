"""Models: the base models this server may fine-tune, and each organization's fine-tuned ones."""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.core.errors import NotFound
from app.core.settings import Settings
from app.core.storage import Storage
from app.models import Checkpoint, FineTunedModel, Job, Organization

_CHECKPOINT_SUFFIX = re.compile(r"^(?P<model>.+):ckpt-step-(?P<step>\d+)$")
_SERVER_START = datetime.now().astimezone()


@dataclass(frozen=True)
class ModelInfo:
    id: str
    created: int
    owned_by: str
    task: str | None = None
    base_model: str | None = None
    job_id: str | None = None
    labels: list[str] | None = None


@dataclass(frozen=True)
class LoadableModel:
    """What an inference process needs to load and serve a model."""

    id: str
    task: str
    path: Path
    labels: list[str] | None


def _base_info(model_id: str) -> ModelInfo:
    return ModelInfo(
        id=model_id, created=int(_SERVER_START.timestamp()), owned_by="system", task="encoder"
    )


def _fine_tuned_info(model: FineTunedModel, org: Organization) -> ModelInfo:
    return ModelInfo(
        id=model.id,
        created=int(model.created_at.timestamp()),
        owned_by=org.name,
        task=model.task,
        base_model=model.base_model,
        job_id=model.job_id,
        labels=model.labels,
    )


def list_models(session: Session, settings: Settings, org: Organization) -> list[ModelInfo]:
    models = [_base_info(model_id) for model_id in settings.registered_base_models()]
    rows = session.scalars(
        select(FineTunedModel)
        .where(FineTunedModel.organization_id == org.id)
        .order_by(FineTunedModel.created_at.desc())
    )
    return models + [_fine_tuned_info(row, org) for row in rows]


def _fine_tuned(session: Session, org: Organization, model_id: str) -> FineTunedModel | None:
    return session.scalar(
        select(FineTunedModel).where(
            FineTunedModel.id == model_id, FineTunedModel.organization_id == org.id
        )
    )


def _not_found(model_id: str) -> NotFound:
    return NotFound(
        f"The model '{model_id}' does not exist or you do not have access to it.",
        param="model",
        code="model_not_found",
    )


def get_model(session: Session, settings: Settings, org: Organization, model_id: str) -> ModelInfo:
    if model_id in settings.registered_base_models():
        return _base_info(model_id)
    row = _fine_tuned(session, org, model_id)
    if row is None:
        raise _not_found(model_id)
    return _fine_tuned_info(row, org)


def delete_model(session: Session, storage: Storage, org: Organization, model_id: str) -> Path:
    """Delete a fine-tuned model's row; returns its directory for removal after commit."""
    row = _fine_tuned(session, org, model_id)
    if row is None:
        raise _not_found(model_id)
    path = storage.resolve(row.storage_path)
    session.delete(row)
    session.flush()
    return path


def resolve_loadable(
    session: Session, settings: Settings, storage: Storage, org: Organization, model_id: str
) -> LoadableModel:
    """Find a servable model: a fine-tuned model, one of its checkpoints, or a base model."""
    row = _fine_tuned(session, org, model_id)
    if row is not None:
        return LoadableModel(row.id, row.task, storage.resolve(row.storage_path), row.labels)
    match = _CHECKPOINT_SUFFIX.match(model_id)
    if match:
        parent = _fine_tuned(session, org, match["model"])
        if parent is not None:
            checkpoint = session.scalar(
                select(Checkpoint)
                .join(Job, Job.id == Checkpoint.job_id)
                .where(
                    Job.id == parent.job_id,
                    Job.organization_id == org.id,
                    Checkpoint.step_number == int(match["step"]),
                )
            )
            if checkpoint is not None:
                path = storage.resolve(checkpoint.storage_path)
                return LoadableModel(model_id, parent.task, path, parent.labels)
    base = settings.registered_base_models().get(model_id)
    if base is not None:
        return LoadableModel(model_id, "encoder", base, None)
    raise _not_found(model_id)
