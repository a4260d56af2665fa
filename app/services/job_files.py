"""Validating a job's files before it is queued: the API does it after answering a create, a
worker or the reconciler when the API stopped first. The files are read again as the trainer
will read them, outside any transaction (a large file takes a while, and on SQLite every other
writer would wait for it); the job's state change is then one short conditional transaction.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, replace
from pathlib import Path

from sqlalchemy.orm import Session

from app.core.kinds import FORMAT_TABULAR, LABELLED_FORMATS
from app.core.settings import Settings
from app.core.storage import Storage
from app.models import File, Job
from app.services.datasets import DatasetError, DatasetInfo, DatasetLimits, validate_dataset
from app.services.jobs import QUEUED, VALIDATING, fail_job, transition


class FileProblem(Exception):
    """A job's file that cannot be trained on: fails the job with ``code`` and ``param``."""

    def __init__(self, message: str, param: str, code: str | None = None):
        super().__init__(message)
        self.message, self.param, self.code = message, param, code or f"invalid_{param}"


@dataclass(frozen=True)
class JobFile:
    """One of a job's files as validation reads it: ``path`` is None when its row is gone."""

    id: str
    param: str  # training_file or validation_file
    path: Path | None
    format: str | None


@dataclass(frozen=True)
class FilesToValidate:
    """What validating a job's files needs from the database, read in one short transaction
    so that the files themselves are read outside any."""

    job_id: str
    task: str
    training: JobFile
    validation: JobFile | None


def files_to_validate(session: Session, storage: Storage, job_id: str) -> FilesToValidate | None:
    """The job's files, if the job is still ``validating_files``; else None."""
    job = session.get(Job, job_id)
    if job is None or job.status != VALIDATING:
        return None

    def stored(file_id: str, param: str) -> JobFile:
        file = session.get(File, file_id)
        if file is None:
            return JobFile(file_id, param, None, None)
        return JobFile(file_id, param, storage.resolve(file.storage_path), file.format)

    validation = job.validation_file
    return FilesToValidate(
        job_id=job.id,
        task=job.task,
        training=stored(job.training_file, "training_file"),
        validation=stored(validation, "validation_file") if validation else None,
    )


def _revalidate(file: JobFile, limits: DatasetLimits) -> DatasetInfo:
    if file.path is None:
        raise FileProblem(f"File '{file.id}' was deleted before the job started.", file.param)
    try:
        return validate_dataset(file.path, fmt=file.format, limits=limits)
    except DatasetError as exc:
        raise FileProblem(f"File '{file.id}' is not valid: {exc}", file.param) from None
    except OSError as exc:  # named by its id: the server's paths stay out of job errors
        reason = exc.strerror or type(exc).__name__
        raise FileProblem(f"File '{file.id}' cannot be read: {reason}.", file.param) from None


def _check_validation_matches(task: str, training: DatasetInfo, validation: DatasetInfo) -> None:
    if task in LABELLED_FORMATS and not set(validation.labels) <= set(training.labels):
        unseen = sorted(set(validation.labels) - set(training.labels))
        raise FileProblem(
            f"The validation file has labels the training file lacks: {unseen}",
            "validation_file",
        )
    features = training.stats.get("features")
    if task == FORMAT_TABULAR and validation.stats.get("features") != features:
        raise FileProblem(
            f"The validation rows have {validation.stats.get('features')} features; the "
            f"training rows have {features}.",
            "validation_file",
        )


def check_job_files(files: FilesToValidate, limits: DatasetLimits) -> FileProblem | None:
    """Read the job's files again, as the trainer will (no database here: it may take a
    while). None when they can be trained on, else what is wrong with them."""
    try:
        training = _revalidate(files.training, limits)
        if files.validation is not None:
            # A validation file may hold a label once: only the training file needs examples.
            validation = _revalidate(files.validation, replace(limits, min_examples_per_label=1))
            _check_validation_matches(files.task, training, validation)
    except FileProblem as problem:
        return problem
    return None


def settle_validation(session: Session, job_id: str, problem: FileProblem | None) -> bool:
    """Queue the job, or fail it with ``problem`` (``invalid_training_file``, ...), if it is
    still ``validating_files``. True when queued."""
    if problem is not None:
        fail_job(
            session,
            job_id,
            code=problem.code,
            message=problem.message,
            param=problem.param,
            from_=(VALIDATING,),
        )
        return False
    return transition(
        session,
        job_id,
        to=QUEUED,
        from_=(VALIDATING,),
        message="Files validated, moving job to queued state",
    )


def validate_job_files(
    settings: Settings, job_id: str, *, sessions: Callable[[], AbstractContextManager[Session]]
) -> bool:
    """Validate a ``validating_files`` job's files and queue or fail it; True when queued.

    ``sessions()`` gives one unit of work (the caller's, committed when it ends): one to read
    the job, one for its state change. The files are read between the two, outside any
    transaction, so that on SQLite no writer waits for a large file to be read."""
    with sessions() as session:
        files = files_to_validate(session, Storage(settings.storage_root), job_id)
    if files is None:
        return False
    problem = check_job_files(files, DatasetLimits.from_settings(settings))
    with sessions() as session:
        return settle_validation(session, job_id, problem)
