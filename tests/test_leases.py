"""Leases and the reconciler (design rules 1 and 2), at the service level, on SQLite and on
PostgreSQL: one claim wins, a redelivered wake-up does nothing, state changes are conditional,
and what the broker loses the reconciler sends again from the database."""

from __future__ import annotations

import subprocess
import sys
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import partial
from pathlib import Path

import pytest
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from app.core.db import session_scope
from app.core.errors import Conflict
from app.core.process import process_identity
from app.core.queue import enqueue_job
from app.core.settings import Settings
from app.core.storage import Storage
from app.models import Job, JobEvent, utcnow
from app.schemas import JobCreate
from app.services import job_files, jobs, keys, leases
from app.services.leases import HeldLease
from tests.conftest import make_settings
from tests.support import (
    BASE_MODEL,
    add_training_file,
    jsonl,
    sentiment_rows,
    training_processes,
)
from worker import reconciler, supervisor


@dataclass
class World:
    settings: Settings
    org_name: str

    @property
    def url(self) -> str:
        return self.settings.sqlalchemy_url

    def queue_files(self) -> list[Path]:
        folder = self.settings.broker_dir / "queue"
        return [p for p in folder.iterdir() if p.is_file()] if folder.exists() else []

    def wakeups_for(self, job_id: str) -> int:
        return sum(job_id in p.read_text(errors="replace") for p in self.queue_files())

    def job(self, job_id: str) -> Job:
        with session_scope(self.url) as session:
            job = session.get(Job, job_id)
            assert job is not None
            return job

    def events(self, job_id: str) -> list[JobEvent]:
        with session_scope(self.url) as session:
            return list(
                session.scalars(
                    select(JobEvent).where(JobEvent.job_id == job_id).order_by(JobEvent.seq)
                )
            )

    def new_job(self) -> str:
        """A job as the API leaves it: created, files validated, queued."""
        with session_scope(self.url) as session:
            org = keys.get_or_create_organization(session, self.org_name)
            content = jsonl(sentiment_rows(20, seed=1))
            storage = Storage(self.settings.storage_root)
            file_id = add_training_file(session, storage, org.id, content)
            body = JobCreate(model=BASE_MODEL, training_file=file_id)
            job, created = jobs.create_job(session, self.settings, org, body)
            assert created
            job_id = job.id
        sessions = partial(session_scope, self.url)
        assert job_files.validate_job_files(self.settings, job_id, sessions=sessions)
        assert self.job(job_id).status == jobs.QUEUED
        return job_id

    def claim(self, job_id: str, owner: str, lease_seconds: int = 60) -> bool:
        with session_scope(self.url) as session:
            return leases.claim_job(session, job_id, owner, lease_seconds)

    def expire_lease(self, job_id: str) -> None:
        with session_scope(self.url) as session:
            session.execute(
                update(Job)
                .where(Job.id == job_id)
                .values(lease_expires_at=utcnow() - timedelta(seconds=5))
            )


@pytest.fixture
def world(database_url: str, tmp_path: Path) -> World:
    settings = make_settings(
        tmp_path / "data",
        database_url=database_url,
        requeue_after_seconds=0,
        max_attempts=2,
        lease_seconds=60,
    )
    return World(settings, f"org-{uuid.uuid4().hex[:8]}")


def test_claim_wins_once(world: World) -> None:
    job_id = world.new_job()
    before = utcnow()
    assert world.claim(job_id, "worker-a") is True
    job = world.job(job_id)
    assert job.status == jobs.RUNNING
    assert job.lease_owner == "worker-a"
    assert job.attempt == 1
    assert job.started_at is not None
    assert job.lease_expires_at is not None
    assert before + timedelta(seconds=55) < job.lease_expires_at < utcnow() + timedelta(seconds=65)

    # A redelivered wake-up, to this worker or another one, finds nothing to claim.
    assert world.claim(job_id, "worker-b") is False
    assert world.claim(job_id, "worker-a") is False
    again = world.job(job_id)
    assert (again.status, again.lease_owner, again.attempt) == (jobs.RUNNING, "worker-a", 1)
    assert again.lease_expires_at == job.lease_expires_at
    started = [e for e in world.events(job_id) if e.message == "Fine-tuning job started"]
    assert len(started) == 1


