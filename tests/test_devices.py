"""Device queues (issue 11): a job asks for a device kind with `resources` and waits for a
worker of that queue; a worker takes jobs from its own queue only; what the job trained on is
recorded on it and in its events.

The API tests run in process on the embedded defaults (the filesystem broker keeps the
wake-ups as files named for their queue); the worker tests start `tunehouse worker` processes
as a user does and train the crash tests' small MLP job."""

from __future__ import annotations

import contextlib
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.crash_support import Deployment
from tests.support import ROOT, fresh_postgres_database, sentiment_rows, wait_until
from tests.test_jobs_api import create, retrieve, upload
from worker.reconciler import reconcile_once

# The crash tests' timings without their slowed steps: a reconcile every 2 s.
TIMINGS = {
    "TUNEHOUSE_HEARTBEAT_SECONDS": "1",
    "TUNEHOUSE_LEASE_SECONDS": "6",
    "TUNEHOUSE_RECONCILE_INTERVAL_SECONDS": "2",
    "TUNEHOUSE_REQUEUE_AFTER_SECONDS": "1",
    "TUNEHOUSE_CANCEL_POLL_SECONDS": "0.25",
    "TUNEHOUSE_CANCEL_GRACE_SECONDS": "4",
    "TUNEHOUSE_SHUTDOWN_GRACE_SECONDS": "20",
}


def wakeups(settings: Any, job_id: str) -> list[str]:
    """The queues of the job's wake-ups waiting in the filesystem broker (its files are named
    ``<time>_<uuid>.<queue>.msg``)."""
    folder = settings.broker_dir / "queue"
    if not folder.exists():
        return []
    return sorted(
        p.name.split(".")[-2]
        for p in folder.glob("*.msg")
        if job_id in p.read_text(errors="replace")
    )


def redis_queue_holds(deployment: Deployment, queue: str, job_id: str) -> bool:
    """Whether the Redis list of Celery queue ``queue`` holds a wake-up of ``job_id``."""
    import redis

    client = redis.Redis.from_url(deployment.env["TUNEHOUSE_BROKER_URL"])
    return any(job_id.encode() in message for message in client.lrange(queue, 0, -1))


# ---- the API -----------------------------------------------------------------------------------


def test_resources_are_stored_shown_and_route_the_wake_up(api: Any) -> None:
    file_id = upload(api, sentiment_rows(20, seed=1))
    response = create(api, file_id, resources={"device": "gpu", "processes": 2})
    assert response.status_code == 200, response.text
    gpu_job = response.json()
    assert gpu_job["resources"] == {"device": "gpu", "processes": 2}
    assert gpu_job["device"] is None  # nothing trained yet

    plain = create(api, file_id).json()
    assert plain["resources"] == {"device": "cpu", "processes": 1}  # TUNEHOUSE_DEFAULT_QUEUE
    custom = create(api, file_id, resources={"device": "a100-80g"}).json()
    assert custom["resources"] == {"device": "a100-80g", "processes": 1}

    # Validated after the response, each job is woken on its own queue.
    assert retrieve(api, gpu_job["id"])["status"] == "queued"
    assert wakeups(api.settings, gpu_job["id"]) == ["gpu"]
    assert wakeups(api.settings, plain["id"]) == ["cpu"]
    assert wakeups(api.settings, custom["id"]) == ["a100-80g"]
    listed = api.client.get("/v1/fine_tuning/jobs", headers=api.headers()).json()["data"]
    assert {j["id"]: j["resources"]["device"] for j in listed} == {
        gpu_job["id"]: "gpu",
        plain["id"]: "cpu",
        custom["id"]: "a100-80g",
    }


@pytest.mark.parametrize(
    ("resources", "param", "words"),
    [
        ({"device": "GPU"}, "resources.device", "lowercase letters"),
        ({"device": ""}, "resources.device", "worker queue's name"),
        ({"device": "x" * 64}, "resources.device", "1-63"),
        ({"device": "../gpu"}, "resources.device", "worker queue's name"),
        ({"device": 1}, "resources.device", "string"),
        ({"processes": 0}, "resources.processes", "greater than or equal to 1"),
        ({"processes": 65}, "resources.processes", "less than or equal to 64"),
        ({"processes": "two"}, "resources.processes", "integer"),
        ({"gpus": 2}, "resources.gpus", "Extra inputs are not permitted"),
        ("gpu", "resources", "object"),
    ],
)
def test_bad_resources_are_refused_with_their_parameter(
    api: Any, resources: object, param: str, words: str
) -> None:
    file_id = upload(api, sentiment_rows(20, seed=2))
    response = create(api, file_id, resources=resources)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param
    assert words in error["message"], error["message"]
    assert response.headers["x-should-retry"] == "false"


def test_openapi_states_the_constraints_of_resources(api: Any) -> None:
    schemas = api.client.get("/openapi.json").json()["components"]["schemas"]
    resources = schemas["Resources"]["properties"]
    assert resources["processes"]["minimum"] == 1 and resources["processes"]["maximum"] == 64
    device = next(s for s in resources["device"]["anyOf"] if s.get("type") == "string")
    assert device["pattern"] == "^[a-z0-9][a-z0-9_-]{0,62}$"
    assert "resources" in schemas["JobCreate"]["properties"]
    job = schemas["JobObject"]["properties"]
    assert "resources" in job and "device" in job


