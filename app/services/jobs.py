"""Fine-tuning jobs: creation, the state machine, user actions, events.

Every state change is one conditional UPDATE (``... WHERE status IN (...)``), so two actors can
never both win a transition; ``transition`` is the only code that changes a job's status, but
for ``leases.claim_job``, which takes the lease in the same UPDATE. Leases and what the
reconciler looks for are in ``app/services/leases.py``; validating a new job's files in
``app/services/job_files.py``; hyperparameter defaults in ``app/services/hyperparameters.py``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import secrets
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from sqlalchemy import ColumnElement, Text, cast, func, literal, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.core.errors import Conflict, InvalidRequest, NotFound, Unprocessable
from app.core.ids import new_id
from app.core.kinds import (
    CAUSAL_FORMATS,
    FORMAT_CLASSIFICATION,
    FORMAT_TABULAR,
    KIND_CAUSAL_LM,
    KIND_ENCODER,
    KIND_TABULAR,
    PREFERENCE_FORMATS,
)
from app.core.settings import Settings
from app.core.storage import redact_paths
from app.models import Checkpoint, File, Job, JobEvent, Organization, utcnow
from app.schemas import (
    Adapter,
    Architecture,
    DpoHyperparametersRequest,
    DpoMethod,
    HyperparametersRequest,
    Integration,
    JobCreate,
    SupervisedMethod,
)
from app.services import lineage, quota
from app.services.hyperparameters import (
    TRAINABLE_FORMATS,
    resolve_dpo_hyperparameters,
    resolve_hyperparameters,
)
from app.services.integrations import wandb_unavailable
from app.services.models import MLP_MODEL
from app.services.pagination import page
from app.services.rowcount import rowcount

log = logging.getLogger(__name__)

VALIDATING, QUEUED, RUNNING = "validating_files", "queued", "running"
SUCCEEDED, FAILED, CANCELLED, PAUSED = "succeeded", "failed", "cancelled", "paused"
ACTIVE = (VALIDATING, QUEUED, RUNNING, PAUSED)
TERMINAL = (SUCCEEDED, FAILED, CANCELLED)


def fine_tuned_model_name(job: Job, organization: Organization) -> str:
    """``ft:<base>:<org>:<suffix>:<id>``; a job that continued a fine-tuned model keeps its
    root base, as OpenAI's names do."""
    base = lineage.root_base(job)
    return f"ft:{base}:{organization.name}:{job.suffix or ''}:{job.id.split('-', 1)[1][:8]}"


# ---- events --------------------------------------------------------------------------------


def add_event(
    session: Session,
    job_id: str,
    message: str,
    *,
    level: str = "info",
    type: str = "message",
    data: dict[str, Any] | None = None,
) -> JobEvent:
    event = JobEvent(
        id=new_id("ftevent"), job_id=job_id, message=message, level=level, type=type, data=data
    )
    session.add(event)
    session.flush()
    return event


# ---- the state machine ---------------------------------------------------------------------


def transition(
    session: Session,
    job_id: str,
    *,
    to: str,
    from_: Iterable[str],
    message: str | None = None,
    level: str = "info",
    owner: str | None = None,
    when: Iterable[ColumnElement[bool]] = (),
    **values: Any,
) -> bool:
    """Move a job to ``to`` if (and only if) it is in one of ``from_`` (and, when ``owner`` is
    given, still leased by it, and the row meets every condition in ``when``). Records
    ``message`` as an event when the move happens."""
    now = utcnow()
    stmt = update(Job).where(Job.id == job_id, Job.status.in_(tuple(from_)), *when)
    if owner is not None:
        stmt = stmt.where(Job.lease_owner == owner)
    if to in TERMINAL:
        values.setdefault("finished_at", now)
        values.setdefault("lease_owner", None)
        values.setdefault("lease_expires_at", None)
    result = session.execute(
        stmt.values(status=to, updated_at=now, **values).execution_options(
            synchronize_session=False
        )
    )
    if not rowcount(result):
        return False
    if message:
        add_event(session, job_id, message, level=level)
    return True