def test_renew_lease(world: World) -> None:
    job_id = world.new_job()
    assert world.claim(job_id, "worker-a", lease_seconds=10)
    first = world.job(job_id).lease_expires_at
    assert first is not None
    with session_scope(world.url) as session:
        assert leases.renew_lease(session, job_id, "worker-b", 60) is None
    assert world.job(job_id).lease_expires_at == first
    with session_scope(world.url) as session:
        assert leases.renew_lease(session, job_id, "worker-a", 60) == jobs.RUNNING
    renewed = world.job(job_id).lease_expires_at
    assert renewed is not None and renewed > first + timedelta(seconds=40)

    with session_scope(world.url) as session:
        org = keys.get_or_create_organization(session, world.org_name)
        assert jobs.cancel_job(session, org, job_id).status == jobs.CANCELLED
    with session_scope(world.url) as session:
        assert leases.renew_lease(session, job_id, "worker-a", 60) is None
    cancelled = world.job(job_id)
    assert cancelled.status == jobs.CANCELLED
    assert cancelled.lease_owner is None


def test_transition_is_conditional(world: World) -> None:
    job_id = world.new_job()
    assert world.claim(job_id, "worker-a")
    with session_scope(world.url) as session:
        # Not the owner: nothing moves, no progress is recorded.
        assert not jobs.transition(
            session, job_id, to=jobs.SUCCEEDED, from_=(jobs.RUNNING,), owner="worker-b"
        )
        assert not leases.record_progress(
            session, job_id, "worker-b", steps_completed=5, total_steps=10, estimated_finish=None
        )
    assert world.job(job_id).status == jobs.RUNNING
    assert world.job(job_id).steps_completed == 0

    with session_scope(world.url) as session:
        org = keys.get_or_create_organization(session, world.org_name)
        jobs.cancel_job(session, org, job_id)
    with session_scope(world.url) as session:
        moved = jobs.transition(
            session,
            job_id,
            to=jobs.SUCCEEDED,
            from_=(jobs.RUNNING,),
            owner="worker-a",
            message="Fine-tuning job finished",
        )
        assert moved is False
        assert not jobs.transition(session, job_id, to=jobs.SUCCEEDED, from_=jobs.ACTIVE)
        assert not jobs.fail_job(session, job_id, code="x", message="too late")
    job = world.job(job_id)
    assert job.status == jobs.CANCELLED
    assert job.error is None
    messages = [e.message for e in world.events(job_id)]
    assert "Fine-tuning job finished" not in messages
    assert messages[-1] == "Fine-tuning job cancelled"


