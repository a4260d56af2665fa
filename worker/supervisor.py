"""Runs one job: claims it with a lease, starts the training process, watches it.

The training process is spawned: a fresh interpreter (``python -m worker.runner``), never a
fork of a process that may hold CUDA state, and a subprocess rather than a multiprocessing child
because Celery's pool processes are daemonic and may not have those. It starts in its own
session and process group, so stopping the group stops everything it started. It renews the
lease itself; this side watches the job row and stops the process when the job is cancelled or
no longer leased to us.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys

from sqlalchemy import select

from app.core.db import session_scope
from app.core.ids import random_token
from app.core.settings import Settings
from app.models import Job
from app.services import jobs

log = logging.getLogger(__name__)


def worker_identity() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{random_token(6)}"


def supervise_job(settings: Settings, job_id: str) -> None:
    url = settings.sqlalchemy_url
    with session_scope(url) as session:
        job = session.get(Job, job_id)
        if job is None:
            log.info("job %s is gone; nothing to do", job_id)
            return
        if job.status == jobs.VALIDATING:
            # The API stopped before validating; finish its work here.
            jobs.validate_job_files(session, settings, job_id)
    owner = worker_identity()
    with session_scope(url) as session:
        if not jobs.claim_job(session, job_id, owner, settings.lease_seconds):
            log.info("job %s is not queued (already taken, finished or cancelled)", job_id)
            return
    log.info("job %s claimed by %s", job_id, owner)

    process = subprocess.Popen(
        [sys.executable, "-m", "worker.runner", job_id, owner], start_new_session=True
    )
    stopped_by_us = _watch(settings, job_id, owner, process)
    code = process.returncode
    log.info("training process for %s exited with %s", job_id, code)
    if code != 0 and not stopped_by_us:
        with session_scope(url) as session:
            jobs.fail_job(
                session,
                job_id,
                code="training_process_died",
                message=f"The training process exited unexpectedly ({_describe(code)}).",
                owner=owner,
                from_=(jobs.RUNNING,),
            )


def _watch(settings: Settings, job_id: str, owner: str, process: subprocess.Popen[bytes]) -> bool:
    """Wait for the process; stop it if the job stops being ours. True if we stopped it."""
    while True:
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=settings.cancel_poll_seconds)
        if process.returncode is not None:
            return False
        try:
            with session_scope(settings.sqlalchemy_url) as session:
                row = session.execute(
                    select(Job.status, Job.lease_owner).where(Job.id == job_id)
                ).one_or_none()
        except Exception:  # a database blip: keep training, look again next time
            log.warning("could not read job %s; will retry", job_id, exc_info=True)
            continue
        if row is None or row.status != jobs.RUNNING or row.lease_owner != owner:
            reason = "deleted" if row is None else row.status
            log.info("job %s is %s; stopping its training process", job_id, reason)
            stop_process(process, settings.cancel_grace_seconds)
            return True


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
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"
