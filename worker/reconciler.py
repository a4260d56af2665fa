"""The reconciler: the database says what is due, and this re-sends what the broker lost.

- ``validating_files`` jobs left behind by an API process that stopped are validated;
- ``queued`` jobs idle for a while get their wake-up sent again (a duplicate is harmless:
  only one delivery can claim the job);
- ``running`` jobs whose lease expired (their worker died) go back to ``queued``, or fail once
  they have crashed ``max_attempts`` times. A lease held by a process of this machine that no
  longer exists is not waited out: a restarted worker takes its job back at once.
One reconciler acts at a time: on PostgreSQL an advisory lock decides; SQLite serialises
writers itself.
"""

from __future__ import annotations

import logging
from typing import Any

from sqlalchemy import text
from sqlalchemy.orm import Session

from app.core.db import session_scope
from app.core.process import holder_is_gone, local_owner_prefix
from app.core.queue import enqueue_job
from app.core.settings import Settings
from app.models import utcnow
from app.services import jobs, leases
from worker import janitor

log = logging.getLogger(__name__)

_LOCK_KEY = 0x7475_6E65  # "tune"


def _take_lock(session: Session) -> bool:
    if session.get_bind().dialect.name != "postgresql":
        return True
    return bool(session.scalar(text("SELECT pg_try_advisory_xact_lock(:k)"), {"k": _LOCK_KEY}))


def _requeue_expired(session: Session, settings: Settings) -> tuple[list[str], int]:
    """Running jobs whose trainer is gone: the lease ran out, or (found at once) the process
    holding it on this machine no longer exists. Each counts as a crash."""
    now = utcnow()
    running = leases.expired_or_local_leases(session, local_owner_prefix(), now)
    requeued, failed = [], 0
    for job in running:
        expired = job.lease_expires_at is None or job.lease_expires_at < now
        if not expired and not holder_is_gone(job.lease_owner):
            continue
        outcome = leases.record_crash(
            session,
            job.id,
            owner=job.lease_owner,
            reason="stopped renewing its lease" if expired else "lost its worker",
            max_attempts=settings.max_attempts,
        )
        if outcome == jobs.QUEUED:
            requeued.append(job.id)
        elif outcome == jobs.FAILED:
            failed += 1
    return requeued, failed


def reconcile_once(settings: Settings, *, at_start: bool = False) -> dict[str, Any]:
    idle = 0.0 if at_start else settings.requeue_after_seconds
    with session_scope(settings.sqlalchemy_url) as session:
        if not _take_lock(session):
            return {"skipped": True}
        validating = leases.stale_job_ids(session, jobs.VALIDATING, idle)
        newly_queued = [j for j in validating if jobs.validate_job_files(session, settings, j)]
        requeued, failed = _requeue_expired(session, settings)
        lost = leases.stale_job_ids(session, jobs.QUEUED, idle)
        wake = list(dict.fromkeys(newly_queued + requeued + lost))
        leases.touch(session, wake)
    for job_id in wake:
        enqueue_job(settings, job_id)
    janitor.sweep(settings)  # what ended jobs, deleted models and expired files leave on disk
    summary = {"enqueued": len(wake), "expired": len(requeued), "failed": failed}
    if wake or failed:
        log.info("reconcile: %s", summary)
    return summary
