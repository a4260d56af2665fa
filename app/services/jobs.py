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

from sqlalchemy import ColumnElement, select, update
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
)
from app.core.settings import Settings
from app.core.storage import redact_paths
from app.models import Checkpoint, File, Job, JobEvent, Organization, utcnow
from app.schemas import Architecture, HyperparametersRequest, JobCreate, SupervisedMethod
from app.services import quota
from app.services.hyperparameters import TRAINABLE_FORMATS, resolve_hyperparameters
from app.services.models import MLP_MODEL, base_kind
from app.services.pagination import page
from app.services.rowcount import rowcount

log = logging.getLogger(__name__)

VALIDATING, QUEUED, RUNNING = "validating_files", "queued", "running"
SUCCEEDED, FAILED, CANCELLED, PAUSED = "succeeded", "failed", "cancelled", "paused"
ACTIVE = (VALIDATING, QUEUED, RUNNING, PAUSED)
TERMINAL = (SUCCEEDED, FAILED, CANCELLED)


def fine_tuned_model_name(job: Job, organization: Organization) -> str:
    return f"ft:{job.model}:{organization.name}:{job.suffix or ''}:{job.id.split('-', 1)[1][:8]}"


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


def _base_model_kind(settings: Settings, model_id: str) -> str:
    kind = base_kind(settings, model_id)
    if kind is None:
        raise InvalidRequest(
            f"Model '{model_id}' is not available for fine-tuning on this server; "
            "GET /v1/models lists the base models.",
            param="model",
            code="model_not_available",
        )
    return kind


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
    if task in CAUSAL_FORMATS and kind != KIND_CAUSAL_LM:
        raise InvalidRequest(
            f"Model '{model}' is an {kind} model; {task} fine-tuning needs a causal language "
            "model (GET /v1/models gives each base model's task).",
            param="model",
        )
    if task == FORMAT_CLASSIFICATION and kind not in (KIND_ENCODER, KIND_CAUSAL_LM):
        raise InvalidRequest(
            f"Model '{model}' cannot be fine-tuned as a classifier.", param="model"
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


def normalised_method(
    model: str, supervised: SupervisedMethod, hyperparameters: dict[str, Any]
) -> dict[str, Any]:
    """The method as stored on the job: resolved hyperparameters, the adapter ("full" or a
    complete LoRA spec) and, for tunehouse/mlp, the complete architecture."""
    adapter: Any = "full"
    if supervised.adapter is not None:
        adapter = supervised.adapter.model_dump()
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
    quota.check_new_job(session, org, settings.storage_quota_bytes)
    model_kind = _base_model_kind(settings, body.model)
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
    supervised = body.method.supervised if body.method else None
    supervised = supervised or SupervisedMethod()
    _check_model_for_task(body.model, model_kind, task)
    _check_method_options(body.model, task, supervised)
    requested = supervised.hyperparameters or body.hyperparameters or HyperparametersRequest()
    if requested.packing and task not in CAUSAL_FORMATS:
        raise InvalidRequest(
            f"packing applies to chat, completion and text rows, not to {task} rows.",
            param="hyperparameters.packing",
        )
    rows = int((training.stats or {}).get("rows", 0))
    lora = supervised.adapter is not None
    hyperparameters = resolve_hyperparameters(task, rows, requested, lora=lora)
    method = normalised_method(body.model, supervised, hyperparameters)
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
        integrations=[],
        result_files=[],
        idempotency_key=idempotency_key,
        idempotency_fingerprint=fingerprint,
        resources=body.resources.model_dump(exclude_none=True) if body.resources else None,
        queue=chosen_queue(settings, body.resources.device if body.resources else None),
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
) -> tuple[Sequence[Job], bool]:
    stmt = select(Job).where(Job.organization_id == org.id)
    cursor = get_job(session, org, after) if after else None
    for key, value in (metadata or {}).items():
        stmt = stmt.where(Job.metadata_[key].as_string() == value)
    return page(session, stmt, sort=Job.created_at, tiebreak=Job.id, after=cursor, limit=limit)


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