def test_the_reconciler_resends_a_lost_wake_up_to_the_jobs_queue(api: Any) -> None:
    file_id = upload(api, sentiment_rows(20, seed=3))
    gpu_job = create(api, file_id, resources={"device": "gpu"}).json()["id"]
    plain = create(api, file_id).json()["id"]
    for message in (api.settings.broker_dir / "queue").glob("*.msg"):
        message.unlink()  # the broker lost them
    settings = api.settings.model_copy(update={"requeue_after_seconds": 0})
    assert reconcile_once(settings)["enqueued"] == 2
    assert wakeups(api.settings, gpu_job) == ["gpu"]
    assert wakeups(api.settings, plain) == ["cpu"]


def test_the_worker_refuses_a_bad_queue_name(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "app.cli", "worker", "--queue", "Big GPUs"],
        env={"TUNEHOUSE_DATA_DIR": str(tmp_path), "PATH": "/usr/bin:/bin"},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2, result.stdout + result.stderr
    assert "worker_queue" in result.stderr and "pattern" in result.stderr


# ---- workers -----------------------------------------------------------------------------------


@pytest.fixture(params=["embedded", pytest.param("postgres+redis", marks=pytest.mark.postgres)])
def deployment(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Deployment]:
    with contextlib.ExitStack() as stack:
        env: dict[str, str] = {}
        if request.param == "postgres+redis":
            server = request.getfixturevalue("postgres_url")
            env["TUNEHOUSE_BROKER_URL"] = request.getfixturevalue("redis_url")
            env["TUNEHOUSE_DATABASE_URL"] = stack.enter_context(
                fresh_postgres_database(server, prefix="tunehouse_devices")
            )
        deployment = Deployment.create(request.param, tmp_path, timings=TIMINGS, **env)
        try:
            yield deployment
        except BaseException:
            print(deployment.logs())
            raise
        finally:
            deployment.stop_workers()
            deployment.cancel_active()


# On the filesystem broker, whose queues are our own code; tests/test_topology.py runs two workers
# on Redis.
@pytest.mark.slow
@pytest.mark.parametrize("deployment", ["embedded"], indirect=True)
def test_each_worker_takes_the_jobs_of_its_own_queue(deployment: Deployment) -> None:
    deployment.start_worker("cpu")  # the default queue
    gpu_job = deployment.create_job(resources={"device": "gpu"})
    plain = deployment.create_job()
    job = deployment.wait_status(plain, "succeeded")
    assert job.device == "cpu"
    assert "Training on cpu" in deployment.events(plain)

    # The gpu job is still waiting, though the cpu worker's reconciler has sent its wake-up
    # again since (to the gpu queue, which nobody reads).
    if deployment.name == "embedded":  # its broker's messages are files, named for the queue
        wait_until(lambda: len(wakeups(deployment.settings, gpu_job)) >= 2, 20, what="a re-send")
        assert set(wakeups(deployment.settings, gpu_job)) == {"gpu"}
    else:
        wait_until(lambda: redis_queue_holds(deployment, "gpu", gpu_job), 20, what="a wake-up")
    waiting = deployment.job(gpu_job)
    assert (waiting.status, waiting.attempt, waiting.device) == ("queued", 0, None)
    assert "Fine-tuning job started" not in deployment.events(gpu_job)

    # A worker of another queue takes that queue's jobs, and only those.
    deployment.start_worker("big", beat=False, TUNEHOUSE_WORKER_QUEUE="big")
    big = deployment.create_job(resources={"device": "big"})
    done = deployment.wait_status(big, "succeeded")
    assert done.queue == "big" and done.device == "cpu"
    assert "Worker for queue big" in deployment.worker_log("big")
    assert deployment.job(gpu_job).status == "queued"
    with deployment.client() as client:
        shown = client.get(f"/v1/fine_tuning/jobs/{big}").json()
    assert (shown["resources"], shown["device"]) == ({"device": "big", "processes": 1}, "cpu")


@pytest.mark.slow
# The refusal is the supervisor's, the same on either deployment: the embedded one suffices.
@pytest.mark.parametrize("deployment", ["embedded"], indirect=True)
def test_a_job_asking_more_processes_than_its_worker_runs_fails_clearly(
    deployment: Deployment,
) -> None:
    deployment.start_worker("small", TUNEHOUSE_WORKER_MAX_PROCESSES="2")
    job_id = deployment.create_job(resources={"processes": 3})
    job = deployment.wait_status(job_id, "failed", timeout=60)
    assert job.error is not None
    assert job.error["code"] == "invalid_resources"
    assert job.error["param"] == "resources.processes"
    assert "resources.processes is 3" in job.error["message"]
    assert "at most 2" in job.error["message"]
    assert job.attempt == 0  # refused before it started
    ok = deployment.create_job()
    assert deployment.wait_status(ok, "succeeded").attempt == 1


def test_worker_devices_bound_the_processes_of_a_job(tmp_path: Path) -> None:
    from tests.conftest import make_settings

    assert make_settings(tmp_path, worker_devices="0,1").worker_process_limit == 2
    uuids = make_settings(tmp_path, worker_devices='["GPU-5c1a", "GPU-77f0", "2"]')
    assert uuids.worker_devices == ["GPU-5c1a", "GPU-77f0", "2"]
    assert make_settings(tmp_path, worker_max_processes=3).worker_process_limit == 3
    both = make_settings(tmp_path, worker_devices="0,1,2,3", worker_max_processes=2)
    assert both.worker_process_limit == 2
    with pytest.raises(ValueError, match="listed twice"):
        make_settings(tmp_path, worker_devices="0,0")
