"""Leases: which worker runs a job, and what the reconciler looks for when one is lost.

A job's lease (``lease_owner`` = ``host:pid-namespace:pid:token`` of the worker process, and
``lease_expires_at``) is taken by ``claim_job``, renewed by the training process's heartbeat and
released by the supervisor once its training process has exited. Every write here is
conditional on the lease, so a worker that lost its job changes nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import NamedTuple

from sqlalchemy import ColumnElement, or_, select, update
from sqlalchemy.orm import Session

from app.models import Job, utcnow
from app.services.jobs import (
    ACTIVE,
    FAILED,
    QUEUED,
    RUNNING,
    add_event,
    fail_job,
    transition,
)
from app.services.rowcount import rowcount


@dataclass(frozen=True)
class LeaseState:
    """A job's status and who holds its lease (None: nobody)."""

    status: str
    owner: str | None


def lease_state(session: Session, job_id: str) -> LeaseState | None:
    """The job's status and lease holder; None when the job is gone."""
    row = session.execute(select(Job.status, Job.lease_owner).where(Job.id == job_id)).one_or_none()
    return LeaseState(row.status, row.lease_owner) if row is not None else None


def claim_job(session: Session, job_id: str, owner: str, lease_seconds: int) -> bool:
    """Take a queued job for ``owner``; a second delivery of the same job finds nothing.

    The one status change outside ``jobs.transition``: it must also take the lease, count the
    attempt and keep the first start time, and its condition is on the lease as well as on the
    status, all in the same conditional UPDATE.

    A queued job may still be leased: a worker that paused it or is shutting down keeps the
    lease until its training process has written its checkpoint and exited. Nobody else may
    start the job before that (or before the lease runs out, if that worker died)."""
    now = utcnow()
    job = session.get(Job, job_id)
    started = job.started_at if job is not None and job.started_at else now
    result = session.execute(
        update(Job)
        .where(
            Job.id == job_id,
            Job.status == QUEUED,
            or_(Job.lease_owner.is_(None), Job.lease_expires_at < now),
        )
        .values(
            status=RUNNING,
            updated_at=now,
            lease_owner=owner,
            lease_expires_at=now + timedelta(seconds=lease_seconds),
            attempt=Job.attempt + 1,
            started_at=started,
        )
        .execution_options(synchronize_session=False)
    )
    if not rowcount(result):
        return False
    add_event(session, job_id, "Fine-tuning job started")
    return True


def renew_lease(session: Session, job_id: str, owner: str, lease_seconds: int) -> str | None:
    """Extend ``owner``'s lease and return the job's status, or None when the lease is no
    longer ours (cancelled, finished, or taken over after it ran out).

    A job that was paused, or handed back because its worker is shutting down, stays leased
    to its trainer until that trainer has checkpointed and exited; any status but
    ``running`` tells the trainer to stop."""
    result = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.lease_owner == owner, Job.status.in_(ACTIVE))
        .values(lease_expires_at=utcnow() + timedelta(seconds=lease_seconds))
        .execution_options(synchronize_session=False)
    )
    if not rowcount(result):
        return None
    return session.scalar(select(Job.status).where(Job.id == job_id))


def release_lease(session: Session, job_id: str, owner: str) -> str | None:
    """Give up ``owner``'s lease once its training process is gone; the job's status then,
    or None when it was not ours any more."""
    result = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.lease_owner == owner)
        .values(lease_owner=None, lease_expires_at=None)
        .execution_options(synchronize_session=False)
    )
    if not rowcount(result):
        return None
    return session.scalar(select(Job.status).where(Job.id == job_id))


def hand_back(session: Session, job_id: str, owner: str, reason: str) -> bool:
    """Put a running job back in the queue, still leased to ``owner``, whose trainer now
    checkpoints and exits; the lease is released after that, and another worker goes on."""
    return transition(
        session,
        job_id,
        to=QUEUED,
        from_=(RUNNING,),
        owner=owner,
        message=f"{reason}; the job saves a checkpoint and goes back to the queue",
        level="warn",
    )


