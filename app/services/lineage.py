"""Continuing from a fine-tuned model: a job's ``model`` may be one of the organization's
fine-tuned models, or one of their checkpoints (``<model>:ckpt-step-N``), as OpenAI allows.

The model is resolved the same way whatever the job's method: ``resolve_job_model`` says which
base model the job's weights descend from (the root base: the new model's name keeps it, as
OpenAI's does) and which fine-tuned weights it starts from. The job stores that as its
``lineage``; its ``model`` stays as the user gave it. No torch here: the trainer reads the
weights (``worker/training``), this module only finds them.

What a new job starts from, by the parent's kind (docs/model-kinds.md):
- a full model (classifier, causal LM, tabular MLP, a merged LoRA model): its weights. A LoRA
  job on such a parent trains an adapter over those weights, and stores the merged model,
  since its base exists nowhere but in the parent.
- a LoRA adapter: by default the job continues that adapter, over the same root base, and
  stores an adapter of the root base (``parent_adapter: "continue"``). With
  ``parent_adapter: "merge"`` the parent's adapter is folded into its base
  (``merge_and_unload``) and a new adapter trains over the merged weights; the merged model is
  stored. Full fine-tuning (adapter "full") of a LoRA parent trains the merged weights.

So every model a job stores holds full weights, or is an adapter of its root base only:
deleting a parent never breaks a child. A parent cannot be deleted while a job that continues
from it is still active (409), since that job reads the parent's weights when it starts.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import or_, select
from sqlalchemy.orm import Session

from app.core.errors import Conflict, InvalidRequest, NotFound
from app.core.kinds import (
    FORMAT_CLASSIFICATION,
    FORMAT_TABULAR,
    KIND_CAUSAL_LM,
    KIND_CLASSIFICATION,
    KIND_ENCODER,
    KIND_TABULAR,
    model_kind,
)
from app.core.settings import Settings
from app.core.storage import Storage
from app.models import Checkpoint, FineTunedModel, Job, Organization
from app.schemas import LoraAdapter
from app.services.models import (
    ADAPTER_CONFIG,
    CONTINUE,
    MERGE,
    UPLOADED,
    adapter_of_root_base,
    base_kind,
    uploaded_base_kind,
)

CHECKPOINT_NAME = re.compile(r"^(?P<model>.+):ckpt-step-(?P<step>\d+)$")
# The statuses of a job that may still read its parent's weights (jobs.ACTIVE).
_ACTIVE = ("validating_files", "queued", "running", "paused")


@dataclass(frozen=True)
class Parent:
    """The fine-tuned weights a job starts from: a model, or one of its checkpoints."""

    model: str  # the fine-tuned model's id (without the checkpoint suffix)
    checkpoint_step: int | None
    kind: str  # its model kind: classification, causal-lm or tabular
    base: str  # the root base model its line descends from
    labels: list[str] | None
    storage_path: str  # the weights' directory, relative to the storage root
    adapter: bool  # that directory holds a LoRA adapter of ``base``


@dataclass(frozen=True)
class JobModel:
    """A job's ``model``, resolved: a base model, or fine-tuned weights of its organization."""

    requested: str
    base: str  # the root base model (the model itself for a base model)
    kind: str  # the root base's kind (encoder, causal-lm, tabular)
    parent: Parent | None = None


def _not_found(model_id: str) -> NotFound:
    return NotFound(
        f"The model '{model_id}' does not exist or you do not have access to it.",
        param="model",
        code="model_not_found",
    )


def _fine_tuned(session: Session, org_id: str, model_id: str) -> FineTunedModel | None:
    """One of the organization's trained models (an uploaded base model is not one)."""
    return session.scalar(
        select(FineTunedModel).where(
            FineTunedModel.id == model_id,
            FineTunedModel.organization_id == org_id,
            FineTunedModel.job_id != UPLOADED,
        )
    )


def find_parent(session: Session, settings: Settings, org_id: str, model_id: str) -> Parent | None:
    """The organization's fine-tuned model or checkpoint named ``model_id``; None when there
    is none (another organization's model is none). Raises InvalidRequest for a checkpoint
    that cannot be started from."""
    row = _fine_tuned(session, org_id, model_id)
    step: int | None = None
    storage_path = row.storage_path if row is not None else None
    if row is None:
        match = CHECKPOINT_NAME.match(model_id)
        row = _fine_tuned(session, org_id, match["model"]) if match else None
        if row is None or match is None:
            return None
        step = int(match["step"])
        storage_path = session.scalar(
            select(Checkpoint.storage_path).where(
                Checkpoint.job_id == row.job_id, Checkpoint.step_number == step
            )
        )
        if storage_path is None:
            return None
    assert storage_path is not None
    adapter = (Storage(settings.storage_root).resolve(storage_path) / ADAPTER_CONFIG).is_file()
    if step is not None and adapter and not adapter_of_root_base(session, row.job_id):
        raise InvalidRequest(
            f"Checkpoint '{model_id}' holds a LoRA adapter of weights that were merged for its "
            f"job, not of its base model; continue from '{row.id}' instead.",
            param="model",
            code="model_not_available",
        )
    return Parent(
        model=row.id,
        checkpoint_step=step,
        kind=model_kind(row.task),
        base=row.base_model,
        labels=list(row.labels) if row.labels else None,
        storage_path=storage_path,
        adapter=adapter,
    )


