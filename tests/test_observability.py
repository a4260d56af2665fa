"""/metrics as an operator scrapes it: jobs by status and queue depth from the control API, and
who may read it (the API's and a worker's port alike). The worker's training metrics and the
JSON logs of a running stack are checked in tests/test_end_to_end.py, which trains anyway."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from app.core.db import session_scope
from app.core.migrate import upgrade
from app.main import create_app
from app.services import keys
from tests.conftest import Api, make_settings
from tests.metrics_support import sample
from tests.support import Response, free_port, sentiment_rows
from tests.test_jobs_api import cancel, create, queued_messages, retrieve, upload
from worker.metrics_server import start_metrics_server


@pytest.fixture
def api(tmp_path: Path) -> Iterator[Api]:
    """The control routes alone, in-process (no inference warmer to start and stop)."""
    settings = make_settings(tmp_path / "data")
    upgrade(settings.sqlalchemy_url)
    with session_scope(settings.sqlalchemy_url) as session:
        key = keys.create_key(session, "org-a").key
    with TestClient(create_app(settings, role="control")) as client:
        yield Api(client, settings, key, key)


def test_api_metrics_show_jobs_by_status_and_queue_depth(api: Api) -> None:
    before = api.client.get("/metrics").text
    assert sample(before, "tunehouse_jobs", status="queued") == 0
    assert sample(before, "tunehouse_queue_depth", queue="cpu") == 0

    file_id = upload(api, sentiment_rows(20, seed=1))
    jobs = [create(api, file_id).json()["id"] for _ in range(3)]
    assert all(retrieve(api, job)["status"] == "queued" for job in jobs)  # validated, woken
    assert cancel(api, jobs[0]).status_code == 200

    text = api.client.get("/metrics").text
    assert sample(text, "tunehouse_jobs", status="queued") == 2
    assert sample(text, "tunehouse_jobs", status="cancelled") == 1
    assert sample(text, "tunehouse_jobs", status="running") == 0
    # No worker runs: each job's wake-up waits in the filesystem broker's queue.
    assert sample(text, "tunehouse_queue_depth", queue="cpu") == len(queued_messages(api)) == 3
    for source in ("database", "broker"):
        assert sample(text, "tunehouse_metrics_source_up", source=source) == 1


def test_a_database_that_does_not_answer_is_reported_not_counted(tmp_path: Path) -> None:
    missing = f"sqlite:///{tmp_path / 'missing' / 'x.db'}"
    app = create_app(make_settings(tmp_path / "data", database_url=missing), role="control")
    with TestClient(app) as client:
        text = client.get("/metrics").text
    assert sample(text, "tunehouse_metrics_source_up", source="database") == 0
    assert sample(text, "tunehouse_jobs", status="queued") is None


@pytest.fixture(scope="module")
def restricted(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    settings = make_settings(
        tmp_path_factory.mktemp("restricted") / "data",
        metrics_token="s3cret-token",
        metrics_allow="127.0.0.1, 10.0.0.0/8",
        worker_metrics_host="127.0.0.1",
        worker_metrics_port=free_port(),
    )
    upgrade(settings.sqlalchemy_url)
    server = start_metrics_server(settings)
    try:
        yield {"settings": settings, "worker": f"http://127.0.0.1:{server.server_port}/metrics"}
    finally:
        server.shutdown()
        server.server_close()


def refused(response: Response, status: int, code: str) -> None:
    assert response.status_code == status, response.text
    assert response.json()["error"]["code"] == code
    assert "tunehouse_" not in response.text


def test_api_metrics_need_the_token_from_an_allowed_address(restricted: dict) -> None:
    app = create_app(restricted["settings"], role="control")
    token = {"Authorization": "Bearer s3cret-token"}
    with TestClient(app, client=("10.1.2.3", 50000)) as client:
        refused(client.get("/metrics"), 401, "missing_metrics_token")
        refused(
            client.get("/metrics", headers={"Authorization": "Bearer x"}),
            403,
            "invalid_metrics_token",
        )
        allowed = client.get("/metrics", headers=token)
        assert allowed.status_code == 200 and "tunehouse_jobs{" in allowed.text
        # The OpenAPI document says so.
        operation = client.get("/openapi.json").json()["paths"]["/metrics"]["get"]
        assert {"401", "403"} <= set(operation["responses"])
        assert operation["security"] == [{"MetricsToken": []}]
    with TestClient(app, client=("192.168.1.9", 50000)) as outside:
        refused(outside.get("/metrics", headers=token), 403, "metrics_address_not_allowed")
    # Unrestricted (the default), it documents no refusal.
    open_app = create_app(make_settings(restricted["settings"].data_dir), role="control")
    with TestClient(open_app) as client:
        operation = client.get("/openapi.json").json()["paths"]["/metrics"]["get"]
        assert not {"401", "403"} & set(operation["responses"]) and "security" not in operation


def test_worker_metrics_port_needs_the_token(restricted: dict) -> None:
    url = restricted["worker"]
    refused(httpx.get(url), 401, "missing_metrics_token")
    refused(httpx.get(url, headers={"Authorization": "Bearer x"}), 403, "invalid_metrics_token")
    allowed = httpx.get(url, headers={"Authorization": "Bearer s3cret-token"})
    assert allowed.status_code == 200
    assert 'tunehouse_lease_actions_total{action="renewed"}' in allowed.text


def test_worker_metrics_port_refuses_addresses_outside_the_list(tmp_path: Path) -> None:
    settings = make_settings(
        tmp_path, metrics_allow="10.0.0.0/8", worker_metrics_host="127.0.0.1",
        worker_metrics_port=free_port(),
    )  # fmt: skip
    server = start_metrics_server(settings)
    try:
        refused(httpx.get(f"http://127.0.0.1:{server.server_port}/metrics"), 403,
                "metrics_address_not_allowed")  # fmt: skip
    finally:
        server.shutdown()
        server.server_close()
