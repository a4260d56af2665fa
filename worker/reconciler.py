"""The reconciler: the database says what is due, and this re-sends what the broker lost.

- ``validating_files`` jobs left behind by an API process that stopped are validated;
- ``queued`` jobs idle for a while get their wake-up sent again (a duplicate is harmless:
  only one delivery can claim the job);
- ``running`` jobs whose lease expired (their worker died) go back to ``queued``, or fail once
  they have used ``max_attempts``.
One reconciler acts at a time: on PostgreSQL an advisory lock decides; SQLite serialises
writers itself.
"""

from __future__ import annotations

import logging
from typing import Any

from sqlalchemy import select, text
from sqlalchemy.orm import Session

from app.core.db import session_scope
from app.core.queue import enqueue_job
from app.core.settings import Settings
from app.models import Job, utcnow
from app.services import jobs

log = logging.getLogger(__name__)

_LOCK_KEY = 0x7475_6E65  # "tune"


def _take_lock(session: Session) -> bool:
    if session.get_bind().dialect.name != "postgresql":
        return True
    return bool(session.scalar(text("SELECT pg_try_advisory_xact_lock(:k)"), {"k": _LOCK_KEY}))


def _requeue_expired(session: Session, settings: Settings) -> tuple[list[str], int]:
    expired = session.scalars(
        select(Job).where(Job.status == jobs.RUNNING, Job.lease_expires_at < utcnow())
    ).all()
    requeued, failed = [], 0
    for job in expired:
        if job.attempt >= settings.max_attempts:
            failed += jobs.fail_job(
                session,
                job.id,
                code="max_attempts_exceeded",
                message=(
                    f"The training process stopped responding {job.attempt} times "
                    f"(max_attempts is {settings.max_attempts}); see the worker's log."
                ),
                from_=(jobs.RUNNING,),
                owner=job.lease_owner,
            )
        elif jobs.transition(
            session,
            job.id,
            to=jobs.QUEUED,
            from_=(jobs.RUNNING,),
            owner=job.lease_owner,
            message=(
                f"The training process stopped responding at step {job.steps_completed}; "
                f"job re-queued (attempt {job.attempt} of {settings.max_attempts})"
            ),
            level="warn",
            lease_owner=None,
            lease_expires_at=None,
        ):
            requeued.append(job.id)
    return requeued, failed


def reconcile_once(settings: Settings, *, at_start: bool = False) -> dict[str, Any]:
    idle = 0.0 if at_start else settings.requeue_after_seconds
    with session_scope(settings.sqlalchemy_url) as session:
        if not _take_lock(session):
            return {"skipped": True}
        validating = jobs.stale_job_ids(session, jobs.VALIDATING, idle)
        newly_queued = [j for j in validating if jobs.validate_job_files(session, settings, j)]
        requeued, failed = _requeue_expired(session, settings)
        lost = jobs.stale_job_ids(session, jobs.QUEUED, idle)
        wake = list(dict.fromkeys(newly_queued + requeued + lost))
        jobs.touch(session, wake)
    for job_id in wake:
        enqueue_job(settings, job_id)
    summary = {"enqueued": len(wake), "expired": len(requeued), "failed": failed}
    if wake or failed:
        log.info("reconcile: %s", summary)
    return summary
