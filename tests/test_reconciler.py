"""The reconciler's pass over jobs left validating (issue 9 A8): files are read outside any
transaction and each job's change is committed on its own, so the API and the trainers can
write while a large file is read; on PostgreSQL one pass acts at a time."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, select, text
from sqlalchemy.orm import Session

from app.core.db import get_engine, session_scope
from app.core.migrate import upgrade
from app.core.settings import Settings
from app.core.storage import Storage
from app.models import Job
from app.schemas import JobCreate
from app.services import job_files, jobs, keys
from tests.conftest import make_settings
from tests.support import (
    BASE_MODEL,
    add_training_file,
    fresh_postgres_database,
    jsonl,
    sentiment_rows,
)
from worker import reconciler

ORG = "org-reconciler"


def validating_job(settings: Settings) -> str:
    """A job as an API process that stopped at once leaves it: created, still validating."""
    with session_scope(settings.sqlalchemy_url) as session:
        org = keys.get_or_create_organization(session, ORG)
        content = jsonl(sentiment_rows(20, seed=1))
        file_id = add_training_file(session, Storage(settings.storage_root), org.id, content)
        job, _ = jobs.create_job(
            session, settings, org, JobCreate(model=BASE_MODEL, training_file=file_id)
        )
        return job.id


def statuses(settings: Settings, job_ids: list[str]) -> list[str]:
    with session_scope(settings.sqlalchemy_url) as session:
        rows = dict(session.execute(select(Job.id, Job.status).where(Job.id.in_(job_ids))).all())
    return [rows[job_id] for job_id in job_ids]


@pytest.fixture
def sqlite_settings(tmp_path: Path) -> Iterator[Settings]:
    settings = make_settings(tmp_path / "data", requeue_after_seconds=0)
    upgrade(settings.sqlalchemy_url)
    yield settings
    get_engine(settings.sqlalchemy_url).dispose()


def test_writers_go_on_while_the_reconciler_reads_files_on_sqlite(
    sqlite_settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While the reconciler reads each stale job's file (made slow here), another connection
    that waits at most 1 s for SQLite's write lock creates an API key: it never waits."""
    settings = sqlite_settings
    job_ids = [validating_job(settings) for _ in range(3)]
    # Another process's connection, with a busy timeout of 1 s instead of the server's 30 s.
    impatient = create_engine(settings.sqlalchemy_url, connect_args={"timeout": 1})
    writes: list[float] = []
    read = job_files.validate_dataset

    def slow_read(path: Path, **kwargs: Any) -> Any:
        started = time.monotonic()
        with Session(impatient) as session:
            keys.create_key(session, ORG, name=f"while reading {path.name}")
            session.commit()  # "database is locked" if the reconciler holds the write lock
        writes.append(time.monotonic() - started)
        time.sleep(0.2)  # a large file
        return read(path, **kwargs)

    monkeypatch.setattr(job_files, "validate_dataset", slow_read)
    try:
        summary = reconciler.reconcile_once(settings)
    finally:
        impatient.dispose()
    assert summary["enqueued"] == 3
    assert statuses(settings, job_ids) == [jobs.QUEUED] * 3
    assert len(writes) == 3 and max(writes) < 0.9  # none waited for the lock
    with session_scope(settings.sqlalchemy_url) as session:
        org = keys.get_or_create_organization(session, ORG)
        created, _ = keys.list_keys(session, org, limit=10, after=None)
    assert len(created) == 3


def test_each_job_is_committed_before_the_next_file_is_read(
    sqlite_settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A file that cannot be read leaves the jobs validated before it queued, and fails only
    its own job: the pass commits job by job."""
    settings = sqlite_settings
    first, second = validating_job(settings), validating_job(settings)
    read = job_files.validate_dataset
    seen: list[list[str]] = []

    def read_second_badly(path: Path, **kwargs: Any) -> Any:
        seen.append(statuses(settings, [first, second]))
        if len(seen) == 2:
            raise PermissionError(13, "Permission denied", str(path))
        return read(path, **kwargs)

    monkeypatch.setattr(job_files, "validate_dataset", read_second_badly)
    reconciler.reconcile_once(settings)
    # While the second file was read, the first job was queued already, for everyone to see.
    assert seen == [[jobs.VALIDATING, jobs.VALIDATING], [jobs.QUEUED, jobs.VALIDATING]]
    assert statuses(settings, [first, second]) == [jobs.QUEUED, jobs.FAILED]
    with session_scope(settings.sqlalchemy_url) as session:
        job = session.get(Job, second)
        assert job is not None and job.error is not None
        assert job.error["code"] == "invalid_training_file"
        assert job.error["message"] == (
            f"File '{job.training_file}' cannot be read: Permission denied."
        )


def transactions_open(url: str) -> int:
    """Other connections to this PostgreSQL database that are inside a transaction."""
    with get_engine(url).connect() as connection:
        return int(
            connection.scalar(
                text(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                    " AND pid <> pg_backend_pid() AND xact_start IS NOT NULL"
                )
            )
            or 0
        )


@pytest.mark.postgres
def test_one_reconciler_acts_at_a_time_on_postgres(
    postgres_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A pass that is reading files holds the advisory lock (without a transaction): a second
    pass meanwhile is skipped; the lock is free again once the first pass ends."""
    with fresh_postgres_database(postgres_url, "tunehouse_reconcile") as url:
        upgrade(url)
        settings = make_settings(tmp_path / "data", database_url=url, requeue_after_seconds=0)
        job_id = validating_job(settings)
        reading, release = threading.Event(), threading.Event()
        read = job_files.validate_dataset

        def held_read(path: Path, **kwargs: Any) -> Any:
            open_transactions.append(transactions_open(url))
            reading.set()
            assert release.wait(30), "the test did not release the first pass"
            return read(path, **kwargs)

        monkeypatch.setattr(job_files, "validate_dataset", held_read)
        results: list[dict[str, Any]] = []
        open_transactions: list[int] = []
        first = threading.Thread(target=lambda: results.append(reconciler.reconcile_once(settings)))
        first.start()
        try:
            assert reading.wait(30), "the first pass never read the file"
            assert reconciler.reconcile_once(settings) == {"skipped": True}
            # Reading a file holds no transaction: other writers are not blocked meanwhile.
            with session_scope(url) as session:
                keys.create_key(session, ORG, name="while the reconciler reads")
        finally:
            release.set()
            first.join(30)
        assert open_transactions == [0]  # the file was read with no transaction open
        assert results and results[0]["enqueued"] == 1
        assert statuses(settings, [job_id]) == [jobs.QUEUED]
        assert reconciler.reconcile_once(settings) == {"enqueued": 1, "expired": 0, "failed": 0}
        get_engine(url).dispose()


def test_validation_reads_no_job_that_is_not_validating(sqlite_settings: Settings) -> None:
    settings = sqlite_settings
    job_id = validating_job(settings)
    sessions = lambda: session_scope(settings.sqlalchemy_url)  # noqa: E731
    assert job_files.validate_job_files(settings, job_id, sessions=sessions)
    # A second validation (the API's, after the reconciler's) finds nothing to do.
    assert not job_files.validate_job_files(settings, job_id, sessions=sessions)
    assert statuses(settings, [job_id]) == [jobs.QUEUED]
