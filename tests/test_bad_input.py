"""Bad input gets a 4xx with OpenAI's error envelope and changes nothing (design rule 6): no
row in the database, no byte in storage."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from sqlalchemy import func, select

from app.core.db import session_scope
from app.models import File, Job, JobEvent
from tests.support import BASE_MODEL, jsonl, sentiment_rows


def snapshot(api) -> dict[str, object]:
    with session_scope(api.settings.sqlalchemy_url) as session:
        counts: dict[str, object] = {
            table.__tablename__: session.scalar(select(func.count()).select_from(table))
            for table in (File, Job, JobEvent)
        }
    root = api.settings.storage_root
    for folder in ("files", "tmp"):
        path = root / folder
        counts[folder] = sorted(p.name for p in path.iterdir()) if path.exists() else []
    return counts


@contextmanager
def changes_nothing(api) -> Iterator[None]:
    before = snapshot(api)
    yield
    assert snapshot(api) == before


def assert_error(response, status: int, *, param: str | None = None, words: str = "") -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    assert isinstance(error["type"], str) and error["type"]
    if param is not None:
        assert error["param"] is not None and param in error["param"], error
    assert words.lower() in error["message"].lower(), error["message"]
    return error


def upload(api, content: bytes, key: str | None = None, **fields):
    data = {"purpose": "fine-tune", **fields}
    return api.client.post(
        "/v1/files",
        headers=api.headers(key),
        files={"file": ("train.jsonl", content, "application/octet-stream")},
        data=data,
    )


def good_file(api, key: str | None = None) -> str:
    response = upload(api, jsonl(sentiment_rows(30, seed=11)), key=key)
    assert response.status_code == 200, response.text
    return str(response.json()["id"])


# ---- authentication ---------------------------------------------------------------------------


def test_missing_key(api) -> None:
    with changes_nothing(api):
        response = api.client.post(
            "/v1/files",
            files={"file": ("t.jsonl", jsonl(sentiment_rows(10, seed=1)))},
            data={"purpose": "fine-tune"},
        )
        error = assert_error(response, 401)
        assert error["type"] == "authentication_error"
        assert_error(api.client.get("/v1/files"), 401)
        assert_error(api.client.get("/v1/fine_tuning/jobs"), 401)


def test_wrong_key(api) -> None:
    with changes_nothing(api):
        response = upload(api, jsonl(sentiment_rows(10, seed=1)), key="sk-th-not-a-real-key")
        error = assert_error(response, 401)
        assert error["code"] == "invalid_api_key"
        headers = {"Authorization": "Bearer sk-th-wrong"}
        assert_error(api.client.get("/v1/models", headers=headers), 401)


# ---- files ----------------------------------------------------------------------------------


def test_unknown_file(api) -> None:
    with changes_nothing(api):
        for path in ("/v1/files/file-nope", "/v1/files/file-nope/content"):
            assert_error(api.client.get(path, headers=api.headers()), 404, words="file-nope")
        assert_error(api.client.delete("/v1/files/file-nope", headers=api.headers()), 404)
        response = api.client.post(
            "/v1/fine_tuning/jobs",
            headers=api.headers(),
            json={"model": BASE_MODEL, "training_file": "file-nope"},
        )
        assert_error(response, 400, param="training_file", words="file-nope")


def test_another_organizations_file(api, file_id: str) -> None:
    theirs = good_file(api, key=api.key_b)
    content = api.client.get(f"/v1/files/{theirs}/content", headers=api.headers(api.key_b))
    assert content.status_code == 200  # the owner sees it
    with changes_nothing(api):
        for path in (f"/v1/files/{theirs}", f"/v1/files/{theirs}/content"):
            error = assert_error(api.client.get(path, headers=api.headers()), 404)
            assert error["type"] == "not_found_error"
        assert_error(api.client.delete(f"/v1/files/{theirs}", headers=api.headers()), 404)
        listed = api.client.get("/v1/files", headers=api.headers()).json()
        assert [f["id"] for f in listed["data"]] == [file_id]
        response = api.client.post(
            "/v1/fine_tuning/jobs",
            headers=api.headers(),
            json={"model": BASE_MODEL, "training_file": theirs},
        )
        assert_error(response, 400, param="training_file")
        response = api.client.post(
            "/v1/fine_tuning/jobs",
            headers=api.headers(),
            json={"model": BASE_MODEL, "training_file": file_id, "validation_file": theirs},
        )
        assert_error(response, 400, param="validation_file")
    # Still there for its owner.
    assert api.client.get(f"/v1/files/{theirs}", headers=api.headers(api.key_b)).status_code == 200


@pytest.fixture
def file_id(api) -> str:
    """An existing, valid training file of organization A (made before anything is compared)."""
    return good_file(api)


@pytest.mark.parametrize(
    ("content", "words"),
    [
        (jsonl(sentiment_rows(3, seed=1)) + b'{"text": "broken", "label": \n', "line 4"),
        (jsonl(sentiment_rows(3, seed=1)) + b'{"text": "broken", "label": \n', "not valid JSON"),
        (jsonl(sentiment_rows(2, seed=1)) + b'{"text": "no label here"}\n', "line 3"),
        (jsonl(sentiment_rows(2, seed=1)) + b'{"text": "no label here"}\n', "'label'"),
        (b"", "empty"),
        (b"\n\n", "empty"),
        (jsonl([{"text": "a", "label": "x"}, {"text": "b", "label": "x"}]), "2 distinct labels"),
        (b"[1, 2]\n", "line 1"),
        (jsonl(sentiment_rows(2, seed=1)) + b'{"text": "caf\xe9", "label": "a"}\n', "UTF-8"),
    ],
)
def test_invalid_dataset_is_refused_with_line_and_reason(api, content: bytes, words: str) -> None:
    with changes_nothing(api):
        error = assert_error(upload(api, content), 400, param="file", words=words)
        assert error["code"] == "invalid_file"


def test_purpose_other_than_fine_tune(api) -> None:
    with changes_nothing(api):
        response = upload(api, jsonl(sentiment_rows(10, seed=1)), purpose="assistants")
        assert_error(response, 400, param="purpose", words="assistants")


def test_missing_purpose(api) -> None:
    with changes_nothing(api):
        response = api.client.post(
            "/v1/files",
            headers=api.headers(),
            files={"file": ("t.jsonl", jsonl(sentiment_rows(10, seed=1)))},
        )
        assert_error(response, 400, param="purpose")


def test_no_file_part(api) -> None:
    boundary = "tunehouse-boundary"
    body = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="purpose"\r\n\r\n'
        f"fine-tune\r\n--{boundary}--\r\n"
    ).encode()
    headers = {**api.headers(), "Content-Type": f"multipart/form-data; boundary={boundary}"}
    with changes_nothing(api):
        response = api.client.post("/v1/files", headers=headers, content=body)
        assert_error(response, 400, param="file", words="file")
        # Not multipart at all.
        response = api.client.post(
            "/v1/files", headers=api.headers(), data={"purpose": "fine-tune"}
        )
        assert_error(response, 400, words="multipart")


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        (
            {"expires_after[anchor]": "last_active_at", "expires_after[seconds]": "3600"},
            "expires_after",
        ),
        (
            {"expires_after[anchor]": "created_at", "expires_after[seconds]": "soon"},
            "expires_after",
        ),
        ({"expires_after[anchor]": "created_at", "expires_after[seconds]": "10"}, "expires_after"),
    ],
)
def test_bad_expiry(api, fields: dict[str, str], param: str) -> None:
    with changes_nothing(api):
        assert_error(upload(api, jsonl(sentiment_rows(10, seed=1)), **fields), 400, param=param)


def test_upload_over_the_size_limit(tmp_path) -> None:
    from fastapi.testclient import TestClient

    from app.core.migrate import upgrade
    from app.main import create_app
    from app.services import keys
    from tests.conftest import Api, make_settings

    settings = make_settings(tmp_path / "data", max_upload_bytes=10_000)
    upgrade(settings.sqlalchemy_url)
    with session_scope(settings.sqlalchemy_url) as session:
        key = keys.create_key(session, "org-a").key
    with TestClient(create_app(settings)) as client:
        api = Api(client, settings, key, key)
        with changes_nothing(api):
            response = upload(api, jsonl(sentiment_rows(500, seed=1)))
            error = assert_error(response, 413, param="file")
            assert error["code"] == "file_too_large"


# ---- jobs -------------------------------------------------------------------------------------


def create(api, file_id: str, key: str | None = None, **body):
    payload = {"model": BASE_MODEL, "training_file": file_id, **body}
    return api.client.post("/v1/fine_tuning/jobs", headers=api.headers(key), json=payload)


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"model": "gpt-4o-mini"}, "model"),
        ({"model": "sentence-transformers/does-not-exist"}, "model"),
        ({"hyperparameters": {"n_epochs": 0}}, "n_epochs"),
        ({"hyperparameters": {"n_epochs": 51}}, "n_epochs"),
        ({"hyperparameters": {"n_epochs": "many"}}, "n_epochs"),
        ({"hyperparameters": {"batch_size": 1000}}, "batch_size"),
        ({"hyperparameters": {"learning_rate_multiplier": 0}}, "learning_rate_multiplier"),
        ({"hyperparameters": {"learning_rate_multiplier": -1.5}}, "learning_rate_multiplier"),
        ({"hyperparameters": {"warmup_steps": 10}}, "warmup_steps"),
        ({"hyperparameters": {"precision": "fp8"}}, "precision"),
        ({"hyperparameters": {"micro_batch_size": 0}}, "micro_batch_size"),
        ({"hyperparameters": {"micro_batch_size": 257}}, "micro_batch_size"),
        ({"hyperparameters": {"packing": True}}, "hyperparameters.packing"),  # classification
        ({"hyperparameters": {"torch_compile": "yes please"}}, "torch_compile"),
        (
            {"method": {"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 0}}}},
            "n_epochs",
        ),
        ({"method": {"type": "dpo"}}, "training_file"),  # dpo trains on preference rows
        ({"method": {"type": "reinforcement"}}, "method"),
        ({"suffix": "x" * 65}, "suffix"),
        ({"suffix": "../../etc"}, "suffix"),
        ({"metadata": {f"k{i}": "v" for i in range(17)}}, "metadata"),
        ({"seed": -1}, "seed"),
        ({"unknown_field": 1}, "unknown_field"),
        ({"training_file": None}, "training_file"),
    ],
)
def test_invalid_job_create(api, file_id: str, body: dict[str, Any], param: str) -> None:
    with changes_nothing(api):
        error = assert_error(create(api, file_id, **body), 400, param=param)
        assert error["type"] == "invalid_request_error"


def test_sixteen_metadata_keys_and_64_char_suffix_are_fine(api, file_id: str) -> None:
    response = create(api, file_id, suffix="x" * 64, metadata={f"k{i}": "v" for i in range(16)})
    assert response.status_code == 200, response.text


def test_malformed_json_body(api, file_id: str) -> None:
    headers = {**api.headers(), "Content-Type": "application/json"}
    with changes_nothing(api):
        response = api.client.post(
            "/v1/fine_tuning/jobs", headers=headers, content=b'{"model": "x", "training_file": '
        )
        assert_error(response, 400, words="JSON")
        response = api.client.post(
            "/v1/fine_tuning/jobs", headers=headers, content=json.dumps([1, 2]).encode()
        )
        assert_error(response, 400)


def test_cancel_unknown_job(api) -> None:
    with changes_nothing(api):
        headers = {**api.headers(), "Content-Type": "application/json"}
        response = api.client.post("/v1/fine_tuning/jobs/ftjob-nope/cancel", headers=headers)
        assert_error(response, 404, words="ftjob-nope")
        assert_error(api.client.get("/v1/fine_tuning/jobs/ftjob-nope", headers=api.headers()), 404)
        response = api.client.get("/v1/fine_tuning/jobs/ftjob-nope/events", headers=api.headers())
        assert_error(response, 404)


def test_another_organizations_job(api, file_id: str) -> None:
    response = create(api, file_id)
    assert response.status_code == 200, response.text
    job_id = response.json()["id"]
    b = api.headers(api.key_b)
    with changes_nothing(api):
        for path in ("", "/events", "/checkpoints"):
            url = f"/v1/fine_tuning/jobs/{job_id}{path}"
            assert_error(api.client.get(url, headers=b), 404)
        response = api.client.post(f"/v1/fine_tuning/jobs/{job_id}/cancel", headers=b)
        assert_error(response, 404)
        assert api.client.get("/v1/fine_tuning/jobs", headers=b).json()["data"] == []
    # The owner's job was not cancelled by the other organization.
    mine = api.client.get(f"/v1/fine_tuning/jobs/{job_id}", headers=api.headers()).json()
    assert mine["status"] != "cancelled"
