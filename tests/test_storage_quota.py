"""The per-organization storage quota (issue 9, A13): usage counts files, models and
checkpoints; an upload that would pass it is refused with 413 ``quota_exceeded`` and the usage
in the message, by its declared size before its body is read and by its real size after, and
nothing is stored; concurrent uploads of one organization near its limit cannot all pass; a new
job is refused once the organization is at its quota."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from app.core.db import session_scope
from app.core.ids import new_id
from app.core.migrate import upgrade
from app.core.settings import Settings
from app.main import create_app
from app.models import Checkpoint, File, FineTunedModel, Job
from app.services import keys, quota
from tests.conftest import Api, make_settings
from tests.served import served
from tests.support import BASE_MODEL, jsonl, sentiment_rows
from tests.test_bad_input import assert_error
from tests.test_files_api import stored_files, upload
from tests.test_uploads import BOUNDARY, Server, form_head, form_tail, serving, storage_tree

CONTENT = jsonl(sentiment_rows(20, seed=1))  # every upload here: the same size
SIZE = len(CONTENT)


def quota_api(tmp_path: Path, limit: int) -> Iterator[Api]:
    settings = make_settings(tmp_path / "data", storage_quota_bytes=limit)
    upgrade(settings.sqlalchemy_url)
    with session_scope(settings.sqlalchemy_url) as session:
        key_a = keys.create_key(session, "org-a").key
        key_b = keys.create_key(session, "org-b").key
    with TestClient(create_app(settings)) as client:
        yield Api(client, settings, key_a, key_b)


@pytest.fixture
def two_and_a_half(tmp_path: Path) -> Iterator[Api]:
    """Room for two uploads and a half."""
    yield from quota_api(tmp_path, 2 * SIZE + SIZE // 2)


def assert_quota_exceeded(response: Any, used: int, limit: int) -> None:  # httpx or TestClient's
    error = assert_error(response, 413, words=f"uses {used} of {limit} bytes")
    assert (error["type"], error["code"]) == ("request_too_large", "quota_exceeded")
    assert response.headers["x-should-retry"] == "false"


def test_usage_counts_files_models_and_checkpoints(api: Api) -> None:
    url = api.settings.sqlalchemy_url
    with session_scope(url) as session:
        org = keys.get_or_create_organization(session, "org-a")
        other = keys.get_or_create_organization(session, "org-b")
        for owner, size in ((org, 100), (other, 7)):
            job_id = new_id("ftjob")
            session.add_all(
                [
                    File(
                        id=new_id("file"),
                        organization_id=owner.id,
                        filename="f",
                        purpose="fine-tune",
                        bytes=size,
                        sha256="0" * 64,
                        storage_path="files/x",
                    ),
                    Job(
                        id=job_id,
                        organization_id=owner.id,
                        model=BASE_MODEL,
                        task="classification",
                        training_file="file-x",
                        status="succeeded",
                        hyperparameters={},
                        method={},
                        seed=0,
                    ),
                    FineTunedModel(
                        id=f"ft:{job_id}",
                        organization_id=owner.id,
                        task="classification",
                        base_model=BASE_MODEL,
                        job_id=job_id,
                        storage_path="models/x",
                        bytes=size * 10,
                    ),
                ]
            )
            session.flush()
            session.add(
                Checkpoint(
                    id=new_id("ftckpt"),
                    job_id=job_id,
                    step_number=1,
                    metrics={},
                    storage_path="jobs/x",
                    bytes=size * 100,
                )
            )
        session.flush()
        assert quota.usage_bytes(session, org.id) == 100 + 1000 + 10000
        assert quota.usage_bytes(session, other.id) == 7 + 70 + 700


def test_an_upload_past_the_quota_is_refused_and_nothing_is_stored(two_and_a_half: Api) -> None:
    api = two_and_a_half
    first = upload(api, CONTENT).json()["id"]
    second = upload(api, CONTENT).json()["id"]
    before = storage_tree(api.settings)

    assert_quota_exceeded(upload(api, CONTENT), 2 * SIZE, 2 * SIZE + SIZE // 2)
    assert storage_tree(api.settings) == before  # no file, nothing left in tmp
    listed = api.client.get("/v1/files", headers=api.headers()).json()["data"]
    assert sorted(f["id"] for f in listed) == sorted([first, second])
    # Another organization has a quota of its own.
    assert upload(api, CONTENT, key=api.key_b).status_code == 200
    # Deleting a file makes room again.
    assert api.client.delete(f"/v1/files/{first}", headers=api.headers()).status_code == 200
    assert upload(api, CONTENT).status_code == 200


def test_a_new_job_is_refused_at_the_quota(tmp_path: Path) -> None:
    for api in quota_api(tmp_path, SIZE):  # room for exactly one file
        file_id = upload(api, CONTENT).json()["id"]
        body = {"model": BASE_MODEL, "training_file": file_id}
        response = api.client.post("/v1/fine_tuning/jobs", headers=api.headers(), json=body)
        assert_quota_exceeded(response, SIZE, SIZE)
        assert api.client.get("/v1/fine_tuning/jobs", headers=api.headers()).json()["data"] == []
        assert stored_files(api) == [file_id]


def test_an_upload_declared_past_the_quota_is_refused_unread(tmp_path: Path) -> None:
    settings = make_settings(tmp_path / "data", storage_quota_bytes=1024 * 1024)
    with serving(settings) as server:
        head = server.request_head(f"Content-Length: {8 * 1024 * 1024}\r\n")
        status, body, sent = server.send(head, iter(()))  # the body is never sent at all
        assert sent == 0
        assert status == 413, body
        error = body["error"]
        assert isinstance(error, dict) and error["code"] == "quota_exceeded"
        assert "uses 0 of 1048576 bytes" in str(error["message"])
        assert not list((settings.storage_root / "files").glob("*"))


def test_concurrent_uploads_of_one_org_cannot_pass_the_quota_together(
    database_url: str, tmp_path: Path
) -> None:
    room, clients = 3, 8  # the quota holds 3 files and a half; 8 clients upload at once
    limit = room * SIZE + SIZE // 2
    settings: Settings = make_settings(
        tmp_path / "data", database_url=database_url, storage_quota_bytes=limit
    )
    with session_scope(database_url) as session:
        org_keys = [keys.create_key(session, "org-q").key for _ in range(4)]
    start = threading.Barrier(clients)

    def upload_once(i: int) -> httpx.Response:
        headers = {"Authorization": f"Bearer {org_keys[i % len(org_keys)]}"}
        with httpx.Client(base_url=f"http://127.0.0.1:{server.port}", timeout=60) as client:
            start.wait(timeout=30)
            return client.post(
                "/v1/files",
                headers=headers,
                files={"file": (f"part-{i}.jsonl", CONTENT)},
                data={"purpose": "fine-tune"},
            )

    with Server(settings, org_keys[0]) as server, ThreadPoolExecutor(clients) as pool:
        responses = list(pool.map(upload_once, range(clients)))

    statuses = sorted(r.status_code for r in responses)
    assert statuses == [200] * room + [413] * (clients - room), [r.text for r in responses]
    for response in responses:
        if response.status_code == 413:
            assert response.json()["error"]["code"] == "quota_exceeded"
    with session_scope(database_url) as session:
        org = keys.get_or_create_organization(session, "org-q")
        assert quota.usage_bytes(session, org.id) == room * SIZE <= limit
    stored = storage_tree(settings)
    assert len(stored) == room and all(name.startswith("files/") for name in stored)


def test_the_quota_check_holds_no_connection_while_the_body_arrives(tmp_path: Path) -> None:
    # One pooled connection in all: if the check before the body kept it, nothing else could
    # be answered until the upload's body had arrived.
    settings = make_settings(
        tmp_path / "data",
        storage_quota_bytes=1024 * 1024,
        db_pool_size=1,
        db_max_overflow=0,
        db_pool_timeout_seconds=5,
    )
    upgrade(settings.sqlalchemy_url)
    with session_scope(settings.sqlalchemy_url) as session:
        key = keys.create_key(session, "org-a").key
    # Larger than the form's overhead, so that its declared size alone says something.
    content = jsonl(sentiment_rows(3000, seed=2))
    head, tail = form_head(), form_tail()
    started, release = threading.Event(), threading.Event()

    def body() -> Iterator[bytes]:
        yield head
        started.set()
        release.wait(30)
        yield content + tail

    auth = {"Authorization": f"Bearer {key}"}
    headers = {
        **auth,
        "Content-Type": f"multipart/form-data; boundary={BOUNDARY}",
        "Content-Length": str(len(head) + len(content) + len(tail)),  # checked first
    }
    with served(create_app(settings)) as base_url, ThreadPoolExecutor(1) as pool:
        uploading = pool.submit(
            httpx.post, f"{base_url}/v1/files", content=body(), headers=headers, timeout=60
        )
        try:
            assert started.wait(30)
            time.sleep(2)  # the server has read the headers and checked the declared size
            listed = httpx.get(f"{base_url}/v1/files", headers=auth, timeout=4)
            assert listed.status_code == 200, listed.text
        finally:
            release.set()
        assert uploading.result(timeout=60).status_code == 200