def fail_job(
    session: Session,
    job_id: str,
    *,
    code: str,
    message: str,
    param: str | None = None,
    owner: str | None = None,
    from_: Iterable[str] = ACTIVE,
    when: Iterable[ColumnElement[bool]] = (),
    **values: Any,
) -> bool:
    """Fail the job (conditional, as every move) with an error a user reads: absolute paths
    of the server are taken out of ``message`` (``storage.redact_paths``)."""
    message = redact_paths(message)
    return transition(
        session,
        job_id,
        to=FAILED,
        from_=from_,
        owner=owner,
        when=when,
        message=f"The job failed: {message}",
        level="error",
        error={"code": code, "message": message, "param": param},
        **values,
    )


# ---- creation ------------------------------------------------------------------------------


def _fine_tuning_file(session: Session, org: Organization, file_id: str, param: str) -> File:
    # FOR SHARE (on PostgreSQL): a concurrent delete of the file waits for this job to exist,
    # and then refuses (files.delete_file), or this create waits and finds no file.
    file = session.scalar(
        select(File)
        .where(File.id == file_id, File.organization_id == org.id, File.unexpired(utcnow()))
        .with_for_update(read=True)
    )
    if file is None:
        raise InvalidRequest(f"No file with id '{file_id}' was found.", param=param)
    if file.purpose != "fine-tune":
        raise InvalidRequest(
            f"File '{file_id}' has purpose '{file.purpose}'; fine-tuning needs 'fine-tune'.",
            param=param,
        )
    return file


def _check_model_for_task(model: str, kind: str, task: str) -> None:
    """Refuse a base model that cannot learn the training file's task."""
    if task == FORMAT_TABULAR and model != MLP_MODEL:
        raise InvalidRequest(
            f"The training file holds tabular rows, which train '{MLP_MODEL}' (a network "
            f"designed from scratch), not '{model}'.",
            param="model",
        )
    if model == MLP_MODEL and task != FORMAT_TABULAR:
        raise InvalidRequest(
            f'\'{MLP_MODEL}\' trains on tabular rows ({{"features", "label"}}); the training '
            f"file holds {task} rows.",
            param="training_file",
        )
    if task in (*CAUSAL_FORMATS, *PREFERENCE_FORMATS) and kind != KIND_CAUSAL_LM:
        raise InvalidRequest(
            f"Model '{model}' is an {kind} model; {task} fine-tuning needs a causal language "
            "model (GET /v1/models gives each base model's task).",
            param="model",
        )
    if task == FORMAT_CLASSIFICATION and kind not in (KIND_ENCODER, KIND_CAUSAL_LM):
        raise InvalidRequest(
            f"Model '{model}' cannot be fine-tuned as a classifier.", param="model"
        )


def _check_method_for_task(method_type: str, task: str) -> None:
    """Preference rows train with method dpo, and dpo trains on nothing else."""
    if method_type == "dpo" and task not in PREFERENCE_FORMATS:
        raise InvalidRequest(
            'Method \'dpo\' trains on preference rows ({"input", "preferred_output", '
            f'"non_preferred_output"}}); the training file holds {task} rows.',
            param="training_file",
        )
    if method_type != "dpo" and task in PREFERENCE_FORMATS:
        raise InvalidRequest(
            f"The training file holds {task} rows, which train with method "
            f'{{"type": "dpo"}}, not {method_type}.',
            param="training_file",
        )


def _check_method_options(model: str, task: str, supervised: SupervisedMethod) -> None:
    """Refuse an adapter or an architecture where it does not apply."""
    if supervised.adapter is not None and task not in CAUSAL_FORMATS:
        raise InvalidRequest(
            f"A LoRA adapter applies to chat, completion and text fine-tuning, not to {task}; "
            "use adapter 'full'.",
            param="method.supervised.adapter",
        )
    if supervised.architecture is not None and model != MLP_MODEL:
        raise InvalidRequest(
            f"An architecture is designed only for model '{MLP_MODEL}'; '{model}' has its own.",
            param="method.supervised.architecture",
        )