def resolve_job_model(
    session: Session, settings: Settings, org: Organization, model_id: str
) -> JobModel:
    """What a new job's ``model`` names, whatever the job's method: a base model (registered,
    or uploaded by the organization), or one of the organization's fine-tuned models or
    checkpoints. An unknown ``ft:`` name, another organization's model or a deleted one is a
    404 (``model_not_found``); any other unknown name a 400 (``model_not_available``)."""
    kind = base_kind(settings, model_id) or uploaded_base_kind(session, org, model_id)
    if kind is not None:
        return JobModel(requested=model_id, base=model_id, kind=kind)
    parent = find_parent(session, settings, org.id, model_id)
    if parent is None:
        if model_id.startswith("ft:"):
            raise _not_found(model_id)
        raise InvalidRequest(
            f"Model '{model_id}' is not available for fine-tuning on this server; "
            "GET /v1/models lists the base models.",
            param="model",
            code="model_not_available",
        )
    root_kind = _root_kind(session, settings, org, parent)
    return JobModel(requested=model_id, base=parent.base, kind=root_kind, parent=parent)


def _root_kind(session: Session, settings: Settings, org: Organization, parent: Parent) -> str:
    """The root base's kind. An adapter needs its base on this server; a full model holds
    everything it needs, so its kind stands in when the base is gone."""
    try:
        kind = base_kind(settings, parent.base) or uploaded_base_kind(session, org, parent.base)
    except InvalidRequest:
        kind = None
    if kind is not None:
        return kind
    if parent.adapter:
        raise InvalidRequest(
            f"Model '{parent.model}' is a LoRA adapter of '{parent.base}', which is no longer "
            "available on this server.",
            param="model",
            code="model_not_available",
        )
    return {KIND_CLASSIFICATION: KIND_ENCODER}.get(parent.kind, parent.kind)


def check_parent_for_task(parent: Parent, task: str) -> None:
    """A parent continues on rows of the task it was trained for: a classifier on labelled
    texts, a causal LM on generative rows, a tabular model on tabular rows."""
    needed = {FORMAT_CLASSIFICATION: KIND_CLASSIFICATION, FORMAT_TABULAR: KIND_TABULAR}.get(
        task, KIND_CAUSAL_LM
    )
    if parent.kind != needed:
        raise InvalidRequest(
            f"Model '{parent.model}' is a {parent.kind} model; {task} rows continue a "
            f"{needed} model.",
            param="model",
        )


# ---- the adapter of a continued job ---------------------------------------------------------


def _parent_lora(settings: Settings, parent: Parent) -> dict[str, Any]:
    """The parent adapter's shape, from its adapter_config.json (peft's names)."""
    path = Storage(settings.storage_root).resolve(parent.storage_path) / ADAPTER_CONFIG
    config = json.loads(path.read_text(encoding="utf-8"))
    targets = config.get("target_modules")
    return {
        "r": int(config["r"]),
        "alpha": float(config["lora_alpha"]),
        "dropout": float(config.get("lora_dropout") or 0.0),
        "target_modules": sorted(targets) if isinstance(targets, list | set) else None,
    }


def continued_adapter(
    settings: Settings,
    parent: Parent,
    requested: LoraAdapter | None,
    requested_fields: set[str],
    mode: str | None,
    *,
    param: str = "method.supervised.adapter",
) -> LoraAdapter | None:
    """The adapter a job continuing from ``parent`` trains (None: full fine-tuning), from the
    request's (``requested``; ``requested_fields``: the fields it gave, "adapter" among them
    when it gave one) and its ``parent_adapter`` ``mode``. Raises InvalidRequest when they ask
    for something that cannot be."""
    explicit = "adapter" in requested_fields
    if not parent.adapter:
        if mode is not None:
            raise InvalidRequest(
                f"parent_adapter applies when model is a LoRA model; '{parent.model}' holds "
                "full weights.",
                param="parent_adapter",
            )
        return _merged(requested, param) if requested is not None else None
    if explicit and requested is None:  # "full": every weight of the merged parent trains
        if mode == CONTINUE:
            raise InvalidRequest(
                'parent_adapter "continue" trains the parent\'s adapter; adapter "full" '
                'trains every weight. Use parent_adapter "merge" or leave it out.',
                param="parent_adapter",
            )
        return None
    if (mode or CONTINUE) == MERGE:
        return _merged(requested or LoraAdapter(type="lora"), param)
    shape = _parent_lora(settings, parent)
    given = requested.model_fields_set if requested is not None else set()
    for field, value in shape.items():
        asked = getattr(requested, field, None)
        if field in given and asked is not None and _differs(asked, value):
            raise InvalidRequest(
                f"The adapter of '{parent.model}' has {field}={value}; continuing it keeps "
                f'its shape. Leave {field} out, or set parent_adapter "merge" to train a new '
                "adapter over the merged weights.",
                param=f"{param}.{field}",
            )
    merge = requested.merge if requested is not None else False
    return LoraAdapter(type="lora", **shape, merge=merge)


