"""Runs one job: claims it with a lease, starts the training process, watches it.

The training process is spawned: a fresh interpreter (``python -m worker.runner``), never a
fork of a process that may hold CUDA state. It starts in its own session and process group, so
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
from functools import partial

from app.core.db import session_scope
from app.core.ids import random_token
from app.core.process import process_identity
from app.core.queue import enqueue_job
from app.core.retry import retry_for
from app.core.settings import Settings
from app.services import job_files, jobs, leases
from worker import janitor

log = logging.getLogger(__name__)

# Set when the worker is asked to stop (SIGTERM, Ctrl-C): every running job checkpoints and
# goes back to the queue, so the warm shutdown ends within its grace period.
DRAINING = threading.Event()


def worker_identity() -> str:
    return process_identity(random_token(6))


def supervise_job(settings: Settings, job_id: str) -> None:
    url = settings.sqlalchemy_url
    if DRAINING.is_set():
        log.info("worker is shutting down; leaving job %s in the queue", job_id)
        enqueue_job(settings, job_id)  # this delivery is acknowledged; send another
        return
    with session_scope(url) as session:
        state = leases.lease_state(session, job_id)
    if state is None:
        log.info("job %s is gone; nothing to do", job_id)
        return
    if state.status == jobs.VALIDATING:
        # The API stopped before validating; finish its work here.
        job_files.validate_job_files(settings, job_id, sessions=partial(session_scope, url))
    owner = worker_identity()
    with session_scope(url) as session:
        if not leases.claim_job(session, job_id, owner, settings.lease_seconds):
            log.info("job %s is not ready to start (taken, leased, finished or cancelled)", job_id)
            return
    log.info("job %s claimed by %s", job_id, owner)

    process = subprocess.Popen(
        [sys.executable, "-m", "worker.runner", job_id, owner], start_new_session=True
    )
    _watch(settings, job_id, owner, process)
    log.info("training process for %s exited with %s", job_id, process.returncode)
    _settle(settings, job_id, owner, process.returncode)


def _watch(settings: Settings, job_id: str, owner: str, process: subprocess.Popen[bytes]) -> None:
    """Wait for the process; stop it when the job stops being ours to run."""
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
                    leases.hand_back(session, job_id, owner, "The worker is shutting down")
                state = leases.lease_state(session, job_id)
        except Exception:  # a database blip: keep training, look again next time
            log.warning("could not read job %s; will retry", job_id, exc_info=True)
            continue
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


def _settle(settings: Settings, job_id: str, owner: str, code: int | None) -> None:
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
                return outcome == jobs.QUEUED
            return leases.release_lease(session, job_id, owner) == jobs.QUEUED

    try:
        wake = retry_for(settings.lease_seconds, settle, what=f"settling job {job_id}")
    except Exception:  # the lease runs out; the reconciler settles it instead
        log.exception("could not settle job %s; the reconciler will", job_id)
        return
    janitor.tidy_if_ended(settings, job_id)  # an ended job's training state goes at once
    if wake:
        enqueue_job(settings, job_id)


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