def _continued_method(
    settings: Settings,
    job_model: lineage.JobModel,
    supervised: SupervisedMethod,
    mode: str | None,
    training: File,
) -> SupervisedMethod:
    """The method of a job on a fine-tuned model: the adapter it trains
    (lineage.continued_adapter) and, from a tabular parent, the parent's layers."""
    parent = job_model.parent
    if parent is None:
        if mode is not None:
            raise InvalidRequest(
                "parent_adapter applies when model is a fine-tuned LoRA model; "
                f"'{job_model.requested}' is a base model.",
                param="parent_adapter",
            )
        return supervised
    lineage.check_parent_for_task(parent, training.format or "")
    architecture = None
    if parent.kind == KIND_TABULAR:
        if supervised.architecture is not None:
            raise InvalidRequest(
                f"A job continuing '{parent.model}' keeps its layers; leave architecture out.",
                param="method.supervised.architecture",
            )
        layers, inputs = lineage.tabular_parent(settings, parent)
        features = (training.stats or {}).get("features")
        if features is not None and features != inputs:
            raise InvalidRequest(
                f"Model '{parent.model}' takes {inputs} features; the training file's rows "
                f"have {features}.",
                param="training_file",
            )
        architecture = Architecture(**layers)
    adapter = lineage.continued_adapter(
        settings, parent, supervised.adapter, supervised.model_fields_set, mode
    )
    return supervised.model_copy(update={"adapter": adapter, "architecture": architecture})


def _continued_dpo(
    settings: Settings,
    job_model: lineage.JobModel,
    dpo: DpoMethod,
    mode: str | None,
    training: File,
) -> DpoMethod:
    """The method of a DPO job: on a fine-tuned model, the adapter it trains
    (lineage.continued_adapter), as for a supervised job."""
    parent = job_model.parent
    if parent is None:
        if mode is not None:
            raise InvalidRequest(
                "parent_adapter applies when model is a fine-tuned LoRA model; "
                f"'{job_model.requested}' is a base model.",
                param="parent_adapter",
            )
        return dpo
    lineage.check_parent_for_task(parent, training.format or "")
    adapter = lineage.continued_adapter(
        settings, parent, dpo.adapter, dpo.model_fields_set, mode, param="method.dpo.adapter"
    )
    return dpo.model_copy(update={"adapter": adapter})


def _checked_integrations(integrations: list[Integration] | None) -> list[dict[str, Any]]:
    """The integrations as stored on the job. A wandb one needs the wandb package and its
    configuration where the server runs (app/services/integrations.py); without them the job
    is refused rather than trained without its W&B run."""
    for index, integration in enumerate(integrations or []):
        problem = wandb_unavailable() if integration.type == "wandb" else None
        if problem:
            raise InvalidRequest(
                problem, param=f"integrations.{index}", code="integration_unavailable"
            )
    return [integration.model_dump(mode="json") for integration in integrations or []]


def _stored_adapter(adapter: Adapter) -> Any:
    """ "full", or the complete LoRA spec."""
    return "full" if adapter is None else adapter.model_dump()


def dpo_method(dpo: DpoMethod, hyperparameters: dict[str, Any]) -> dict[str, Any]:
    """A DPO job's method as stored: its resolved hyperparameters (beta included) and the
    adapter."""
    return {
        "type": "dpo",
        "dpo": {"hyperparameters": hyperparameters, "adapter": _stored_adapter(dpo.adapter)},
    }


def _dpo_hyperparameters(body: JobCreate, dpo: DpoMethod, rows: int) -> dict[str, Any]:
    """method.dpo.hyperparameters (or the deprecated top-level ones), resolved."""
    requested = dpo.hyperparameters
    if requested is None:
        top = body.hyperparameters.model_dump(exclude_none=True) if body.hyperparameters else {}
        requested = DpoHyperparametersRequest(**top)
    if requested.packing:
        raise InvalidRequest(
            "packing applies to chat, completion and text rows, not to preference rows.",
            param="method.dpo.hyperparameters.packing",
        )
    try:
        return resolve_dpo_hyperparameters(rows, requested, lora=dpo.adapter is not None)
    except ValueError as exc:
        raise InvalidRequest(str(exc), param="method.dpo.hyperparameters.simpo_gamma") from None


def normalised_method(
    model: str, supervised: SupervisedMethod, hyperparameters: dict[str, Any]
) -> dict[str, Any]:
    """The method as stored on the job: resolved hyperparameters, the adapter ("full" or a
    complete LoRA spec) and, for tunehouse/mlp, the complete architecture."""
    adapter = _stored_adapter(supervised.adapter)
    architecture = None
    if model == MLP_MODEL:
        architecture = (supervised.architecture or Architecture()).model_dump()
    return {
        "type": "supervised",
        "supervised": {
            "hyperparameters": hyperparameters,
            "adapter": adapter,
            "architecture": architecture,
        },
    }