def _differs(asked: Any, value: Any) -> bool:
    if isinstance(asked, list):
        return sorted(asked) != value
    return bool(asked != value)


def _merged(adapter: LoraAdapter, param: str) -> LoraAdapter:
    """A LoRA adapter over fine-tuned weights is stored merged: no base model holds its base."""
    if "merge" in adapter.model_fields_set and not adapter.merge:
        raise InvalidRequest(
            "An adapter trained over a fine-tuned model's weights is stored merged into them "
            "(its base is no base model); leave merge out or set it to true.",
            param=f"{param}.merge",
        )
    return adapter.model_copy(update={"merge": True})


def tabular_parent(settings: Settings, parent: Parent) -> tuple[dict[str, Any], int]:
    """A tabular parent's layers (the job keeps them) and how many features it takes, from
    its config.json."""
    path = Storage(settings.storage_root).resolve(parent.storage_path) / "config.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    architecture = {
        "hidden_sizes": list(config["hidden_sizes"]),
        "activation": str(config["activation"]),
        "dropout": float(config["dropout"]),
    }
    return architecture, int(config["input_size"])


def lineage_record(
    job_model: JobModel, mode: str | None, adapter: LoraAdapter | None
) -> dict[str, Any] | None:
    """The job's stored lineage (``adapter``: the one it trains); None for a job on a base
    model. A LoRA parent's adapter is continued, or merged (as full fine-tuning merges it)."""
    parent = job_model.parent
    if parent is None:
        return None
    used = None
    if parent.adapter:
        used = MERGE if adapter is None else (mode or CONTINUE)
    return {
        "parent_model": parent.model,
        "checkpoint_step": parent.checkpoint_step,
        "base_model": parent.base,
        "parent_adapter": used,
    }


def root_base(job: Job) -> str:
    """The base model a job's weights descend from: what its model's name keeps."""
    return str((job.lineage or {}).get("base_model") or job.model)


# ---- the parent while its children train ----------------------------------------------------


def refuse_while_continued(session: Session, org: Organization, model_id: str) -> None:
    """A model (or its checkpoints) that an active job continues from stays until that job
    ends: the job reads its weights when it starts, and again if it restarts."""
    job_id = session.scalar(
        select(Job.id)
        .where(
            Job.organization_id == org.id,
            Job.status.in_(_ACTIVE),
            or_(
                Job.model == model_id,
                Job.model.startswith(f"{model_id}:ckpt-step-", autoescape=True),
            ),
        )
        .limit(1)
    )
    if job_id is not None:
        raise Conflict(
            f"Model '{model_id}' cannot be deleted while job {job_id} continues from it; "
            "delete it once that job has ended (or cancel the job).",
            param="model",
            code="model_in_use",
        )


@dataclass(frozen=True)
class Start:
    """Where the trainer of a continued job finds its weights (worker/runner.py)."""

    path: Path  # the parent's weights directory
    adapter: bool  # it holds a LoRA adapter of the root base
    labels: list[str] | None
    merge_adapter: bool  # parent_adapter "merge": fold the adapter into the base first
    base: str  # the root base model's id


def starting_point(session: Session, settings: Settings, job: Job) -> Start | None:
    """The weights a continued job starts from, found again as it starts; None for a job on a
    base model. Raises LookupError when they are gone."""
    lineage = job.lineage
    if not lineage:
        return None
    parent = find_parent(session, settings, job.organization_id, job.model)
    if parent is None:
        raise LookupError(f"the model {job.model} this job continues from no longer exists")
    path = Storage(settings.storage_root).resolve(parent.storage_path)
    if not path.is_dir():
        raise LookupError(f"the weights of {job.model} are no longer stored")
    return Start(
        path=path,
        adapter=parent.adapter,
        labels=parent.labels,
        merge_adapter=lineage.get("parent_adapter") == MERGE,
        base=parent.base,
    )
