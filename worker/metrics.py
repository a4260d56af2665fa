"""A worker's Prometheus metrics, served on its own port (``worker/metrics_server.py``).

The training runs in a process of its own, which reports to the database; the worker's
supervisor, which watches that process and polls the job's row anyway, reads two more small
rows each time and turns them into metrics: the throughput of the job's newest metrics event
(per running job, gone when the job ends) and the renewals of the job's lease (its expiry moving
on). The supervisor's own lease actions and the reconciler's are counted where they happen.
"""

from __future__ import annotations

import contextlib
import logging
from datetime import datetime

from prometheus_client import Counter, Gauge
from sqlalchemy import select
from sqlalchemy.orm import Session

from app.core.db import session_scope
from app.models import Job, JobEvent

log = logging.getLogger(__name__)

STEPS_PER_SECOND = Gauge(
    "tunehouse_training_steps_per_second",
    "Optimizer steps a second of a running job, from its newest metrics event",
    ["job_id"],
)
TOKENS_PER_SECOND = Gauge(
    "tunehouse_training_tokens_per_second",
    "Tokens a second of a running job, from its newest metrics event",
    ["job_id"],
)
# claimed, renewed (seen by the supervisor: the heartbeat is the training process's), released,
# handed_back (the worker is shutting down), crashed (its training process died)
LEASE_ACTIONS = Counter(
    "tunehouse_lease_actions_total", "What happened to the leases of this worker's jobs", ["action"]
)
# validated, requeued, failed (a lease that ran out, the job back in the queue or failed),
# enqueued (a wake-up sent again)
RECONCILER_ACTIONS = Counter(
    "tunehouse_reconciler_actions_total", "What the reconciler's passes did", ["action"]
)
RECONCILER_PASSES = Counter(
    "tunehouse_reconciler_passes_total",
    "Reconciler passes: done, or skipped while another reconciler's pass ran",
    ["result"],
)
for _action in ("claimed", "renewed", "released", "handed_back", "crashed"):
    LEASE_ACTIONS.labels(_action)
for _action in ("validated", "requeued", "failed", "enqueued"):
    RECONCILER_ACTIONS.labels(_action)
for _result in ("done", "skipped"):
    RECONCILER_PASSES.labels(_result)


class JobGauges:
    """One running job's series, fed from the database as the supervisor watches the job."""

    def __init__(self, job_id: str) -> None:
        self.job_id = job_id
        self._seen_event = 0  # the newest metrics event read (its seq)
        self._lease_expiry: datetime | None = None

    def update(self, url: str) -> None:
        """Read the job's newest metrics event (if new) and its lease's expiry; a failure to
        read is only logged (the next poll reads again)."""
        try:
            with session_scope(url) as session:
                self._read(session)
        except Exception as exc:
            log.debug("could not read the metrics of job %s: %s", self.job_id, exc)

    def _read(self, session: Session) -> None:
        event = session.execute(
            select(JobEvent.seq, JobEvent.data)
            .where(
                JobEvent.job_id == self.job_id,
                JobEvent.seq > self._seen_event,
                JobEvent.type == "metrics",
            )
            .order_by(JobEvent.seq.desc())
            .limit(1)
        ).one_or_none()
        if event is not None:
            self._seen_event = event.seq
            data = event.data or {}
            for gauge, key in (
                (STEPS_PER_SECOND, "steps_per_second"),
                (TOKENS_PER_SECOND, "tokens_per_second"),
            ):
                if isinstance(data.get(key), int | float):
                    gauge.labels(self.job_id).set(data[key])
        expiry = session.scalar(select(Job.lease_expires_at).where(Job.id == self.job_id))
        if expiry is not None and self._lease_expiry is not None and expiry > self._lease_expiry:
            LEASE_ACTIONS.labels("renewed").inc()
        if expiry is not None:
            self._lease_expiry = expiry

    def remove(self) -> None:
        """The job no longer runs here: its series go."""
        for gauge in (STEPS_PER_SECOND, TOKENS_PER_SECOND):
            with contextlib.suppress(KeyError):
                gauge.remove(self.job_id)