def test_supervise_job_leased_by_another_worker_does_nothing(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    job_id = world.new_job()
    assert world.claim(job_id, "someone-else")
    before = world.job(job_id)
    events_before = len(world.events(job_id))
    started: list[object] = []

    def no_process(*args: object, **kwargs: object) -> None:
        started.append(args)
        raise AssertionError("a training process was started for a job leased elsewhere")

    monkeypatch.setattr(supervisor.subprocess, "Popen", no_process)
    supervisor.supervise_job(world.settings, job_id)
    assert started == []
    assert training_processes(job_id) == []
    after = world.job(job_id)
    for field in ("status", "lease_owner", "lease_expires_at", "attempt", "updated_at", "error"):
        assert getattr(after, field) == getattr(before, field), field
    assert len(world.events(job_id)) == events_before


def test_supervise_job_that_was_cancelled_does_nothing(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    job_id = world.new_job()
    with session_scope(world.url) as session:
        org = keys.get_or_create_organization(session, world.org_name)
        jobs.cancel_job(session, org, job_id)
    started: list[object] = []
    monkeypatch.setattr(supervisor.subprocess, "Popen", lambda *a, **k: started.append(a))
    supervisor.supervise_job(world.settings, job_id)
    assert started == []
    job = world.job(job_id)
    assert (job.status, job.attempt, job.lease_owner) == (jobs.CANCELLED, 0, None)


def test_reconciler_resends_a_lost_wakeup(world: World) -> None:
    job_id = world.new_job()
    assert enqueue_job(world.settings, job_id)
    assert world.wakeups_for(job_id) == 1
    for message in world.queue_files():  # the broker loses its contents
        message.unlink()
    assert world.wakeups_for(job_id) == 0

    summary = reconciler.reconcile_once(world.settings)
    assert summary["enqueued"] == 1
    assert world.wakeups_for(job_id) == 1
    job = world.job(job_id)
    assert job.status == jobs.QUEUED
    assert job.attempt == 0


def test_reconciler_leaves_a_live_lease_alone(world: World) -> None:
    job_id = world.new_job()
    assert world.claim(job_id, "worker-a")
    before = world.job(job_id)
    summary = reconciler.reconcile_once(world.settings)
    assert summary == {"enqueued": 0, "expired": 0, "failed": 0}
    after = world.job(job_id)
    assert (after.status, after.lease_owner, after.attempt) == (jobs.RUNNING, "worker-a", 1)
    assert after.lease_expires_at == before.lease_expires_at
    assert world.wakeups_for(job_id) == 0


def test_reconciler_requeues_expired_lease_then_fails_after_max_attempts(world: World) -> None:
    assert world.settings.max_attempts == 2
    job_id = world.new_job()

    # First attempt: the worker dies and its lease runs out.
    assert world.claim(job_id, "worker-a")
    world.expire_lease(job_id)
    summary = reconciler.reconcile_once(world.settings)
    assert summary["expired"] == 1 and summary["failed"] == 0
    job = world.job(job_id)
    assert job.status == jobs.QUEUED
    assert job.attempt == 1  # kept: it counts how many times the job was started
    assert job.lease_owner is None and job.lease_expires_at is None
    assert job.finished_at is None
    warn = world.events(job_id)[-1]
    assert warn.level == "warn"
    assert "stopped renewing its lease" in warn.message
    assert "queued again" in warn.message and "crash 1 of at most 2" in warn.message
    assert job.crash_count == 1
    assert world.wakeups_for(job_id) == 1
    # The dead worker's lease is gone: it can neither renew nor finish the job.
    with session_scope(world.url) as session:
        assert not leases.renew_lease(session, job_id, "worker-a", 60)

    # Second attempt: the same again, and now the job has used max_attempts.
    assert world.claim(job_id, "worker-b")
    assert world.job(job_id).attempt == 2
    world.expire_lease(job_id)
    for message in world.queue_files():
        message.unlink()
    summary = reconciler.reconcile_once(world.settings)
    assert summary["failed"] == 1 and summary["expired"] == 0
    job = world.job(job_id)
    assert job.status == jobs.FAILED
    assert job.error is not None
    assert job.error["code"] == "max_attempts_exceeded"
    assert "crashed 2 times" in job.error["message"]
    assert job.attempt == 2 and job.crash_count == 2
    assert job.finished_at is not None
    assert job.lease_owner is None
    last = world.events(job_id)[-1]
    assert last.level == "error"
    assert world.wakeups_for(job_id) == 0  # a failed job is not woken
    # And it stays failed.
    assert world.claim(job_id, "worker-c") is False
    assert reconciler.reconcile_once(world.settings)["failed"] == 0
    assert world.job(job_id).status == jobs.FAILED


def test_pause_keeps_the_lease_until_the_trainer_has_checkpointed(world: World) -> None:
    job_id = world.new_job()
    assert world.claim(job_id, "worker-a")
    with session_scope(world.url) as session:
        org = keys.get_or_create_organization(session, world.org_name)
        assert jobs.pause_job(session, org, job_id).status == jobs.PAUSED
        assert jobs.pause_job(session, org, job_id).status == jobs.PAUSED  # a no-op
    # The trainer keeps its lease while it writes the checkpoint, and hears it must stop.
    with session_scope(world.url) as session:
        assert leases.renew_lease(session, job_id, "worker-a", 60) == jobs.PAUSED
    # Resumed before the trainer has gone: queued, but nobody may start it yet.
    with session_scope(world.url) as session:
        org = keys.get_or_create_organization(session, world.org_name)
        assert jobs.resume_job(session, org, job_id).status == jobs.QUEUED
        assert jobs.resume_job(session, org, job_id).status == jobs.QUEUED  # a no-op
    assert world.claim(job_id, "worker-b") is False
    # The trainer exits; its worker lets go, and the next claim wins.
    with session_scope(world.url) as session:
        assert leases.release_lease(session, job_id, "worker-a") == jobs.QUEUED
        assert leases.release_lease(session, job_id, "worker-a") is None
    assert world.claim(job_id, "worker-b") is True
    job = world.job(job_id)
    assert job.attempt == 2 and job.crash_count == 0  # a pause is not a crash
    messages = [e.message for e in world.events(job_id)]
    assert any("Pause requested" in m for m in messages)
    assert any("resumed; it goes on from step" in m for m in messages)


def test_pause_and_resume_refuse_finished_jobs(world: World) -> None:
    job_id = world.new_job()
    with session_scope(world.url) as session:
        org = keys.get_or_create_organization(session, world.org_name)
        assert jobs.resume_job(session, org, job_id).status == jobs.QUEUED  # already: a no-op
    with session_scope(world.url) as session:
        org = keys.get_or_create_organization(session, world.org_name)
        jobs.cancel_job(session, org, job_id)
    with session_scope(world.url) as session:
        org = keys.get_or_create_organization(session, world.org_name)
        with pytest.raises(Conflict):
            jobs.pause_job(session, org, job_id)
        with pytest.raises(Conflict):
            jobs.resume_job(session, org, job_id)
    assert world.job(job_id).status == jobs.CANCELLED


def test_a_lease_whose_holder_is_gone_from_this_machine_is_not_waited_out(
    world: World,
) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    job_id = world.new_job()
    host, namespace, _, _ = process_identity("x").split(":")
    assert world.claim(job_id, f"{host}:{namespace}:{dead.pid}:abcdef", lease_seconds=600)
    alive = world.new_job()
    assert world.claim(alive, process_identity("abcdef"), lease_seconds=600)
    elsewhere = world.new_job()
    assert world.claim(elsewhere, f"other-host:{namespace}:{dead.pid}:abcdef", lease_seconds=600)

    summary = reconciler.reconcile_once(world.settings)
    assert summary["expired"] == 1
    assert world.job(job_id).status == jobs.QUEUED
    assert "lost its worker" in world.events(job_id)[-1].message
    assert world.job(alive).status == jobs.RUNNING  # our own process: alive
    assert world.job(elsewhere).status == jobs.RUNNING  # another machine: wait for the lease


@pytest.mark.parametrize("earlier_crashes", [0, 1], ids=["would-requeue", "would-fail"])
@pytest.mark.parametrize("lease", ["ran-out", "holder-gone"])
def test_reconciler_leaves_a_lease_renewed_after_it_looked(
    world: World, monkeypatch: pytest.MonkeyPatch, lease: str, earlier_crashes: int
) -> None:
    """Issue 9 A7: the reconciler reads a lease that looks lost; the trainer's heartbeat
    renews it (committed by another session) before the reconciler records the crash. The
    heartbeat wins: the job runs on under its owner, and no crash is counted."""
    job_id = world.new_job()
    if lease == "ran-out":
        owner = "worker-a"
        assert world.claim(job_id, owner)
        world.expire_lease(job_id)
    else:  # a process of this machine that the reconciler finds gone
        dead = subprocess.Popen([sys.executable, "-c", "pass"])
        dead.wait()
        host, namespace, _, _ = process_identity("x").split(":")
        owner = f"{host}:{namespace}:{dead.pid}:abcdef"
        assert world.claim(job_id, owner, lease_seconds=600)
    with session_scope(world.url) as session:
        session.execute(update(Job).where(Job.id == job_id).values(crash_count=earlier_crashes))
    events_before = len(world.events(job_id))
    read_leases = leases.expired_or_local_leases

    def read_then_heartbeat(session: Session, prefix: str, now: datetime) -> list[HeldLease]:
        found = read_leases(session, prefix, now)
        assert job_id in [job.id for job in found]
        with session_scope(world.url) as heartbeat:
            assert leases.renew_lease(heartbeat, job_id, owner, 600) == jobs.RUNNING
        return found

    monkeypatch.setattr(leases, "expired_or_local_leases", read_then_heartbeat)
    summary = reconciler.reconcile_once(world.settings)
    assert summary == {"enqueued": 0, "expired": 0, "failed": 0}
    job = world.job(job_id)
    assert (job.status, job.lease_owner, job.error) == (jobs.RUNNING, owner, None)
    assert job.crash_count == earlier_crashes
    assert job.lease_expires_at is not None
    assert job.lease_expires_at > utcnow() + timedelta(seconds=500)
    assert len(world.events(job_id)) == events_before
    assert world.wakeups_for(job_id) == 0
