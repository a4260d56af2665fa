"""Files past their ``expires_after`` (issue 9, A13), as OpenAI treats them: gone for their
owner at once (404 to retrieve, read or delete, not listed, not trainable), and their row and
bytes deleted by the reconciler's sweep, but not while a job still to run reads them."""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import select, update

from app.core.db import session_scope
from app.models import File, utcnow
from tests.support import BASE_MODEL, jsonl, sentiment_rows
from tests.test_bad_input import assert_error
from tests.test_files_api import stored_files, upload
from worker import reconciler

EXPIRES = {"expires_after[anchor]": "created_at", "expires_after[seconds]": "3600"}


def expire(api, file_id: str) -> None:
    """As if the file's hour were over (expires_after cannot be shorter than an hour)."""
    with session_scope(api.settings.sqlalchemy_url) as session:
        session.execute(
            update(File)
            .where(File.id == file_id)
            .values(expires_at=utcnow() - timedelta(seconds=1))
        )


def rows(api) -> list[str]:
    with session_scope(api.settings.sqlalchemy_url) as session:
        return sorted(session.scalars(select(File.id)))


def test_an_expired_file_is_gone_for_its_owner_at_once(api) -> None:
    kept = upload(api, jsonl(sentiment_rows(10, seed=1))).json()["id"]
    gone = upload(api, jsonl(sentiment_rows(10, seed=2)), **EXPIRES).json()["id"]
    expire(api, gone)

    headers = api.headers()
    for method, path in (
        ("GET", f"/v1/files/{gone}"),
        ("GET", f"/v1/files/{gone}/content"),
        ("DELETE", f"/v1/files/{gone}"),
    ):
        response = api.client.request(method, path, headers=headers)
        assert_error(response, 404, param="file_id")
    listed = api.client.get("/v1/files", headers=headers).json()
    assert [f["id"] for f in listed["data"]] == [kept]
    job = api.client.post(
        "/v1/fine_tuning/jobs", headers=headers, json={"model": BASE_MODEL, "training_file": gone}
    )
    assert_error(job, 400, param="training_file")


def test_the_sweep_deletes_expired_files_once_no_job_needs_them(api) -> None:
    headers = api.headers()
    used = upload(api, jsonl(sentiment_rows(20, seed=3)), **EXPIRES).json()["id"]
    unused = upload(api, jsonl(sentiment_rows(20, seed=4)), **EXPIRES).json()["id"]
    kept = upload(api, jsonl(sentiment_rows(20, seed=5))).json()["id"]
    job = api.client.post(
        "/v1/fine_tuning/jobs", headers=headers, json={"model": BASE_MODEL, "training_file": used}
    ).json()
    assert (
        api.client.get(f"/v1/fine_tuning/jobs/{job['id']}", headers=headers).json()["status"]
        == "queued"
    )
    expire(api, used)
    expire(api, unused)

    reconciler.reconcile_once(api.settings)
    # The queued job reads its file again when it starts: that file stays until it has ended.
    assert rows(api) == sorted([used, kept]) and stored_files(api) == sorted([used, kept])
    cancelled = api.client.post(f"/v1/fine_tuning/jobs/{job['id']}/cancel", headers=headers)
    assert cancelled.json()["status"] == "cancelled"
    reconciler.reconcile_once(api.settings)
    assert rows(api) == [kept] and stored_files(api) == [kept]
