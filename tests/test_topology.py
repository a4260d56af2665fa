"""The topology of docker-compose.yml, without Docker: PostgreSQL, Redis, one control API
(`tunehouse api --role control`), one inference API (`--role inference`) and two workers with
names of their own, each a real process started as a user (or the compose file) starts it.
Three jobs sent to the control API train to success across both workers, and the inference API
serves every model they produced."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import select

from app.core.db import session_scope
from app.models import Job
from tests.deploy_support import compose_service_healthcheck
from tests.stacks import replicated_stack
from tests.support import ROOT, Stack, fresh_postgres_database, jsonl, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.postgres]

JOBS = 3


@dataclass
class Cluster:
    stack: Stack
    key: str
    control: str  # base URLs
    inference: str
    database_url: str
    workers: dict[int, str]  # worker process id -> its Celery node name
    run_id: str
    unknown_worker_check: subprocess.Popen[bytes]  # the healthcheck for a name nobody has
    owners: dict[str, set[str]] = field(default_factory=dict)  # job id -> lease holders seen

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"}


@pytest.fixture(scope="module")
def cluster(
    tmp_path_factory: pytest.TempPathFactory, postgres_url: str, redis_url: str
) -> Iterator[Cluster]:
    tmp = tmp_path_factory.mktemp("topology")
    # A queue and node names of this run's own: other stacks on the same Redis (another test
    # session) neither take its jobs nor answer its pings.
    run_id = uuid.uuid4().hex[:8]
    names = [f"celery@topology-{run_id}-{letter}" for letter in "ab"]
    workers = [("--name", names[0]), ("--name", names[1], "--no-beat")]
    env = {"TUNEHOUSE_DEFAULT_QUEUE": f"topology-{run_id}"}
    with (
        fresh_postgres_database(postgres_url) as database_url,
        replicated_stack(
            tmp,
            database_url,
            redis_url,
            roles=("control", "inference"),
            workers=workers,
            extra_env=env,
        ) as (stack, key, (control, inference)),
    ):
        worker_pids = [process.pid for process in stack.processes[2:]]
        unknown = worker_healthcheck(stack, f"topology-{run_id}-nobody")
        try:
            # Jobs go out once both workers take work: each answers a ping over the broker (polled
            # here in-process), then the compose healthcheck.
            wait_until(
                lambda: workers_answering(redis_url, names) == set(names),
                90,
                what="both workers to answer a ping",
            )

            def both_answer() -> bool:
                checks = [worker_healthcheck(stack, name.split("@", 1)[1]) for name in names]
                return all(check.wait(timeout=60) == 0 for check in checks)

            wait_until(both_answer, 60, interval=0, what="both workers to answer their healthcheck")
            yield Cluster(
                stack,
                key,
                control,
                inference,
                database_url,
                dict(zip(worker_pids, names, strict=True)),
                run_id,
                unknown,
            )
        finally:
            if unknown.poll() is None:
                unknown.kill()
            unknown.wait()


def workers_answering(broker_url: str, names: list[str]) -> set[str]:
    """The Celery nodes among ``names`` that answer a ping within a second."""
    from app.core.queue import make_celery
    from app.core.settings import Settings

    app = make_celery(Settings(_env_file=None, broker_url=broker_url))
    try:
        replies = app.control.ping(destination=names, timeout=1.0)
    finally:
        app.close()
    return {name for reply in replies for name in reply}


def worker_healthcheck(stack: Stack, hostname: str) -> subprocess.Popen[bytes]:
    """docker-compose.yml's worker healthcheck as a container with this HOSTNAME runs it, with
    `celery` on the PATH as in the image."""
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    return subprocess.Popen(
        compose_service_healthcheck("worker"),
        shell=True,
        cwd=ROOT,
        env={**stack.env, "HOSTNAME": hostname, "PATH": path},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def rows(model: int) -> list[dict[str, Any]]:
    """One feature whose sign decides the label; each model has labels of its own, so a
    prediction tells which model answered."""
    values = [round(-1 + 2 * i / 95, 4) for i in range(96)]
    return [
        {"features": [x], "label": f"m{model}-{'pos' if x > 0 else 'neg'}"} for x in values if x
    ]


def job_body(training_file: str, model: int) -> dict[str, Any]:
    return {
        "model": "tunehouse/mlp",
        "training_file": training_file,
        "seed": model,
        "suffix": f"topo{model}",
        "method": {
            "type": "supervised",
            "supervised": {
                "hyperparameters": {"n_epochs": 4, "batch_size": 8, "learning_rate": 0.05},
                "architecture": {"hidden_sizes": [8], "activation": "relu", "dropout": 0.0},
            },
        },
    }


def lease_holders(database_url: str, job_ids: list[str]) -> dict[str, tuple[str, str | None]]:
    """Each job's status and lease holder (``host:pid-namespace:pid:token`` of the worker
    process that claimed it), read from the database as the workers write them."""
    with session_scope(database_url) as session:
        found = session.execute(
            select(Job.id, Job.status, Job.lease_owner).where(Job.id.in_(job_ids))
        )
        return {row.id: (row.status, row.lease_owner) for row in found}


def worker_of(cluster: Cluster, owner: str) -> str:
    """The node name of the worker whose process holds the lease ``owner``."""
    pid = int(owner.split(":")[2])
    assert pid in cluster.workers, f"lease holder {owner} is none of the workers {cluster.workers}"
    return cluster.workers[pid]


@pytest.fixture(scope="module")
def finished(cluster: Cluster) -> list[dict[str, Any]]:
    """Three jobs created at once through the control API, followed to their end; while they
    run, the lease holder of each is read from the database to learn which worker took it."""
    with httpx.Client(base_url=cluster.control, headers=cluster.headers(), timeout=60) as client:
        job_ids = []
        for model in range(JOBS):
            upload = client.post(
                "/v1/files",
                files={"file": (f"topo{model}.jsonl", jsonl(rows(model)))},
                data={"purpose": "fine-tune"},
            )
            assert upload.status_code == 200, upload.text
            created = client.post("/v1/fine_tuning/jobs", json=job_body(upload.json()["id"], model))
            assert created.status_code == 200, created.text
            job_ids.append(created.json()["id"])

        deadline = time.monotonic() + 150
        while time.monotonic() < deadline:
            states = lease_holders(cluster.database_url, job_ids)
            for job_id, (_, owner) in states.items():
                if owner:
                    cluster.owners.setdefault(job_id, set()).add(owner)
            if all(status in ("succeeded", "failed", "cancelled") for status, _ in states.values()):
                break
            time.sleep(0.1)
        else:
            raise AssertionError(f"jobs still running after 150 s: {states}")
        return [client.get(f"/v1/fine_tuning/jobs/{job_id}").json() for job_id in job_ids]


def test_three_jobs_succeed_across_both_workers(cluster: Cluster, finished: list) -> None:
    assert [job["status"] for job in finished] == ["succeeded"] * JOBS, finished
    assert all(job["fine_tuned_model"] for job in finished)
    ran_on = {}
    for job in finished:
        owners = cluster.owners.get(job["id"], set())
        assert len(owners) == 1, f"job {job['id']} was held by {owners}: one claim, no retry"
        ran_on[job["id"]] = worker_of(cluster, owners.pop())
    assert set(ran_on.values()) == set(cluster.workers.values()), ran_on


def test_the_inference_api_serves_every_model_the_jobs_produced(
    cluster: Cluster, finished: list
) -> None:
    served = httpx.get(f"{cluster.inference}/v1/models", headers=cluster.headers(), timeout=30)
    assert served.status_code == 200, served.text
    assert {job["fine_tuned_model"] for job in finished} <= {m["id"] for m in served.json()["data"]}
    for model, job in enumerate(finished):
        response = httpx.post(
            f"{cluster.inference}/v1/predictions",
            headers=cluster.headers(),
            json={"model": job["fine_tuned_model"], "input": [[0.9], [-0.9]]},
            timeout=120,
        )
        assert response.status_code == 200, response.text
        labels = [p["label"] for p in response.json()["data"]]
        assert labels == [f"m{model}-pos", f"m{model}-neg"], (job["fine_tuned_model"], labels)
    # The control API serves no predictions: inference is the other role's.
    refused = httpx.post(
        f"{cluster.control}/v1/predictions",
        headers=cluster.headers(),
        json={"model": finished[0]["fine_tuned_model"], "input": [[0.9]]},
        timeout=30,
    )
    assert refused.status_code == 404


def test_the_compose_worker_healthcheck_answers_for_each_worker_and_no_other(
    cluster: Cluster,
) -> None:
    """docker-compose.yml's worker healthcheck, run as written (the container's HOSTNAME is the
    host part of its node name), passed for both workers before any job was sent (the cluster
    waits for it); for a name no worker has, it fails."""
    assert cluster.unknown_worker_check.wait(timeout=60) != 0
