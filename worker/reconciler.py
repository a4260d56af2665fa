"""The reconciler: the database says what is due, and this re-sends what the broker lost.

- ``validating_files`` jobs left behind by an API process that stopped are validated;
- ``queued`` jobs idle for a while get their wake-up sent again, to the job's own queue (a
  duplicate is harmless: only one delivery can claim the job);
- ``running`` jobs whose lease expired (their worker died) go back to ``queued``, or fail once
  they have crashed ``max_attempts`` times. A lease held by a process of this machine that no
  longer exists is not waited out: a restarted worker takes its job back at once.
One reconciler acts at a time: on PostgreSQL an advisory lock decides; SQLite serialises
writers itself. Each job's change is its own short transaction, and files are read outside
any: a pass never keeps SQLite's write lock from the API and the trainers.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from functools import partial
from typing import Any

from sqlalchemy import Connection, text
from sqlalchemy.orm import Session

from app.core.db import get_engine, session_scope, unit_of_work
from app.core.process import holder_is_gone, local_owner_prefix
from app.core.queue import enqueue_job
from app.core.settings import Settings
from app.models import utcnow
from app.services import job_files, jobs, leases
from worker import janitor
from worker.metrics import RECONCILER_ACTIONS, RECONCILER_PASSES

log = logging.getLogger(__name__)

_LOCK_KEY = 0x7475_6E65  # "tune"


Sessions = Callable[[], AbstractContextManager[Session]]


@contextmanager
def _pass_sessions(url: str) -> Iterator[Sessions | None]:
    """The units of work of one pass, or None when another reconciler is in the middle of one.

    On PostgreSQL the pass runs on one connection of its own, which holds a session-level
    advisory lock from start to end, between its short transactions: the pass commits job by
    job and reads files with no transaction open. SQLite serialises writers itself."""
    engine = get_engine(url)
    if engine.dialect.name != "postgresql":
        yield partial(session_scope, url)
        return
    with engine.connect() as connection:
        taken = bool(connection.scalar(text("SELECT pg_try_advisory_lock(:k)"), {"k": _LOCK_KEY}))
        connection.commit()
        if not taken:
            yield None
            return
        try:
            yield partial(_session_on, connection)
        finally:
            connection.rollback()
            connection.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": _LOCK_KEY})
            connection.commit()


def _session_on(connection: Connection) -> AbstractContextManager[Session]:
    """``session_scope`` on the pass's connection: one transaction, committed on success."""
    return unit_of_work(Session(bind=connection, expire_on_commit=False))


def _validate_stale(sessions: Sessions, settings: Settings, idle: float) -> list[str]:
    """Validate the ``validating_files`` jobs an API process left behind, one at a time, each
    file read outside any transaction; the ids of those now queued."""
    with sessions() as session:
        validating = leases.stale_job_ids(session, jobs.VALIDATING, idle)
    return [j for j in validating if job_files.validate_job_files(settings, j, sessions=sessions)]


def _requeue_expired(sessions: Sessions, settings: Settings) -> tuple[list[str], int]:
    """Running jobs whose trainer is gone: the lease ran out, or (found at once) the process
    holding it on this machine no longer exists. Each counts as a crash, recorded only if the
    lease was not renewed since it was read here (a heartbeat may land in between), and
    committed job by job."""
    now = utcnow()
    with sessions() as session:
        running = [
            (job.id, job.lease_owner, job.lease_expires_at)
            for job in leases.expired_or_local_leases(session, local_owner_prefix(), now)
        ]
    requeued, failed = [], 0
    for job_id, owner, expires_at in running:
        expired = expires_at is None or expires_at < now
        if not expired and not holder_is_gone(owner):
            continue
        with sessions() as session:
            outcome = leases.record_crash(
                session,
                job_id,
                owner=owner,
                reason="stopped renewing its lease" if expired else "lost its worker",
                max_attempts=settings.max_attempts,
                not_renewed_after=now if expired else expires_at,
            )
        if outcome == jobs.QUEUED:
            requeued.append(job_id)
        elif outcome == jobs.FAILED:
            failed += 1
    return requeued, failed


def reconcile_once(settings: Settings, *, at_start: bool = False) -> dict[str, Any]:
    idle = 0.0 if at_start else settings.requeue_after_seconds
    with _pass_sessions(settings.sqlalchemy_url) as sessions:
        if sessions is None:
            RECONCILER_PASSES.labels("skipped").inc()
            return {"skipped": True}
        newly_queued = _validate_stale(sessions, settings, idle)
        requeued, failed = _requeue_expired(sessions, settings)
        with sessions() as session:
            lost = leases.stale_job_ids(session, jobs.QUEUED, idle)
            wake = list(dict.fromkeys(newly_queued + requeued + lost))
            leases.touch(session, wake)
            queues = jobs.job_queues(settings, session, wake)
    enqueued = 0
    for job_id, queue in queues.items():  # each to its own queue: a gpu job to the gpu workers
        enqueued += enqueue_job(settings, job_id, queue)
    janitor.sweep(settings)  # what ended jobs, deleted models and expired files leave on disk
    RECONCILER_PASSES.labels("done").inc()
    for action, count in (
        ("validated", len(newly_queued)),
        ("requeued", len(requeued)),
        ("failed", failed),
        ("enqueued", enqueued),
    ):
        RECONCILER_ACTIONS.labels(action).inc(count)
    summary = {"enqueued": len(queues), "expired": len(requeued), "failed": failed}
    if wake or failed:
        log.info("reconcile: %s", summary)
    return summary
