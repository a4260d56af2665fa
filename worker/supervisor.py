"""Runs one job: claims it with a lease, starts the training process, watches it.

The training process is spawned: a fresh interpreter (``python -m worker.runner``), never a
fork of a process that may hold CUDA state. A job of several processes gets torchrun's elastic
agent instead (``python -m worker.runner --processes N``), which starts and watches its ranks
and forwards signals to them (docs/distributed.md); to this side it is one process all the
same. The worker's devices (``TUNEHOUSE_WORKER_DEVICES``) are the training process's
``CUDA_VISIBLE_DEVICES``. It starts in its own session and process group, so
stopping the group stops everything it started, and it dies with the thread that started it
(a parent-death signal). It renews the lease itself; this side watches the job row and stops
the process when the job is cancelled, paused or no longer leased to us, or when the worker is
asked to shut down. Whatever way the process ends, this side settles the job afterwards:

- it finished, failed or was cancelled: nothing more to do;
- it was paused or handed back (shutdown): it wrote a checkpoint; the lease is released, and a
  job that is queued again gets its wake-up;
- it died without settling the job (killed, out of memory, a crash): that is a crash; the job
  goes back to the queue to resume from its newest complete checkpoint, or fails after
  ``max_attempts`` crashes.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass
from functools import partial

from sqlalchemy import or_, select
from sqlalchemy.orm import Session

from app.core.db import session_scope
from app.core.ids import random_token
from app.core.logs import ATTEMPT_ENV, job_context, set_attempt
from app.core.process import process_identity
from app.core.queue import enqueue_job
from app.core.retry import retry_for
from app.core.settings import Settings
from app.models import Job, utcnow
from app.services import job_files, jobs, leases
from worker import janitor
from worker.metrics import LEASE_ACTIONS, JobGauges

log = logging.getLogger(__name__)

# Set when the worker is asked to stop (SIGTERM, Ctrl-C): every running job checkpoints and
# goes back to the queue, so the warm shutdown ends within its grace period.
DRAINING = threading.Event()


def worker_identity() -> str:
    return process_identity(random_token(6))


@dataclass(frozen=True)
class Placement:
    """Where a job's wake-ups go and how many processes train it."""

    queue: str
    processes: int


def placement(settings: Settings, session: Session, job_id: str) -> Placement | None:
    row = session.execute(select(Job.queue, Job.resources).where(Job.id == job_id)).one_or_none()
    if row is None:
        return None
    processes = int((row.resources or {}).get("processes", 1))
    return Placement(jobs.job_queue(settings, row.queue), processes)


def supervise_job(settings: Settings, job_id: str) -> None:
    with job_context(job_id):  # the lines logged about this job name it
        _supervise(settings, job_id)


def _supervise(settings: Settings, job_id: str) -> None:
    url = settings.sqlalchemy_url
    with session_scope(url) as session:
        state = leases.lease_state(session, job_id)
        place = placement(settings, session, job_id)
    if state is None or place is None:
        log.info("job %s is gone; nothing to do", job_id)
        return
    if DRAINING.is_set():
        log.info("worker is shutting down; leaving job %s in the queue", job_id)
        enqueue_job(settings, job_id, place.queue)  # this delivery is acknowledged; send another
        return
    if state.status == jobs.VALIDATING:
        # The API stopped before validating; finish its work here.
        job_files.validate_job_files(settings, job_id, sessions=partial(session_scope, url))
    if place.processes > settings.worker_process_limit:
        _refuse_too_many_processes(settings, job_id, place)
        return
    owner = worker_identity()
    with session_scope(url) as session:
        if not leases.claim_job(session, job_id, owner, settings.lease_seconds):
            log.info("job %s is not ready to start (taken, leased, finished or cancelled)", job_id)
            return
        attempt = session.scalar(select(Job.attempt).where(Job.id == job_id)) or 0
    LEASE_ACTIONS.labels("claimed").inc()
    set_attempt(attempt)
    log.info("job %s claimed by %s", job_id, owner)

    process = subprocess.Popen(
        training_command(settings, job_id, owner, place.processes),
        env={**training_environment(settings), ATTEMPT_ENV: str(attempt)},
        start_new_session=True,
    )
    _watch(settings, job_id, owner, process)
    log.info("training process for %s exited with %s", job_id, process.returncode)
    _settle(settings, job_id, owner, process.returncode, place.queue)


def training_command(settings: Settings, job_id: str, owner: str, processes: int) -> list[str]:
    """The training process of a job: the runner itself, or for several processes the
    runner's elastic agent, which gives its ranks as long to stop as this side gives it."""
    command = [sys.executable, "-m", "worker.runner", job_id, owner]
    if processes > 1:
        grace = max(settings.cancel_grace_seconds, settings.shutdown_grace_seconds)
        command += ["--processes", str(processes), "--shutdown-timeout", str(grace)]
    return command


def training_environment(settings: Settings) -> dict[str, str]:
    """This worker's environment, with its devices the only ones its training may see."""
    env = dict(os.environ)
    if settings.worker_devices:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(settings.worker_devices)
    return env


