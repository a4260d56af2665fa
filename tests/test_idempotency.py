"""Idempotency-Key on job creation (IETF Idempotency-Key draft): the same key with the same
request returns the first job; the same key with another request is refused with 422
``idempotency_key_reused``, also when two such requests race, on SQLite and on PostgreSQL."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import event, func, select

from app.core.db import new_session, session_scope
from app.core.errors import TunehouseError
from app.core.migrate import upgrade
from app.core.settings import Settings
from app.main import create_app
from app.models import Job, Organization
from app.schemas import JobCreate
from app.services import jobs, keys
from tests.conftest import make_settings
from tests.served import served
from tests.support import BASE_MODEL, Response, jsonl, sentiment_rows
from tests.test_bad_input import assert_error


@dataclass
class Tenant:
    client: TestClient
    settings: Settings
    headers: dict[str, str]
    org_id: str
    file_id: str

    def create(self, idempotency_key: str, **body: object) -> Response:
        return self.client.post(
            "/v1/fine_tuning/jobs",
            headers={**self.headers, "Idempotency-Key": idempotency_key},
            json={"model": BASE_MODEL, "training_file": self.file_id, **body},
        )

    def job_count(self) -> int:
        with session_scope(self.settings.sqlalchemy_url) as session:
            stmt = select(func.count()).select_from(Job).where(Job.organization_id == self.org_id)
            return int(session.scalar(stmt) or 0)


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def tenant(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Tenant]:
    """An organization with a training file, on a fresh SQLite database or on the session's
    PostgreSQL database (a new organization each time)."""
    overrides = {}
    if request.param == "postgres":
        overrides["database_url"] = request.getfixturevalue("postgres_url")
    settings = make_settings(tmp_path / "data", **overrides)
    upgrade(settings.sqlalchemy_url)
    with session_scope(settings.sqlalchemy_url) as session:
        new = keys.create_key(session, f"idem-{uuid.uuid4().hex[:8]}")
        key, org_id = new.key, new.organization.id
    headers = {"Authorization": f"Bearer {key}"}
    with TestClient(create_app(settings)) as client:
        uploaded = client.post(
            "/v1/files",
            headers=headers,
            files={"file": ("t.jsonl", jsonl(sentiment_rows(20, seed=1)))},
            data={"purpose": "fine-tune"},
        )
        assert uploaded.status_code == 200, uploaded.text
        yield Tenant(client, settings, headers, org_id, uploaded.json()["id"])


def assert_key_reused(response: Response, first_job: str) -> None:
    error = assert_error(response, 422, words=first_job)
    assert error["code"] == "idempotency_key_reused"
    assert error["type"] == "invalid_request_error"
    assert response.headers["x-should-retry"] == "false"


def test_same_key_same_request_returns_the_job_another_request_is_refused(tenant: Tenant) -> None:
    first = tenant.create("k-1", suffix="red", hyperparameters={"n_epochs": 2})
    assert first.status_code == 200, first.text
    job_id = first.json()["id"]
    # The same request, written another way (another key order, a default written out).
    again = tenant.create("k-1", hyperparameters={"n_epochs": 2}, suffix="red", seed=None)
    assert again.status_code == 200 and again.json()["id"] == job_id
    two_epochs = {"n_epochs": 2}
    for other in (
        {"suffix": "blue", "hyperparameters": two_epochs},
        {"suffix": "red"},  # the hyperparameters left out
        {"suffix": "red", "hyperparameters": two_epochs, "seed": 7},
    ):
        assert_key_reused(tenant.create("k-1", **other), job_id)
    assert tenant.job_count() == 1


def test_concurrent_creates_with_one_key_and_two_requests(tenant: Tenant) -> None:
    """Clients race with one key, half of them with another request: one job is made, every
    client of its request gets it, every client of the other request gets the 422."""
    per_request = 4
    suffixes = ["red", "blue"] * per_request
    barrier = threading.Barrier(len(suffixes))

    def create(base_url: str, suffix: str) -> Response:
        with httpx.Client(base_url=base_url, headers=tenant.headers, timeout=60) as client:
            barrier.wait(timeout=30)
            return client.post(
                "/v1/fine_tuning/jobs",
                headers={"Idempotency-Key": "race-1"},
                json={"model": BASE_MODEL, "training_file": tenant.file_id, "suffix": suffix},
            )

    with served(create_app(tenant.settings)) as base_url, ThreadPoolExecutor(len(suffixes)) as pool:
        responses = list(pool.map(lambda s: create(base_url, s), suffixes))
    accepted = [r.json() for r in responses if r.status_code == 200]
    assert accepted, [r.text for r in responses]
    assert len({job["id"] for job in accepted}) == 1
    winner = accepted[0]
    assert len(accepted) == per_request and all(j["suffix"] == winner["suffix"] for j in accepted)
    for response, suffix in zip(responses, suffixes, strict=True):
        if suffix != winner["suffix"]:
            assert_key_reused(response, winner["id"])
    assert tenant.job_count() == 1


@pytest.mark.parametrize("same_request", [True, False])
def test_a_create_that_loses_the_race_compares_requests(tenant: Tenant, same_request: bool) -> None:
    """The race itself, made certain: the loser's lookup finds no job with the key, the winner
    commits just before the loser's INSERT, which then hits the unique key."""
    url = tenant.settings.sqlalchemy_url
    idempotency_key = f"race-{same_request}"
    winner_request = JobCreate(model=BASE_MODEL, training_file=tenant.file_id, suffix="first")
    loser_request = winner_request.model_copy(update={} if same_request else {"suffix": "second"})
    winner_ids: list[str] = []

    def winner_commits_first(*_: object) -> None:
        with session_scope(url) as session:
            org = session.get(Organization, tenant.org_id)
            assert org is not None
            job, created = jobs.create_job(
                session, tenant.settings, org, winner_request, idempotency_key
            )
            assert created
            winner_ids.append(job.id)

    loser = new_session(url)
    event.listen(loser, "before_flush", winner_commits_first, once=True)
    try:
        org = loser.get(Organization, tenant.org_id)
        assert org is not None
        if same_request:
            job, created = jobs.create_job(
                loser, tenant.settings, org, loser_request, idempotency_key
            )
            assert (job.id, created) == (winner_ids[0], False)
        else:
            with pytest.raises(TunehouseError) as refused:
                jobs.create_job(loser, tenant.settings, org, loser_request, idempotency_key)
            assert refused.value.status_code == 422
            assert refused.value.code == "idempotency_key_reused"
            assert winner_ids[0] in refused.value.message
    finally:
        loser.rollback()
        loser.close()
    assert winner_ids and tenant.job_count() == 1
