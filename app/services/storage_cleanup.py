"""The rows side of tidying what jobs leave on disk (the files side is ``worker/janitor.py``).

A job's ``storage_state`` says what is left of its directory once it has ended: None (active,
or not tidied yet), ``tidied`` (succeeded: its kept checkpoints' weights, servable) or
``removed`` (nothing). Rows are forgotten before their files are removed, so that no
checkpoint row ever points at missing files.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import delete, exists, or_, select, update
from sqlalchemy.orm import Session

from app.models import Checkpoint, FineTunedModel, Job
from app.services.jobs import SUCCEEDED, TERMINAL
from app.services.results import update_checkpoints

TIDIED, REMOVED = "tidied", "removed"


@dataclass(frozen=True)
class EndedJob:
    status: str
    model_path: str | None  # the storage path of the job's fine-tuned model, if it has one
    checkpoint_steps: frozenset[int]

    @property
    def keeps_checkpoints(self) -> bool:
        """A succeeded job whose model exists keeps its checkpoints' weights (servable as
        ``<model>:ckpt-step-N``); any other ended job keeps nothing."""
        return self.status == SUCCEEDED and self.model_path is not None


def ended_job(session: Session, job_id: str) -> EndedJob | None:
    """What tidying the job needs to know; None while it may still run or be resumed (or
    when it is gone)."""
    status = session.scalar(select(Job.status).where(Job.id == job_id))
    if status not in TERMINAL:
        return None
    model_path = session.scalar(
        select(FineTunedModel.storage_path).where(FineTunedModel.job_id == job_id).limit(1)
    )
    steps = session.scalars(select(Checkpoint.step_number).where(Checkpoint.job_id == job_id))
    return EndedJob(status, model_path, frozenset(steps))


def jobs_to_tidy(session: Session, *, finished_before: datetime, limit: int) -> list[str]:
    """Ended jobs not tidied yet that finished before ``finished_before`` (by then no trainer
    of theirs can still be writing), and succeeded jobs whose model has since been deleted."""
    not_tidied = select(Job.id).where(
        Job.storage_state.is_(None),
        Job.status.in_(TERMINAL),
        or_(Job.finished_at.is_(None), Job.finished_at <= finished_before),
    )
    model_deleted = select(Job.id).where(
        Job.storage_state == TIDIED,
        ~exists().where(FineTunedModel.job_id == Job.id),
    )
    found = list(session.scalars(not_tidied.order_by(Job.finished_at).limit(limit)))
    found += session.scalars(model_deleted.limit(limit))
    return found


def record_tidied(
    session: Session,
    job_id: str,
    *,
    removed: Sequence[int],
    checkpoint_bytes: Mapping[int, int],
    model_bytes: int | None,
) -> None:
    """The succeeded job keeps the checkpoints in ``checkpoint_bytes`` (step -> bytes left,
    their training state gone) and no longer has those at the ``removed`` steps; its model
    holds ``model_bytes``."""
    update_checkpoints(session, job_id, removed=removed, resized=checkpoint_bytes)
    if model_bytes is not None:
        session.execute(
            update(FineTunedModel).where(FineTunedModel.job_id == job_id).values(bytes=model_bytes)
        )
    _mark(session, job_id, TIDIED)


def forget_checkpoints(session: Session, job_id: str) -> None:
    """Forget all of the job's checkpoints: their files go once this commits."""
    session.execute(delete(Checkpoint).where(Checkpoint.job_id == job_id))


def record_removed(session: Session, job_id: str) -> None:
    _mark(session, job_id, REMOVED)


def _mark(session: Session, job_id: str, state: str) -> None:
    session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status.in_(TERMINAL))
        .values(storage_state=state)
        .execution_options(synchronize_session=False)
    )
