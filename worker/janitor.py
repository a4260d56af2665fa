"""The janitor: what ended jobs, deleted models and expired files leave on disk goes.

- A job that has ended: succeeded, the training state of every checkpoint goes (their weights
  stay, servable as ``<model>:ckpt-step-N``) with the trainer's scratch; failed or cancelled,
  its whole directory goes (there is no model to serve its checkpoints as). Done by the
  supervisor right after the training process exits, and by the reconciler's sweep for jobs
  that ended with no trainer (cancelled while queued or paused, failed by the reconciler) or
  whose worker died first, once they have been over for longer than a trainer outlives its job.
- A succeeded job whose model was deleted: its checkpoints go too (they were the model's).
- An expired file: its row and bytes, once no job still to run uses it.
A queued or paused job's directory is never touched: the job goes on from it. Rows are forgotten
before files are removed, each in a short transaction of its own: no lock is held while files
are removed, and a crash leaves at worst files that the next sweep removes.
"""

from __future__ import annotations

import logging
import shutil
from datetime import datetime, timedelta

from app.core.db import session_scope
from app.core.settings import Settings
from app.core.storage import Storage, tree_bytes
from app.models import utcnow
from app.services import files, storage_cleanup
from app.services.storage_cleanup import REMOVED, TIDIED, EndedJob
from worker.training.checkpoint_dirs import complete_checkpoints, remove_checkpoint, weights_only

log = logging.getLogger(__name__)

SWEEP_BATCH = 100  # jobs, and files, a sweep handles at most; the next sweep goes on


def tidy_job(settings: Settings, job_id: str) -> str | None:
    """Tidy an ended job's directory; returns its new storage state, or None while the job
    may still run or be resumed."""
    with session_scope(settings.sqlalchemy_url) as session:
        ended = storage_cleanup.ended_job(session, job_id)
    if ended is None:
        return None
    storage = Storage(settings.storage_root)
    if ended.keeps_checkpoints:
        _keep_weights(settings, storage, job_id, ended)
        return TIDIED
    with session_scope(settings.sqlalchemy_url) as session:
        storage_cleanup.forget_checkpoints(session, job_id)
    job_dir = storage.job_dir(job_id)
    for path in complete_checkpoints(storage.checkpoints_dir(job_id)).values():
        remove_checkpoint(path)  # one by one: none is ever left looking complete
    shutil.rmtree(job_dir, ignore_errors=True)
    with session_scope(settings.sqlalchemy_url) as session:
        storage_cleanup.record_removed(session, job_id)
    return REMOVED


def _keep_weights(settings: Settings, storage: Storage, job_id: str, ended: EndedJob) -> None:
    """A succeeded job: its checkpoints keep their weights alone, and nothing else stays."""
    job_dir = storage.job_dir(job_id)
    checkpoints_dir = storage.checkpoints_dir(job_id)
    if job_dir.is_dir():
        for child in job_dir.iterdir():  # the trainer's scratch (its output dir, ...)
            if child != checkpoints_dir:
                shutil.rmtree(child, ignore_errors=True)
    sizes = weights_only(checkpoints_dir)
    for step in set(sizes) - ended.checkpoint_steps:  # no row: listed and served by nobody
        remove_checkpoint(checkpoints_dir / f"step-{step}")
        del sizes[step]
    model_bytes = None
    if ended.model_path is not None:
        model_bytes = tree_bytes(storage.resolve(ended.model_path))
    with session_scope(settings.sqlalchemy_url) as session:
        storage_cleanup.record_tidied(
            session,
            job_id,
            removed=sorted(ended.checkpoint_steps - set(sizes)),  # rows whose files are gone
            checkpoint_bytes=sizes,
            model_bytes=model_bytes,
        )


def tidy_if_ended(settings: Settings, job_id: str) -> None:
    """The supervisor's hook once a training process has exited: never fails its caller."""
    try:
        state = tidy_job(settings, job_id)
    except Exception:  # the reconciler's sweep tries again
        log.warning("could not tidy the files of job %s", job_id, exc_info=True)
        return
    if state is not None:
        log.info("job %s ended; its files are %s", job_id, state)


def sweep(settings: Settings, *, now: datetime | None = None) -> dict[str, int]:
    """The reconciler's pass: tidy ended jobs (and those whose model was deleted), delete
    expired files. Never fails its caller; returns what it did."""
    now = now or utcnow()
    # A trainer outlives its job by at most its lease and the grace it gets to stop.
    grace = timedelta(seconds=settings.lease_seconds + settings.cancel_grace_seconds)
    done = {"jobs_tidied": 0, "files_expired": 0}
    try:
        with session_scope(settings.sqlalchemy_url) as session:
            job_ids = storage_cleanup.jobs_to_tidy(
                session, finished_before=now - grace, limit=SWEEP_BATCH
            )
            file_ids = files.expired_file_ids(session, now, SWEEP_BATCH)
    except Exception:
        log.warning("storage sweep: could not read what to tidy", exc_info=True)
        return done
    for job_id in job_ids:
        try:
            done["jobs_tidied"] += tidy_job(settings, job_id) is not None
        except Exception:
            log.warning("storage sweep: could not tidy job %s", job_id, exc_info=True)
    storage = Storage(settings.storage_root)
    for file_id in file_ids:
        try:
            with session_scope(settings.sqlalchemy_url) as session:
                done["files_expired"] += files.delete_expired_file(session, storage, file_id, now)
        except Exception:
            log.warning("storage sweep: could not delete file %s", file_id, exc_info=True)
    if any(done.values()):
        log.info("storage sweep: %s", done)
    return done
