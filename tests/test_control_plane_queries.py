"""The control plane's queries with many jobs (bench/control_plane.py measures them at 10,000):
a reconciler pass re-sends a bounded number of wake-ups, the longest idle first, and every
idle job comes round; on PostgreSQL, a list page after a cursor, the check that a file is in
use and the reconciler's idle jobs read only about the rows they return, not every job."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event, insert
from sqlalchemy.orm import Session

from app.core.db import get_engine, session_scope
from app.core.ids import new_id
from app.core.migrate import upgrade
from app.core.storage import Storage
from app.models import File, Job, utcnow
from app.services import files, jobs, keys, leases
from tests.conftest import make_settings
from tests.support import BASE_MODEL, fresh_postgres_database
from worker import reconciler

ORG = "acme"


def seed_idle_jobs(url: str, count: int) -> list[str]:
    """``count`` queued jobs of one organization on one file, idle for an hour or more: job
    i waited i minutes longer than job i+1. Returns their ids, the longest idle first."""
    now = utcnow()
    with session_scope(url) as session:
        org = keys.get_or_create_organization(session, ORG)
        file = File(id=new_id("file"), organization_id=org.id, filename="train.jsonl",
                    purpose="fine-tune", bytes=1, sha256="0" * 64, format="classification",
                    storage_path="files/x")  # fmt: skip
        session.add(file)
        session.flush()
        rows: list[dict[str, Any]] = [
            dict(
                id=new_id("ftjob"),
                organization_id=org.id,
                model=BASE_MODEL,
                task="classification",
                training_file=file.id,
                status=jobs.QUEUED,
                hyperparameters={},
                method={},
                seed=0,
                integrations=[],
                result_files=[],
                steps_completed=0,
                attempt=0,
                crash_count=0,
                created_at=now - timedelta(minutes=60 + count - i),
                updated_at=now - timedelta(minutes=60 + count - i),
            )  # fmt: skip
            for i in range(count)
        ]
        session.execute(insert(Job), rows)
    return [row["id"] for row in rows]


# ---- the reconciler's wake-ups (SQLite and PostgreSQL) -----------------------------------------


def test_a_reconcile_pass_resends_a_bounded_number_of_wakeups_and_every_job_comes_round(
    database_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A backlog of 12 idle queued jobs and a limit of 5 wake-ups a pass (200 in production):
    # the whole backlog each pass took minutes at 10,000 and flooded the broker.
    monkeypatch.setattr(leases, "STALE_JOBS_PER_PASS", 5, raising=False)
    settings = make_settings(tmp_path / "data", database_url=database_url)
    backlog = seed_idle_jobs(database_url, 12)
    queue = settings.broker_dir / "queue"
    seen: set[str] = set()

    def woken_by_a_pass() -> tuple[int, list[str]]:
        """A pass's count of wake-ups, and the jobs whose wake-up it left in the broker."""
        count = reconciler.reconcile_once(settings)["enqueued"]
        messages = [p.read_text(errors="replace") for p in queue.iterdir()]
        new = [job for job in backlog if job not in seen and any(job in m for m in messages)]
        seen.update(new)
        return count, new

    # The longest idle first; a job just woken is not idle again before the others came round.
    assert woken_by_a_pass() == (5, backlog[:5])
    assert woken_by_a_pass() == (5, backlog[5:10])
    assert woken_by_a_pass() == (2, backlog[10:])
    messages = [p.read_text(errors="replace") for p in queue.iterdir()]
    assert all(sum(job in m for m in messages) == 1 for job in backlog)  # each woken once


# ---- what the queries read (PostgreSQL's plans) -------------------------------------------------


def rows_read(session: Session, call: Callable[[], Any]) -> int:
    """Rows of ``jobs`` that PostgreSQL read (returned or filtered out) to answer the SELECTs
    ``call`` makes, from EXPLAIN ANALYZE of each."""
    statements: list[tuple[str, Any]] = []

    def capture(_conn: Any, _cursor: Any, statement: str, parameters: Any, *_: Any) -> None:
        if statement.lstrip().upper().startswith("SELECT") and "FROM jobs" in statement:
            statements.append((statement, parameters))

    engine = session.get_bind()
    event.listen(engine, "before_cursor_execute", capture)
    try:
        call()
    finally:
        event.remove(engine, "before_cursor_execute", capture)
    assert statements, "the call made no query of jobs"
    total = 0
    for statement, parameters in statements:
        explain = f"EXPLAIN (ANALYZE, FORMAT JSON) {statement}"
        plan = session.connection().exec_driver_sql(explain, parameters).scalar_one()
        total += _jobs_rows(plan[0]["Plan"])
    return total


def _jobs_rows(node: dict[str, Any]) -> int:
    own = 0
    if node.get("Relation Name") == "jobs":
        own = node["Actual Rows"] * node["Actual Loops"] + node.get("Rows Removed by Filter", 0)
        own += node.get("Rows Removed by Index Recheck", 0)
    return own + sum(_jobs_rows(child) for child in node.get("Plans", []))


@pytest.mark.postgres
def test_pages_file_checks_and_idle_jobs_read_about_the_rows_they_return(
    postgres_url: str, tmp_path: Path
) -> None:
    with fresh_postgres_database(postgres_url, "th_plans") as url:
        upgrade(url)
        backlog = seed_idle_jobs(url, 400)
        with get_engine(url).connect().execution_options(isolation_level="AUTOCOMMIT") as c:
            c.exec_driver_sql("ANALYZE jobs")
        storage = Storage(tmp_path)
        with session_scope(url) as session:
            org = keys.get_or_create_organization(session, ORG)
            unused = files.store_result_file(session, storage, org.id, "metrics.csv", b"a\n1\n")
            # Newest first: a cursor on the 201st oldest job is 199 jobs deep.
            deep = backlog[200]

            def page_after() -> None:
                rows, more = jobs.list_jobs(session, org, limit=20, after=deep)
                assert [r.id for r in rows] == backlog[199:179:-1] and more

            def delete_unused_file() -> None:
                files.delete_file(session, storage, org, unused.id)

            def idle_jobs() -> None:
                assert leases.stale_job_ids(session, jobs.QUEUED, 60, limit=5) == backlog[:5]

            # The cursor's own row, then the page and the one row that says more follow.
            assert rows_read(session, page_after) <= 1 + 21 + 2
            # A file no job uses (they all train on another): no job is read to learn that.
            assert rows_read(session, delete_unused_file) == 0
            # The reconciler's longest idle queued jobs: its limit, not the whole backlog.
            assert rows_read(session, idle_jobs) <= 5 + 2
            session.rollback()