def _refuse_too_many_processes(settings: Settings, job_id: str, place: Placement) -> None:
    """A job asking for more processes than this worker can run fails (while nobody holds it),
    with what to change: waiting would not help, as the workers of a queue are alike."""
    limit = settings.worker_process_limit
    message = (
        f"resources.processes is {place.processes}, but the workers of queue '{place.queue}' "
        f"run at most {limit} processes per job (one per device). Ask for at most {limit}, "
        "or for another device."
    )
    with session_scope(settings.sqlalchemy_url) as session:
        failed = jobs.fail_job(
            session,
            job_id,
            code="invalid_resources",
            message=message,
            param="resources.processes",
            from_=(jobs.QUEUED,),
            when=(or_(Job.lease_owner.is_(None), Job.lease_expires_at < utcnow()),),
        )
    if failed:
        log.info("job %s failed: %s", job_id, message)
        janitor.tidy_if_ended(settings, job_id)


def _watch(settings: Settings, job_id: str, owner: str, process: subprocess.Popen[bytes]) -> None:
    """Wait for the process; stop it when the job stops being ours to run. Meanwhile the job's
    metrics follow what it reports (worker/metrics.py)."""
    gauges = JobGauges(job_id)
    try:
        _watch_until_gone(settings, job_id, owner, process, gauges)
    finally:
        gauges.remove()


def _watch_until_gone(
    settings: Settings,
    job_id: str,
    owner: str,
    process: subprocess.Popen[bytes],
    gauges: JobGauges,
) -> None:
    handed_back = False
    while True:
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=settings.cancel_poll_seconds)
        if process.returncode is not None:
            return
        try:
            with session_scope(settings.sqlalchemy_url) as session:
                if DRAINING.is_set() and not handed_back:
                    handed_back = True
                    if leases.hand_back(session, job_id, owner, "The worker is shutting down"):
                        LEASE_ACTIONS.labels("handed_back").inc()
                state = leases.lease_state(session, job_id)
        except Exception:  # a database blip: keep training, look again next time
            log.warning("could not read job %s; will retry", job_id, exc_info=True)
            continue
        gauges.update(settings.sqlalchemy_url)  # apart: the metrics never get in the way
        if state is None or state.owner != owner or state.status in jobs.TERMINAL:
            if state is not None and state.status in (jobs.SUCCEEDED, jobs.FAILED):
                # Most likely the trainer settled the job itself and is on its way out.
                with contextlib.suppress(subprocess.TimeoutExpired):
                    process.wait(timeout=settings.cancel_grace_seconds)
                if process.returncode is not None:
                    return
            reason = "deleted" if state is None else state.status
            log.info("job %s is %s; stopping its training process", job_id, reason)
            stop_process(process, settings.cancel_grace_seconds)
            return
        if state.status != jobs.RUNNING:  # paused, or handed back: checkpoint first
            log.info(
                "job %s is %s; its training process checkpoints and stops", job_id, state.status
            )
            stop_process(process, settings.shutdown_grace_seconds)
            return


def _settle(settings: Settings, job_id: str, owner: str, code: int | None, queue: str) -> None:
    """After the training process is gone: release the lease, wake a re-queued job, and count
    a process that died without settling its job as a crash."""

    def settle() -> bool:
        with session_scope(settings.sqlalchemy_url) as session:
            state = leases.lease_state(session, job_id)
            if state is not None and state.status == jobs.RUNNING and state.owner == owner:
                outcome = leases.record_crash(
                    session,
                    job_id,
                    owner=owner,
                    reason=f"stopped unexpectedly ({_describe(code)})",
                    max_attempts=settings.max_attempts,
                )
                action = "crashed"
            else:
                outcome = leases.release_lease(session, job_id, owner)
                action = "released"
        if outcome is not None:  # the lease was still ours
            LEASE_ACTIONS.labels(action).inc()
        return outcome == jobs.QUEUED

    try:
        wake = retry_for(settings.lease_seconds, settle, what=f"settling job {job_id}")
    except Exception:  # the lease runs out; the reconciler settles it instead
        log.exception("could not settle job %s; the reconciler will", job_id)
        return
    janitor.tidy_if_ended(settings, job_id)  # an ended job's training state goes at once
    if wake:
        enqueue_job(settings, job_id, queue)


def stop_process(process: subprocess.Popen[bytes], grace: float) -> None:
    """SIGTERM the process group, then SIGKILL whatever is left after ``grace`` seconds."""
    _signal_group(process.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=grace)
    # Anything the process started dies with its group, even if the process itself is gone.
    _signal_group(process.pid, signal.SIGKILL)
    process.wait()


def _signal_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def _describe(code: int | None) -> str:
    if code is None:
        return "still running"
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            return f"killed by signal {-code}"
        hint = "; out of memory?" if name == "SIGKILL" else ""
        return f"killed by {name}{hint}"
    return f"exit code {code}"