def record_crash(
    session: Session,
    job_id: str,
    *,
    owner: str | None,
    reason: str,
    max_attempts: int,
    not_renewed_after: datetime | None = None,
) -> str | None:
    """A start of the job ended in a crash: its training process died, or stopped renewing
    its lease. Back to the queue, to go on from its newest complete checkpoint, or failed once
    it has crashed ``max_attempts`` times. Returns the new status, or None when the job was no
    longer running under ``owner`` (any holder when None).

    ``not_renewed_after`` is for the reconciler, which decided from a read that may be old by
    now: the crash counts only if the lease still ends no later than that (now, for a lease
    that ran out; the expiry it read, for a holder found gone), so a heartbeat committed in
    between wins. Everything is decided by the conditional UPDATE on the row as it is then,
    never on an object this session may have loaded earlier."""
    seen = session.execute(
        select(Job.crash_count, Job.steps_completed).where(Job.id == job_id)
    ).one_or_none()
    if seen is None:
        return None
    crashes, step = seen.crash_count + 1, seen.steps_completed or 0
    # The crash count is part of the condition: the message and the fail-or-requeue choice
    # are about the row this UPDATE changes.
    when: list[ColumnElement[bool]] = [Job.crash_count == seen.crash_count]
    if not_renewed_after is not None:
        when.append(lease_not_renewed_after(not_renewed_after))
    if crashes >= max_attempts:
        failed = fail_job(
            session,
            job_id,
            code="max_attempts_exceeded",
            message=(
                f"The training process crashed {crashes} times (max_attempts is "
                f"{max_attempts}); the last time {reason} at step {step}. The worker's log "
                "has the details."
            ),
            from_=(RUNNING,),
            owner=owner,
            when=when,
            crash_count=crashes,
        )
        return FAILED if failed else None
    moved = transition(
        session,
        job_id,
        to=QUEUED,
        from_=(RUNNING,),
        owner=owner,
        when=when,
        message=(
            f"The training process {reason} at step {step}; the job is queued again and will "
            f"go on from its last checkpoint (crash {crashes} of at most {max_attempts})"
        ),
        level="warn",
        lease_owner=None,
        lease_expires_at=None,
        crash_count=crashes,
    )
    return QUEUED if moved else None


def lease_not_renewed_after(moment: datetime) -> ColumnElement[bool]:
    """The job's lease (if it has one) ends no later than ``moment``: nobody renewed it since."""
    return or_(Job.lease_expires_at.is_(None), Job.lease_expires_at <= moment)


def record_progress(
    session: Session,
    job_id: str,
    owner: str,
    *,
    steps_completed: int,
    total_steps: int,
    estimated_finish: datetime | None,
) -> bool:
    result = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status == RUNNING, Job.lease_owner == owner)
        .values(
            steps_completed=steps_completed,
            total_steps=total_steps,
            estimated_finish=estimated_finish,
            updated_at=utcnow(),
        )
        .execution_options(synchronize_session=False)
    )
    return bool(rowcount(result))


# ---- what the reconciler looks for ------------------------------------------------------------


# The most jobs of one status a reconciler pass picks up (stale_job_ids). A backlog of 10,000
# queued jobs is idle by nature: re-sending all of their wake-ups on every pass took minutes
# (a wake-up costs a few milliseconds) and flooded the broker with duplicates. A pass takes the
# longest idle ones and touches them, so the next pass takes the next ones and every job comes
# round: a broker that lost everything gets 200 wake-ups back a minute at the default interval.
STALE_JOBS_PER_PASS = 100


class HeldLease(NamedTuple):
    """The lease of a running job, as the reconciler weighs it (not the whole row)."""

    id: str
    lease_owner: str | None
    lease_expires_at: datetime | None


def expired_or_local_leases(session: Session, local_prefix: str, now: datetime) -> list[HeldLease]:
    """Running jobs whose lease ran out (or was never set), and those leased to a process of
    this machine (owners starting with ``local_prefix``), whose holder may be gone: not every
    running job."""
    rows = session.execute(
        select(Job.id, Job.lease_owner, Job.lease_expires_at).where(
            Job.status == RUNNING,
            or_(
                Job.lease_expires_at.is_(None),
                Job.lease_expires_at < now,
                Job.lease_owner.startswith(local_prefix, autoescape=True),
            ),
        )
    )
    return [HeldLease(*row) for row in rows]


def stale_job_ids(
    session: Session, status: str, idle_seconds: float, limit: int | None = None
) -> list[str]:
    """Jobs in ``status`` untouched for ``idle_seconds`` (their wake-up may have been lost),
    the longest idle first, at most ``limit`` (default STALE_JOBS_PER_PASS)."""
    cutoff = utcnow() - timedelta(seconds=idle_seconds)
    return list(
        session.scalars(
            select(Job.id)
            .where(Job.status == status, Job.updated_at <= cutoff)
            .order_by(Job.updated_at, Job.created_at)
            .limit(STALE_JOBS_PER_PASS if limit is None else limit)
        )
    )


def touch(session: Session, job_ids: Sequence[str]) -> None:
    """Mark jobs as just seen, so the next pass does not wake them again at once."""
    if job_ids:
        session.execute(
            update(Job)
            .where(Job.id.in_(job_ids))
            .values(updated_at=utcnow())
            .execution_options(synchronize_session=False)
        )