def _supervised(
    settings: Settings, job_model: lineage.JobModel, body: JobCreate, training: File, rows: int
) -> tuple[dict[str, Any], dict[str, Any], Adapter]:
    """A supervised job's resolved hyperparameters, its method as stored, and the adapter it
    trains (None: every weight)."""
    task = training.format or ""
    supervised = body.method.supervised if body.method else None
    supervised = supervised or SupervisedMethod()
    _check_method_options(job_model.base, task, supervised)
    supervised = _continued_method(settings, job_model, supervised, body.parent_adapter, training)
    requested = supervised.hyperparameters or body.hyperparameters or HyperparametersRequest()
    if requested.packing and task not in CAUSAL_FORMATS:
        raise InvalidRequest(
            f"packing applies to chat, completion and text rows, not to {task} rows.",
            param="hyperparameters.packing",
        )
    lora = supervised.adapter is not None
    hyperparameters = resolve_hyperparameters(task, rows, requested, lora=lora)
    method = normalised_method(job_model.base, supervised, hyperparameters)
    return hyperparameters, method, supervised.adapter


def create_job(
    session: Session,
    settings: Settings,
    org: Organization,
    body: JobCreate,
    idempotency_key: str | None = None,
) -> tuple[Job, bool]:
    """Store a new job in ``validating_files``; returns (job, created). A retried create with
    the same Idempotency-Key and the same request returns the first job and created=False; the
    key with another request is refused (Unprocessable), as the IETF Idempotency-Key draft
    asks."""
    fingerprint = request_fingerprint(body) if idempotency_key else None
    if idempotency_key:
        existing = _job_with_key(session, org, idempotency_key)
        if existing is not None:
            return _replayed(existing, fingerprint), False
    integrations = _checked_integrations(body.integrations)
    quota.check_new_job(session, org, settings.storage_quota_bytes)
    # The same for every method: a base model, or a fine-tuned model or checkpoint to continue.
    job_model = lineage.resolve_job_model(session, settings, org, body.model)
    training = _fine_tuning_file(session, org, body.training_file, "training_file")
    validation = None
    if body.validation_file:
        validation = _fine_tuning_file(session, org, body.validation_file, "validation_file")
        if validation.format != training.format:
            raise InvalidRequest(
                f"The validation file holds {validation.format} rows but the training file "
                f"holds {training.format} rows.",
                param="validation_file",
            )
    task = training.format or ""
    if task not in TRAINABLE_FORMATS:
        raise InvalidRequest(
            f"Files of format '{task}' cannot be trained yet.", param="training_file"
        )
    method_type = body.method.type if body.method else "supervised"
    _check_method_for_task(method_type, task)
    _check_model_for_task(job_model.base, job_model.kind, task)
    rows = int((training.stats or {}).get("rows", 0))
    if method_type == "dpo":
        dpo = (body.method.dpo if body.method else None) or DpoMethod()
        dpo = _continued_dpo(settings, job_model, dpo, body.parent_adapter, training)
        hyperparameters = _dpo_hyperparameters(body, dpo, rows)
        method = dpo_method(dpo, hyperparameters)
        adapter = dpo.adapter
    else:
        hyperparameters, method, adapter = _supervised(settings, job_model, body, training, rows)
    seed = body.seed if body.seed is not None else secrets.randbelow(2**31)
    job = Job(
        id=new_id("ftjob"),
        organization_id=org.id,
        model=body.model,
        task=task,
        training_file=training.id,
        validation_file=validation.id if validation else None,
        status=VALIDATING,
        hyperparameters=hyperparameters,
        method=method,
        suffix=body.suffix,
        seed=seed,
        metadata_=body.metadata,
        integrations=integrations,
        result_files=[],
        idempotency_key=idempotency_key,
        idempotency_fingerprint=fingerprint,
        resources=body.resources.model_dump(exclude_none=True) if body.resources else None,
        queue=chosen_queue(settings, body.resources.device if body.resources else None),
        lineage=lineage.lineage_record(job_model, body.parent_adapter, adapter),
    )
    session.add(job)
    try:
        session.flush()
    except IntegrityError:
        # Another request with the same Idempotency-Key won the race: its job, if the requests
        # are the same.
        session.rollback()
        if idempotency_key:
            winner = _job_with_key(session, org, idempotency_key)
            if winner is not None:
                return _replayed(winner, fingerprint), False
        raise
    add_event(session, job.id, f"Created fine-tuning job: {job.id}")
    files = ", ".join(f for f in (job.training_file, job.validation_file) if f)
    add_event(session, job.id, f"Validating training file: {files}")
    return job, True


