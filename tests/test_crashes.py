"""Jobs survive crashes, restarts and redelivery (issue 4, design rules 1-3). These tests kill
real worker and training processes, on the embedded defaults and on PostgreSQL + Redis; nothing
of the broker or the database is mocked.

Every interrupted job must end with the same weights, bit for bit, as the same job run without
interruption, and no two training processes of one job may ever run at once."""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import select

from app.core.db import session_scope
from app.models import JobEvent
from tests.crash_support import (
    CHECKPOINT_EVERY,
    EPOCHS,
    JOB_BODY,
    STEPS_PER_EPOCH,
    Deployment,
    Link,
    RedisServer,
    TrainerWatch,
    gone,
    same_weights,
)
from tests.support import Stack, fresh_postgres_database, training_processes, wait_until

pytestmark = pytest.mark.slow

TOTAL_STEPS = STEPS_PER_EPOCH * EPOCHS
STARTED = "Fine-tuning job started"


@pytest.fixture(scope="session")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The weights of the job run once without interruption."""
    deployment = Deployment.create("reference", tmp_path_factory.mktemp("reference"))
    deployment.start_worker("a")
    try:
        job_id = deployment.create_job()
        job = deployment.wait_status(job_id, "succeeded")
        assert job.attempt == 1 and job.steps_completed == TOTAL_STEPS
        # Every CHECKPOINT_EVERY steps, pruned to the newest 3 (TUNEHOUSE_KEEP_CHECKPOINTS) and
        # each epoch's end.
        assert deployment.checkpoint_steps(job_id) == [STEPS_PER_EPOCH, 50, 55, TOTAL_STEPS]
        return deployment.final_weights(job_id)
    finally:
        deployment.stop_workers()


@pytest.fixture(
    scope="module", params=["embedded", pytest.param("postgres+redis", marks=pytest.mark.postgres)]
)
def deployment(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Deployment]:
    root = tmp_path_factory.mktemp(request.param)
    if request.param == "embedded":
        yield Deployment.create(request.param, root)
        return
    server = request.getfixturevalue("postgres_url")
    broker = request.getfixturevalue("redis_url")
    with fresh_postgres_database(server, prefix="tunehouse_crash") as url:
        yield Deployment.create(
            request.param, root, TUNEHOUSE_DATABASE_URL=url, TUNEHOUSE_BROKER_URL=broker
        )


@pytest.fixture
def cluster(deployment: Deployment) -> Iterator[Deployment]:
    """The deployment, its workers stopped and its jobs settled after each test."""
    try:
        yield deployment
    except BaseException:
        print(deployment.logs())
        raise
    finally:
        deployment.stop_workers()
        deployment.cancel_active()


def assert_resumed_exactly(
    cluster: Deployment, job_id: str, reference: dict[str, Any], *, from_step: int
) -> None:
    job = cluster.wait_status(job_id, "succeeded")
    events = cluster.events(job_id)
    assert f"Restarted from checkpoint at step {from_step}" in events, events
    assert events.count(STARTED) == job.attempt
    assert events.count("The job has successfully completed") == 1
    assert job.steps_completed == TOTAL_STEPS
    assert same_weights(cluster.final_weights(job_id), reference)


# --- 1, 2, 3: kill -9 -----------------------------------------------------------------------


def test_kill_9_the_worker_mid_training(cluster: Deployment, reference: dict[str, Any]) -> None:
    cluster.start_worker("a")
    cluster.start_worker("b", beat=False)
    job_id = cluster.create_job()
    with TrainerWatch(job_id) as watch:
        cluster.wait_steps(job_id, 2 * CHECKPOINT_EVERY + 2)
        holder = cluster.worker_holding(job_id)
        (trainer,) = training_processes(job_id)
        cluster.kill_worker(holder)
        wait_until(lambda: gone(trainer), 5, what="the trainer to die with its worker")
        saved = cluster.checkpoint_steps(job_id)[-1]
        assert saved >= 2 * CHECKPOINT_EVERY
        cluster.start_worker(holder, beat=holder == "a")  # the restarted one, or the other
        assert_resumed_exactly(cluster, job_id, reference, from_step=saved)
    job = cluster.job(job_id)
    assert watch.most == 1 and len(watch.seen) == 2  # two attempts, never at once
    assert (job.attempt, job.crash_count) == (2, 1)
    assert any("lost its worker" in m or "stopped renewing" in m for m in cluster.events(job_id))


def test_kill_9_the_training_process(cluster: Deployment, reference: dict[str, Any]) -> None:
    cluster.start_worker("a")
    job_id = cluster.create_job()
    with TrainerWatch(job_id) as watch:
        cluster.wait_steps(job_id, CHECKPOINT_EVERY + 3)
        (trainer,) = training_processes(job_id)
        import os

        os.kill(trainer, signal.SIGKILL)
        wait_until(lambda: gone(trainer), 5, what="the trainer to die")
        saved = cluster.checkpoint_steps(job_id)[-1]
        assert_resumed_exactly(cluster, job_id, reference, from_step=saved)
    job = cluster.job(job_id)
    assert watch.most == 1 and len(watch.seen) == 2
    assert (job.attempt, job.crash_count) == (2, 1)
    assert any("killed by SIGKILL" in m for m in cluster.events(job_id))


def test_kill_9_during_a_checkpoint_write(cluster: Deployment, reference: dict[str, Any]) -> None:
    # This worker takes 3 s over each checkpoint, between writing its files and the rename.
    cluster.start_worker("slow", TUNEHOUSE_DEBUG_CHECKPOINT_DELAY_SECONDS="3")
    job_id = cluster.create_job()
    folder = cluster.checkpoints_folder(job_id)
    with TrainerWatch(job_id) as watch:
        wait_until(
            lambda: (folder / f".tmp-step-{2 * CHECKPOINT_EVERY}").is_dir(),
            90,
            0.05,
            what="the second checkpoint's write",
        )
        cluster.kill_worker("slow")
        assert cluster.checkpoint_steps(job_id) == [CHECKPOINT_EVERY]  # the half-written one
        assert not (folder / f"step-{2 * CHECKPOINT_EVERY}").exists()  # is not a checkpoint
        cluster.start_worker("a")
        assert_resumed_exactly(cluster, job_id, reference, from_step=CHECKPOINT_EVERY)
    assert watch.most == 1
    assert not list(folder.glob(".tmp-*"))  # the leftover was cleared when rewritten


# --- 6: a job that crashes every time ------------------------------------------------------


def test_a_job_that_crashes_every_time_fails_after_max_attempts(cluster: Deployment) -> None:
    cluster.start_worker("a", TUNEHOUSE_MAX_ATTEMPTS="2")
    doomed = cluster.create_job()
    other = cluster.create_job(seed=12)
    killed: list[int] = []
    stop = threading.Event()

    def crash_it_every_time() -> None:  # as an out-of-memory killer would
        import os

        while not stop.is_set():
            for pid in training_processes(doomed):
                if pid not in killed:
                    time.sleep(1.0)
                    os.kill(pid, signal.SIGKILL)
                    killed.append(pid)
            time.sleep(0.05)

    killer = threading.Thread(target=crash_it_every_time, daemon=True)
    killer.start()
    try:
        job = cluster.wait_status(doomed, "failed")
    finally:
        stop.set()
        killer.join()
    assert job.error is not None and job.error["code"] == "max_attempts_exceeded"
    assert "crashed 2 times" in job.error["message"]
    assert "killed by SIGKILL" in job.error["message"]
    assert "Traceback" not in job.error["message"]
    assert (job.attempt, job.crash_count, len(killed)) == (2, 2, 2)
    assert cluster.wait_status(other, "succeeded").attempt == 1  # the worker goes on


def test_a_failure_in_training_is_an_error_a_user_can_act_on(cluster: Deployment) -> None:
    cluster.start_worker("a")
    late = cluster.create_job(
        method={
            "type": "supervised",
            "supervised": {
                **JOB_BODY["method"]["supervised"],
                "hyperparameters": {
                    **JOB_BODY["method"]["supervised"]["hyperparameters"],
                    "max_duration": 2,
                },
            },
        }
    )
    following = cluster.create_job(seed=12)
    job = cluster.wait_status(late, "failed")
    assert job.error is not None and job.error["code"] == "max_duration_exceeded"
    assert "max_duration (2 s)" in job.error["message"]
    assert "Traceback" not in job.error["message"] and 'File "' not in job.error["message"]
    assert job.crash_count == 0  # a failure, not a crash: not retried
    with session_scope(cluster.settings.sqlalchemy_url) as session:
        last = session.scalars(
            select(JobEvent).where(JobEvent.job_id == late).order_by(JobEvent.seq.desc())
        ).first()
    assert last is not None and last.level == "error" and "max_duration" in last.message
    assert f"training of {late} ran past its max_duration" in cluster.worker_log("a")
    assert cluster.wait_status(following, "succeeded").attempt == 1  # the worker goes on


# --- 7: cancel, pause and resume -----------------------------------------------------------


def test_cancel_queued_running_and_twice(cluster: Deployment) -> None:
    cluster.start_worker("a")
    running = cluster.create_job()
    queued = cluster.create_job(seed=12)
    cluster.wait_steps(running, 3)
    assert cluster.job(queued).status == "queued"  # one worker, busy

    response = cluster.post(f"/v1/fine_tuning/jobs/{queued}/cancel")
    assert response.status_code == 200 and response.json()["status"] == "cancelled"

    trainer = training_processes(running)[0]
    asked = time.monotonic()
    response = cluster.post(f"/v1/fine_tuning/jobs/{running}/cancel")
    assert response.status_code == 200 and response.json()["status"] == "cancelled"
    assert time.monotonic() - asked < 5
    grace = float(cluster.env["TUNEHOUSE_CANCEL_GRACE_SECONDS"])
    wait_until(lambda: gone(trainer), grace + 1, 0.05, what="the trainer to be gone")
    again = cluster.post(f"/v1/fine_tuning/jobs/{running}/cancel")
    assert again.status_code == 200 and again.json()["status"] == "cancelled"

    # The worker takes its next job; the cancelled queued one never started.
    following = cluster.create_job(seed=13)
    cluster.wait_steps(following, 1)
    assert STARTED not in cluster.events(queued)
    assert cluster.job(running).status == "cancelled"
    cluster.post(f"/v1/fine_tuning/jobs/{following}/cancel")


def test_pause_then_resume_reaches_the_same_weights(
    cluster: Deployment, reference: dict[str, Any]
) -> None:
    cluster.start_worker("a")
    job_id = cluster.create_job()
    with TrainerWatch(job_id) as watch:
        cluster.wait_steps(job_id, CHECKPOINT_EVERY + 2)
        trainer = training_processes(job_id)[0]
        before = cluster.job(job_id).steps_completed or 0
        response = cluster.post(f"/v1/fine_tuning/jobs/{job_id}/pause")
        assert response.status_code == 200 and response.json()["status"] == "paused"
        wait_until(lambda: gone(trainer), 10, 0.05, what="the paused trainer to exit")
        (paused,) = [m for m in cluster.events(job_id) if "paused; checkpoint saved" in m]
        step = int(paused.rsplit(" ", 1)[1])
        assert step >= before and cluster.checkpoint_steps(job_id)[-1] == step  # nothing lost

        # The worker is free: another job runs while this one is paused.
        other = cluster.create_job(seed=12)
        cluster.wait_steps(other, 1)
        assert cluster.job(job_id).status == "paused"
        cluster.post(f"/v1/fine_tuning/jobs/{other}/cancel")

        response = cluster.post(f"/v1/fine_tuning/jobs/{job_id}/resume")
        assert response.status_code == 200 and response.json()["status"] == "queued"
        assert_resumed_exactly(cluster, job_id, reference, from_step=step)
    job = cluster.job(job_id)
    assert watch.most == 1 and (job.attempt, job.crash_count) == (2, 0)


# --- 8: SIGTERM --------------------------------------------------------------------------


def test_sigterm_checkpoints_and_hands_the_job_to_another_worker(
    cluster: Deployment, reference: dict[str, Any]
) -> None:
    cluster.start_worker("a")
    cluster.start_worker("b", beat=False)
    job_id = cluster.create_job()
    with TrainerWatch(job_id) as watch:
        cluster.wait_steps(job_id, CHECKPOINT_EVERY + 2)
        holder = cluster.worker_holding(job_id)
        before = cluster.job(job_id).steps_completed or 0
        cluster.kill_worker(holder, signal.SIGTERM)
        cluster.workers[holder].wait(timeout=float(cluster.env["TUNEHOUSE_SHUTDOWN_GRACE_SECONDS"]))
        (stopped,) = [m for m in cluster.events(job_id) if "worker's shutdown; checkpoint" in m]
        step = int(stopped.rsplit(" ", 1)[1])
        assert step >= before and cluster.checkpoint_steps(job_id)[-1] == step  # nothing lost
        assert_resumed_exactly(cluster, job_id, reference, from_step=step)
    job = cluster.job(job_id)
    assert watch.most == 1 and (job.attempt, job.crash_count) == (2, 0)
    other = "b" if holder == "a" else "a"
    assert job.lease_owner is None
    assert f"job {job_id} claimed" in cluster.worker_log(other)


# --- PostgreSQL + Redis only: the broker's redelivery and restarts, a database outage --------


@pytest.fixture
def redis_server(tmp_path: Path, redis_url: str) -> Iterator[RedisServer]:
    with RedisServer(tmp_path) as server:
        yield server


@pytest.fixture
def database(postgres_url: str) -> Iterator[str]:
    with fresh_postgres_database(postgres_url, prefix="tunehouse_crash") as url:
        yield url


@contextlib.contextmanager
def on_postgres(tmp_path: Path, database: str, broker_url: str, **env: str) -> Iterator[Deployment]:
    """A deployment of its own on PostgreSQL and the given Redis; its logs printed on failure."""
    cluster = Deployment.create(
        "postgres",
        tmp_path,
        timings=None,
        TUNEHOUSE_DATABASE_URL=database,
        TUNEHOUSE_BROKER_URL=broker_url,
        **env,
    )
    try:
        yield cluster
    except BaseException:
        print(cluster.logs())
        raise
    finally:
        cluster.stop_workers()


@pytest.mark.postgres
def test_short_visibility_timeout_never_makes_twins(
    tmp_path: Path, database: str, redis_server: RedisServer, reference: dict[str, Any]
) -> None:
    with on_postgres(
        tmp_path, database, redis_server.url, TUNEHOUSE_BROKER_VISIBILITY_TIMEOUT="2"
    ) as cluster:
        # Slower steps: kombu looks for unacknowledged messages to hand out again only every
        # tenth idle poll (about 10 s), and the redelivery must come while the job runs.
        slow = "0.4"
        cluster.start_worker("a", TUNEHOUSE_DEBUG_STEP_DELAY_SECONDS=slow)
        cluster.start_worker("b", beat=False, TUNEHOUSE_DEBUG_STEP_DELAY_SECONDS=slow)
        job_id = cluster.create_job()
        with TrainerWatch(job_id) as watch:
            job = cluster.wait_status(job_id, "succeeded")
        logs = cluster.worker_log("a") + cluster.worker_log("b")
        # Redis handed the unacknowledged wake-up out again; the second delivery did nothing.
        assert f"job {job_id} is not ready to start" in logs
        assert watch.most == 1 and (job.attempt, job.crash_count) == (1, 0)
        assert same_weights(cluster.final_weights(job_id), reference)


@pytest.mark.postgres
def test_redis_restarted_empty_loses_no_job_and_doubles_none(
    tmp_path: Path, database: str, redis_server: RedisServer, reference: dict[str, Any]
) -> None:
    with on_postgres(tmp_path, database, redis_server.url) as cluster:
        cluster.start_worker("a")
        first = cluster.create_job()
        waiting = [cluster.create_job() for _ in range(2)]
        cluster.wait_steps(first, 3)
        redis_server.kill()  # every queued wake-up is lost with it
        time.sleep(1)
        redis_server.start()
        jobs = [
            cluster.wait_status(job_id, "succeeded", timeout=180) for job_id in [first, *waiting]
        ]
        for job in jobs:
            events = cluster.events(job.id)
            assert (job.attempt, job.crash_count) == (1, 0), events
            assert events.count("The job has successfully completed") == 1
            assert same_weights(cluster.final_weights(job.id), reference)


@pytest.mark.postgres
def test_creating_a_job_while_redis_is_down_answers_at_once_and_runs_later(
    tmp_path: Path, database: str, redis_server: RedisServer
) -> None:
    with on_postgres(tmp_path, database, redis_server.url) as cluster:
        api = Stack("api", cluster.env, tmp_path)
        api.start("api", "--port", str(api.port), "--role", "control", log="api")
        try:
            api.wait_ready(60)
            redis_server.kill()
            body = {
                **cluster.job_body,
                "training_file": cluster.training_file,
                "validation_file": cluster.validation_file,
            }
            started = time.monotonic()
            response = httpx.post(
                f"{api.base_url}/v1/fine_tuning/jobs",
                json=body,
                headers={"Authorization": f"Bearer {cluster.key}"},
                timeout=30,
            )
            answered = time.monotonic() - started
        finally:
            api.stop()
        assert response.status_code == 200, response.text
        assert answered < 2, answered
        job_id = response.json()["id"]
        cluster.wait_status(job_id, "queued", timeout=30)  # stored, waiting for the broker

        redis_server.start()
        cluster.start_worker("a")
        job = cluster.wait_status(job_id, "succeeded")
        assert (job.attempt, job.crash_count) == (1, 0)


@pytest.mark.postgres
def test_training_goes_on_through_a_short_database_outage(
    tmp_path: Path, database: str, redis_url: str, reference: dict[str, Any]
) -> None:
    port = int(database.rsplit(":", 1)[1].split("/")[0])
    link = Link(port)
    through_link = database.replace(f":{port}/", f":{link.port}/")
    try:
        with on_postgres(tmp_path, database, redis_url) as cluster:
            cluster.start_worker("a", TUNEHOUSE_DATABASE_URL=through_link)
            job_id = cluster.create_job()
            cluster.wait_steps(job_id, CHECKPOINT_EVERY + 2)
            (trainer,) = training_processes(job_id)
            link.cut()
            time.sleep(4)  # shorter than the lease (6 s)
            assert not gone(trainer)  # still training
            link.restore()
            job = cluster.wait_status(job_id, "succeeded")
            assert (job.attempt, job.crash_count) == (1, 0)
            assert same_weights(cluster.final_weights(job_id), reference)
            log = cluster.worker_log("a")
            assert "heartbeat for" in log and "failed" in log  # it did lose the database
    finally:
        link.close()
