"""/v1/fine_tuning/jobs and /v1/models through the HTTP API, with no worker running: the
filesystem broker only stores the wake-up messages."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import func, select, update

from app.core.db import session_scope
from app.models import Job
from tests.support import BASE_MODEL, jsonl, sentiment_rows

JOB_FIELDS = {
    "id",
    "object",
    "created_at",
    "error",
    "fine_tuned_model",
    "finished_at",
    "hyperparameters",
    "model",
    "organization_id",
    "result_files",
    "seed",
    "status",
    "trained_tokens",
    "training_file",
    "validation_file",
    "estimated_finish",
    "integrations",
    "metadata",
    "method",
    "suffix",
    "steps_completed",
    "total_steps",
    "started_at",
    "attempt",
}
JSON_EMPTY = {"Content-Type": "application/json"}


def upload(api, rows: list[dict[str, str]], key: str | None = None) -> str:
    response = api.client.post(
        "/v1/files",
        headers=api.headers(key),
        files={"file": ("train.jsonl", jsonl(rows), "application/octet-stream")},
        data={"purpose": "fine-tune"},
    )
    assert response.status_code == 200, response.text
    return str(response.json()["id"])


def create(api, file_id: str, headers: dict[str, str] | None = None, **body):
    return api.client.post(
        "/v1/fine_tuning/jobs",
        headers={**api.headers(), **(headers or {})},
        json={"model": BASE_MODEL, "training_file": file_id, **body},
    )


def retrieve(api, job_id: str) -> dict:
    response = api.client.get(f"/v1/fine_tuning/jobs/{job_id}", headers=api.headers())
    assert response.status_code == 200, response.text
    return response.json()


def cancel(api, job_id: str):
    return api.client.post(
        f"/v1/fine_tuning/jobs/{job_id}/cancel", headers={**api.headers(), **JSON_EMPTY}
    )


def queued_messages(api) -> list[Path]:
    queue = api.settings.broker_dir / "queue"
    return [p for p in queue.iterdir() if p.is_file()] if queue.exists() else []


def job_rows(api) -> int:
    with session_scope(api.settings.sqlalchemy_url) as session:
        return int(session.scalar(select(func.count()).select_from(Job)) or 0)


def test_create_then_validated_and_queued(api) -> None:
    file_id = upload(api, sentiment_rows(40, seed=1))
    assert queued_messages(api) == []
    response = create(api, file_id, seed=1234, suffix="demo", metadata={"team": "a"})
    assert response.status_code == 200, response.text
    job = response.json()
    assert set(job) >= JOB_FIELDS
    assert job["id"].startswith("ftjob-")
    assert job["object"] == "fine_tuning.job"
    assert job["status"] == "validating_files"
    assert job["model"] == BASE_MODEL
    assert job["training_file"] == file_id
    assert job["validation_file"] is None
    assert job["seed"] == 1234
    assert job["suffix"] == "demo"
    assert job["metadata"] == {"team": "a"}
    assert job["result_files"] == []
    assert job["error"] is None
    assert job["fine_tuned_model"] is None
    assert job["finished_at"] is None
    assert job["trained_tokens"] is None
    assert job["estimated_finish"] is None
    assert job["integrations"] == []
    assert job["steps_completed"] == 0
    assert job["attempt"] == 0
    assert job["started_at"] is None
    assert isinstance(job["created_at"], int)
    assert job["organization_id"].startswith("org-")
    hp = job["hyperparameters"]
    for name in ("n_epochs", "batch_size", "learning_rate_multiplier"):
        assert isinstance(hp[name], int | float) and not isinstance(hp[name], bool), (name, hp)
        assert hp[name] > 0
    # 40 rows: "auto" epochs stretch so the job sees about 100 examples.
    assert hp["n_epochs"] == 3
    assert hp["batch_size"] == 8
    assert hp["learning_rate_multiplier"] == 1.0
    assert job["method"]["type"] == "supervised"
    assert job["method"]["supervised"]["hyperparameters"]["n_epochs"] == hp["n_epochs"]

    # The background validation ran after the response: the job is queued and woken.
    later = retrieve(api, job["id"])
    assert later["status"] == "queued"
    assert later["error"] is None
    messages = queued_messages(api)
    assert len(messages) == 1
    assert job["id"] in messages[0].read_text()


def test_events_newest_first_with_paging(api) -> None:
    file_id = upload(api, sentiment_rows(20, seed=2))
    job_id = create(api, file_id).json()["id"]
    url = f"/v1/fine_tuning/jobs/{job_id}/events"
    events = api.client.get(url, headers=api.headers()).json()
    assert events["object"] == "list"
    assert events["has_more"] is False
    messages = [e["message"] for e in events["data"]]
    assert len(messages) == 3, messages
    assert messages[0].startswith("Files validated")
    assert messages[1].startswith("Validating training file")
    assert file_id in messages[1]
    assert messages[2].startswith("Created fine-tuning job")
    assert job_id in messages[2]
    for event in events["data"]:
        assert event["object"] == "fine_tuning.job.event"
        assert event["level"] == "info"
        assert event["type"] == "message"
        assert isinstance(event["created_at"], int)
        assert set(event) >= {"id", "object", "created_at", "level", "message", "type", "data"}
    assert events["first_id"] == events["data"][0]["id"]
    assert events["last_id"] == events["data"][-1]["id"]

    first = api.client.get(url, params={"limit": 2}, headers=api.headers()).json()
    assert [e["id"] for e in first["data"]] == [e["id"] for e in events["data"][:2]]
    assert first["has_more"] is True
    rest = api.client.get(
        url, params={"limit": 2, "after": first["last_id"]}, headers=api.headers()
    ).json()
    assert [e["id"] for e in rest["data"]] == [events["data"][2]["id"]]
    assert rest["has_more"] is False


def test_idempotency_key_returns_the_first_job(api) -> None:
    file_id = upload(api, sentiment_rows(20, seed=3))
    headers = {"Idempotency-Key": "retry-me-1"}
    first = create(api, file_id, headers=headers)
    second = create(api, file_id, headers=headers)
    assert first.status_code == second.status_code == 200
    assert first.json()["id"] == second.json()["id"]
    assert job_rows(api) == 1
    # The same key from another organization is another job.
    other_file = upload(api, sentiment_rows(20, seed=3), key=api.key_b)
    other = api.client.post(
        "/v1/fine_tuning/jobs",
        headers={**api.headers(api.key_b), **headers},
        json={"model": BASE_MODEL, "training_file": other_file},
    )
    assert other.status_code == 200
    assert other.json()["id"] != first.json()["id"]
    # A different key is a new job.
    fresh = create(api, file_id, headers={"Idempotency-Key": "retry-me-2"})
    assert fresh.json()["id"] != first.json()["id"]
    assert job_rows(api) == 3


def test_list_with_metadata_filter_and_paging(api) -> None:
    file_id = upload(api, sentiment_rows(20, seed=4))
    teams = ["red", "blue", "red", "green", "red"]
    ids = [create(api, file_id, metadata={"team": t}).json()["id"] for t in teams]
    listed = api.client.get("/v1/fine_tuning/jobs", headers=api.headers()).json()
    assert listed["object"] == "list"
    assert [j["id"] for j in listed["data"]] == ids[::-1]
    red = api.client.get(
        "/v1/fine_tuning/jobs", params={"metadata[team]": "red"}, headers=api.headers()
    ).json()
    assert [j["id"] for j in red["data"]] == [ids[4], ids[2], ids[0]]
    none = api.client.get(
        "/v1/fine_tuning/jobs", params={"metadata[team]": "purple"}, headers=api.headers()
    ).json()
    assert none["data"] == [] and none["has_more"] is False

    seen, after = [], None
    while True:
        params = {"limit": 2, **({"after": after} if after else {})}
        page = api.client.get("/v1/fine_tuning/jobs", params=params, headers=api.headers()).json()
        seen += [j["id"] for j in page["data"]]
        if not page["has_more"]:
            break
        after = page["last_id"]
    assert seen == ids[::-1]
    # Another organization sees none of them.
    theirs = api.client.get("/v1/fine_tuning/jobs", headers=api.headers(api.key_b)).json()
    assert theirs["data"] == []


def test_cancel_queued_then_again_then_finished(api) -> None:
    file_id = upload(api, sentiment_rows(20, seed=5))
    job_id = create(api, file_id).json()["id"]
    assert retrieve(api, job_id)["status"] == "queued"
    response = cancel(api, job_id)
    assert response.status_code == 200, response.text
    cancelled = response.json()
    assert cancelled["status"] == "cancelled"
    assert isinstance(cancelled["finished_at"], int)
    assert retrieve(api, job_id)["status"] == "cancelled"
    again = cancel(api, job_id)
    assert again.status_code == 200
    assert again.json()["status"] == "cancelled"
    assert again.json()["finished_at"] == cancelled["finished_at"]
    events = api.client.get(f"/v1/fine_tuning/jobs/{job_id}/events", headers=api.headers())
    messages = [e["message"] for e in events.json()["data"]]
    assert messages.count("Fine-tuning job cancelled") == 1
    assert messages[0] == "Fine-tuning job cancelled"

    done_id = create(api, file_id).json()["id"]
    with session_scope(api.settings.sqlalchemy_url) as session:
        session.execute(update(Job).where(Job.id == done_id).values(status="succeeded"))
    conflict = cancel(api, done_id)
    assert conflict.status_code == 409
    assert conflict.headers.get("x-should-retry") == "false"
    error = conflict.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert "succeeded" in error["message"]
    assert retrieve(api, done_id)["status"] == "succeeded"


def test_method_and_deprecated_hyperparameters_forms(api) -> None:
    file_id = upload(api, sentiment_rows(20, seed=6))
    method = {
        "type": "supervised",
        "supervised": {
            "hyperparameters": {"n_epochs": 2, "batch_size": 4, "learning_rate_multiplier": 0.5}
        },
    }
    via_method = create(api, file_id, method=method)
    assert via_method.status_code == 200, via_method.text
    hp = via_method.json()["hyperparameters"]
    assert (hp["n_epochs"], hp["batch_size"], hp["learning_rate_multiplier"]) == (2, 4, 0.5)
    assert via_method.json()["method"]["supervised"]["hyperparameters"]["batch_size"] == 4

    legacy = create(api, file_id, hyperparameters={"n_epochs": 5, "batch_size": "auto"})
    assert legacy.status_code == 200, legacy.text
    hp = legacy.json()["hyperparameters"]
    assert hp["n_epochs"] == 5
    assert hp["batch_size"] == 8  # "auto" resolved to a number
    assert hp["learning_rate_multiplier"] == 1.0
    assert legacy.json()["method"]["type"] == "supervised"
    assert retrieve(api, legacy.json()["id"])["hyperparameters"]["n_epochs"] == 5


def test_validation_file_with_an_unseen_label_fails_the_job(api) -> None:
    training = upload(api, sentiment_rows(20, seed=7))
    rows = sentiment_rows(6, seed=8) + [{"text": "meh, it was fine", "label": "neutral"}]
    validation = upload(api, rows)
    response = create(api, training, validation_file=validation)
    assert response.status_code == 200, response.text
    assert response.json()["validation_file"] == validation
    job = retrieve(api, response.json()["id"])
    assert job["status"] == "failed"
    assert job["error"]["code"] == "invalid_validation_file"
    assert job["error"]["param"] == "validation_file"
    assert "neutral" in job["error"]["message"]
    assert isinstance(job["finished_at"], int)
    assert queued_messages(api) == []  # a failed job is never woken


def test_checkpoints_of_a_new_job(api) -> None:
    file_id = upload(api, sentiment_rows(20, seed=9))
    job_id = create(api, file_id).json()["id"]
    response = api.client.get(f"/v1/fine_tuning/jobs/{job_id}/checkpoints", headers=api.headers())
    assert response.status_code == 200
    assert response.json() == {
        "object": "list",
        "data": [],
        "has_more": False,
        "first_id": None,
        "last_id": None,
    }


def test_models(api) -> None:
    listed = api.client.get("/v1/models", headers=api.headers())
    assert listed.status_code == 200
    body = listed.json()
    assert body["object"] == "list"
    base = [m for m in body["data"] if m["id"] == BASE_MODEL]
    assert len(base) == 1
    assert base[0]["object"] == "model"
    assert base[0]["owned_by"] == "system"
    assert isinstance(base[0]["created"], int)

    for path in (BASE_MODEL, BASE_MODEL.replace("/", "%2F")):
        response = api.client.get(f"/v1/models/{path}", headers=api.headers())
        assert response.status_code == 200, (path, response.text)
        assert response.json()["id"] == BASE_MODEL
        assert response.json()["owned_by"] == "system"

    unknown = api.client.get("/v1/models/ft:nothing:here:x:y", headers=api.headers())
    assert unknown.status_code == 404
    error = unknown.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == "model_not_found"

    deleted = api.client.delete(f"/v1/models/{BASE_MODEL}", headers=api.headers())
    assert deleted.status_code == 400
    assert deleted.json()["error"]["param"] == "model"
    assert api.client.get(f"/v1/models/{BASE_MODEL}", headers=api.headers()).status_code == 200


def test_checkpoint_every_steps_is_accepted_and_reported(api) -> None:
    from tests.support import BASE_MODEL, jsonl, sentiment_rows

    file = api.client.post(
        "/v1/files",
        headers=api.headers(),
        files={"file": ("t.jsonl", jsonl(sentiment_rows(30, seed=0)))},
        data={"purpose": "fine-tune"},
    ).json()
    response = api.client.post(
        "/v1/fine_tuning/jobs",
        headers=api.headers(),
        json={
            "model": BASE_MODEL,
            "training_file": file["id"],
            "hyperparameters": {"n_epochs": 1, "checkpoint_every_steps": 5},
        },
    )
    assert response.status_code == 200, response.text
    assert response.json()["hyperparameters"]["checkpoint_every_steps"] == 5