# ---- device queues ---------------------------------------------------------------------------


def chosen_queue(settings: Settings, device: str | None) -> str:
    """The worker queue of a new job: the device kind it asked for, or the default queue. It is
    stored with the job, so every wake-up goes to the same queue whichever process sends it."""
    return device or settings.default_queue


def job_queue(settings: Settings, queue: str | None) -> str:
    """Where a job's wake-ups go: its stored queue (jobs from before queues: the default)."""
    return queue or settings.default_queue


def job_queues(settings: Settings, session: Session, job_ids: Sequence[str]) -> dict[str, str]:
    """The queue of each job of ``job_ids`` that still exists."""
    queues: dict[str, str] = {}
    for start in range(0, len(job_ids), 500):  # bounded IN lists
        chunk = job_ids[start : start + 500]
        for job_id, queue in session.execute(select(Job.id, Job.queue).where(Job.id.in_(chunk))):
            queues[job_id] = job_queue(settings, queue)
    return queues


def request_fingerprint(body: JobCreate) -> str:
    """sha256 of the validated request as canonical JSON: the same request sent again (keys
    in another order, a default written out or left out) has the same fingerprint."""
    canonical = json.dumps(
        body.model_dump(mode="json"), sort_keys=True, separators=(",", ":"), ensure_ascii=False
    )
    return hashlib.sha256(canonical.encode()).hexdigest()


def _job_with_key(session: Session, org: Organization, idempotency_key: str) -> Job | None:
    return session.scalar(
        select(Job).where(Job.organization_id == org.id, Job.idempotency_key == idempotency_key)
    )


def _replayed(job: Job, fingerprint: str | None) -> Job:
    """The job a retried create returns, if the retry is the same request."""
    if job.idempotency_fingerprint not in (None, fingerprint):
        raise Unprocessable(
            f"This Idempotency-Key was already used, for job {job.id}, with a different "
            "request. Send the same request to get that job, or use a new key.",
            param="Idempotency-Key",
            code="idempotency_key_reused",
        )
    return job


# ---- reads and user actions ------------------------------------------------------------------


def get_job(session: Session, org: Organization, job_id: str) -> Job:
    job = session.scalar(select(Job).where(Job.id == job_id, Job.organization_id == org.id))
    if job is None:
        raise NotFound(f"No fine-tuning job with id '{job_id}'.", param="fine_tuning_job_id")
    return job


def list_jobs(
    session: Session,
    org: Organization,
    *,
    limit: int,
    after: str | None,
    metadata: dict[str, str] | None = None,
    null_metadata: bool = False,
) -> tuple[Sequence[Job], bool]:
    """A page of the organization's jobs, newest first: those whose metadata holds every pair
    of ``metadata``, or (``null_metadata``) those created without metadata."""
    stmt = select(Job).where(Job.organization_id == org.id)
    cursor = get_job(session, org, after) if after else None
    sqlite = session.get_bind().dialect.name == "sqlite"
    for key, value in (metadata or {}).items():
        stmt = stmt.where(_metadata_has(key, value, sqlite=sqlite))
    if null_metadata:
        # SQL NULL, or JSON null (what the ORM writes for None).
        stmt = stmt.where(or_(Job.metadata_.is_(None), cast(Job.metadata_, Text) == "null"))
    return page(session, stmt, sort=Job.created_at, tiebreak=Job.id, after=cursor, limit=limit)


def _metadata_has(key: str, value: str, *, sqlite: bool) -> ColumnElement[bool]:
    """metadata[key] == value, for any key. PostgreSQL: ``metadata ->> :key``. SQLite: its
    JSON paths cannot quote a key holding '"', so the object's members are searched
    (json_each) instead."""
    if not sqlite:
        return Job.metadata_[key].as_string() == value
    member = func.json_each(Job.metadata_).table_valued("key", "value", "type")
    return (
        select(literal(1))
        .select_from(member)
        .where(member.c.key == key, member.c.type == "text", member.c.value == value)
        .exists()
    )


def _move(
    session: Session,
    org: Organization,
    job_id: str,
    *,
    to: str,
    from_: Iterable[str],
    already: Iterable[str],
    message: Callable[[Job], str],
    refusal: str,
) -> Job:
    """A user's request to move a job: a no-op when the job is ``already`` there, else the move
    from ``from_``, else a 409 (``refusal`` completes "Job 'id' is <status>; ...")."""
    already = tuple(already)
    job = get_job(session, org, job_id)
    if job.status in already:
        return job
    moved = transition(session, job.id, to=to, from_=from_, message=message(job))
    session.refresh(job)
    if not moved and job.status not in already:
        raise Conflict(f"Job '{job.id}' is {job.status}; {refusal}", param="fine_tuning_job_id")
    return job


def cancel_job(session: Session, org: Organization, job_id: str) -> Job:
    """Cancel an active job; a second cancel is a no-op. A running job's trainer is stopped."""
    return _move(
        session,
        org,
        job_id,
        to=CANCELLED,
        from_=ACTIVE,
        already=(CANCELLED,),
        message=lambda _: "Fine-tuning job cancelled",
        refusal="only an active job can be cancelled.",
    )


def pause_job(session: Session, org: Organization, job_id: str) -> Job:
    """Pause a queued or running job. A running job's trainer checkpoints and exits; its
    worker goes on to the next job. Pausing a paused job is a no-op."""
    return _move(
        session,
        org,
        job_id,
        to=PAUSED,
        from_=(QUEUED, RUNNING),
        already=(PAUSED,),
        message=lambda job: (
            "Pause requested; the job is saving a checkpoint"
            if job.status == RUNNING
            else "Fine-tuning job paused"
        ),
        refusal="only a queued or running job can be paused.",
    )


def resume_job(session: Session, org: Organization, job_id: str) -> Job:
    """Queue a paused job again; it goes on from the checkpoint its pause wrote. Resuming a
    job that is queued or running already is a no-op."""
    return _move(
        session,
        org,
        job_id,
        to=QUEUED,
        from_=(PAUSED,),
        already=(QUEUED, RUNNING),
        message=lambda job: (
            f"Fine-tuning job resumed; it goes on from step {job.steps_completed or 0}"
        ),
        refusal="only a paused job can be resumed.",
    )


def list_events(
    session: Session, org: Organization, job_id: str, *, limit: int, after: str | None
) -> tuple[Sequence[JobEvent], bool]:
    job = get_job(session, org, job_id)
    stmt = select(JobEvent).where(JobEvent.job_id == job.id)
    cursor = None
    if after:
        cursor = session.scalar(stmt.where(JobEvent.id == after))
        if cursor is None:
            raise NotFound(f"No event with id '{after}' in this job.", param="after")
    return page(session, stmt, sort=JobEvent.seq, tiebreak=JobEvent.seq, after=cursor, limit=limit)


def events_after(
    session: Session, job_id: str, after_seq: int
) -> tuple[list[JobEvent], str | None]:
    """The job's events after sequence number ``after_seq``, oldest first, and the job's
    status (None when the job is gone): what an event stream sends next."""
    events = session.scalars(
        select(JobEvent)
        .where(JobEvent.job_id == job_id, JobEvent.seq > after_seq)
        .order_by(JobEvent.seq)
    ).all()
    status = session.scalar(select(Job.status).where(Job.id == job_id))
    return list(events), status


def list_checkpoints(
    session: Session, org: Organization, job_id: str, *, limit: int, after: str | None
) -> tuple[Job, Sequence[Checkpoint], bool]:
    job = get_job(session, org, job_id)
    stmt = select(Checkpoint).where(Checkpoint.job_id == job.id)
    cursor = None
    if after:
        cursor = session.scalar(stmt.where(Checkpoint.id == after))
        if cursor is None:
            raise NotFound(f"No checkpoint with id '{after}' in this job.", param="after")
    rows, more = page(
        session,
        stmt,
        sort=Checkpoint.step_number,
        tiebreak=Checkpoint.id,
        after=cursor,
        limit=limit,
    )
    return job, rows, more
