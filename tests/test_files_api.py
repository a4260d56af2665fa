"""/v1/files through the HTTP API, the way the openai SDK sends and reads it."""

from __future__ import annotations

import hashlib
import json

from sqlalchemy import select

from app.core.db import session_scope
from app.models import File
from tests.support import BASE_MODEL, jsonl, sentiment_rows
from tests.test_bad_input import assert_error

FILE_FIELDS = {
    "id",
    "object",
    "bytes",
    "created_at",
    "filename",
    "purpose",
    "status",
    "status_details",
    "expires_at",
    "sha256",
    "format",
    "stats",
}


def upload(
    api,
    content: bytes,
    name: str = "train.jsonl",
    key: str | None = None,
    content_type: str = "application/octet-stream",
    **fields,
):
    data = {"purpose": "fine-tune", **fields}
    return api.client.post(
        "/v1/files",
        headers=api.headers(key),
        files={"file": (name, content, content_type)},
        data=data,
    )


def stored_files(api) -> list[str]:
    folder = api.settings.storage_root / "files"
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def test_upload_returns_a_complete_file_object(api) -> None:
    rows = sentiment_rows(40, seed=1)
    content = jsonl(rows)
    response = upload(api, content)
    assert response.status_code == 200, response.text
    body = response.json()
    assert set(body) >= FILE_FIELDS
    assert body["id"].startswith("file-")
    assert body["object"] == "file"
    assert body["bytes"] == len(content)
    assert isinstance(body["created_at"], int) and body["created_at"] > 1_600_000_000
    assert body["filename"] == "train.jsonl"
    assert body["purpose"] == "fine-tune"
    assert body["status"] == "processed"
    assert body["status_details"] is None
    assert body["expires_at"] is None
    assert body["sha256"] == hashlib.sha256(content).hexdigest()
    assert body["format"] == "classification"
    positives = sum(r["label"] == "positive" for r in rows)
    assert body["stats"]["rows"] == 40
    assert body["stats"]["label_counts"] == {"negative": 40 - positives, "positive": positives}
    # Retrieve gives the same object.
    again = api.client.get(f"/v1/files/{body['id']}", headers=api.headers())
    assert again.status_code == 200
    assert again.json() == body


def test_content_returns_the_exact_bytes(api) -> None:
    # CRLF, a BOM-free unicode text and a trailing blank line: nothing may be normalised.
    content = jsonl(sentiment_rows(5, seed=2)).replace(b"\n", b"\r\n") + b"\r\n"
    content += json.dumps({"text": "très bien ✓", "label": "positive"}).encode() + b"\r\n"
    file_id = upload(api, content).json()["id"]
    response = api.client.get(f"/v1/files/{file_id}/content", headers=api.headers())
    assert response.status_code == 200
    assert response.content == content


def test_list_order_and_paging(api) -> None:
    ids = [upload(api, jsonl(sentiment_rows(10, seed=i))).json()["id"] for i in range(5)]
    listed = api.client.get("/v1/files", headers=api.headers()).json()
    assert listed["object"] == "list"
    assert [f["id"] for f in listed["data"]] == ids[::-1]  # newest first by default
    assert listed["has_more"] is False
    assert listed["first_id"] == ids[-1] and listed["last_id"] == ids[0]

    asc = api.client.get("/v1/files", params={"order": "asc"}, headers=api.headers()).json()
    assert [f["id"] for f in asc["data"]] == ids

    # Page the way the SDK does: after=<last id> until has_more is false.
    seen, after, pages = [], None, 0
    while True:
        params = {"limit": 2, **({"after": after} if after else {})}
        page = api.client.get("/v1/files", params=params, headers=api.headers()).json()
        pages += 1
        seen += [f["id"] for f in page["data"]]
        assert page["first_id"] == page["data"][0]["id"]
        assert page["last_id"] == page["data"][-1]["id"]
        if not page["has_more"]:
            break
        after = page["last_id"]
    assert seen == ids[::-1]
    assert pages == 3

    asc_page = api.client.get(
        "/v1/files", params={"order": "asc", "limit": 2, "after": ids[1]}, headers=api.headers()
    ).json()
    assert [f["id"] for f in asc_page["data"]] == ids[2:4]
    assert asc_page["has_more"] is True


def test_list_purpose_filter(api) -> None:
    file_id = upload(api, jsonl(sentiment_rows(10, seed=3))).json()["id"]
    tuned = api.client.get("/v1/files", params={"purpose": "fine-tune"}, headers=api.headers())
    assert [f["id"] for f in tuned.json()["data"]] == [file_id]
    results = api.client.get(
        "/v1/files", params={"purpose": "fine-tune-results"}, headers=api.headers()
    ).json()
    assert results["data"] == []
    assert results["has_more"] is False
    assert results["first_id"] is None and results["last_id"] is None


def test_delete_removes_row_and_bytes(api) -> None:
    keep = upload(api, jsonl(sentiment_rows(10, seed=4))).json()["id"]
    file_id = upload(api, jsonl(sentiment_rows(10, seed=5))).json()["id"]
    assert stored_files(api) == sorted([keep, file_id])
    response = api.client.delete(f"/v1/files/{file_id}", headers=api.headers())
    assert response.status_code == 200
    assert response.json() == {"id": file_id, "object": "file", "deleted": True}
    assert stored_files(api) == [keep]
    assert api.client.get(f"/v1/files/{file_id}", headers=api.headers()).status_code == 404
    assert api.client.get(f"/v1/files/{file_id}/content", headers=api.headers()).status_code == 404
    assert api.client.delete(f"/v1/files/{file_id}", headers=api.headers()).status_code == 404
    listed = api.client.get("/v1/files", headers=api.headers()).json()
    assert [f["id"] for f in listed["data"]] == [keep]


def test_delete_with_json_content_type_and_empty_body(api) -> None:
    file_id = upload(api, jsonl(sentiment_rows(10, seed=6))).json()["id"]
    headers = {**api.headers(), "Content-Type": "application/json"}
    response = api.client.request("DELETE", f"/v1/files/{file_id}", headers=headers, content=b"")
    assert response.status_code == 200
    assert response.json()["deleted"] is True


def test_expires_after_sets_expires_at(api) -> None:
    body = upload(
        api,
        jsonl(sentiment_rows(10, seed=7)),
        **{"expires_after[anchor]": "created_at", "expires_after[seconds]": "3600"},
    ).json()
    assert body["expires_at"] == body["created_at"] + 3600


def test_client_filename_is_only_metadata(api) -> None:
    content = jsonl(sentiment_rows(10, seed=8))
    body = upload(api, content, name="../../etc/passwd").json()
    assert body["filename"] == "../../etc/passwd"
    with session_scope(api.settings.sqlalchemy_url) as session:
        row = session.scalar(select(File).where(File.id == body["id"]))
        assert row is not None
        storage_path = row.storage_path
    assert storage_path == f"files/{body['id']}"
    stored = api.settings.storage_root / "files" / body["id"]
    assert stored.read_bytes() == content
    assert stored_files(api) == [body["id"]]
    # Nothing was written outside storage/files under the client's name.
    data_dir = api.settings.resolved_data_dir
    assert not any(p.name == "passwd" for p in data_dir.parent.rglob("*"))


def test_three_megabyte_upload(api) -> None:
    rows = sentiment_rows(3000, seed=9)
    for row in rows:
        row["text"] = row["text"] + " " + "x" * 1000
    content = jsonl(rows)
    assert len(content) > 3_000_000
    response = upload(api, content, name="big.jsonl")
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["bytes"] == len(content)
    assert body["sha256"] == hashlib.sha256(content).hexdigest()
    assert body["stats"]["rows"] == 3000
    back = api.client.get(f"/v1/files/{body['id']}/content", headers=api.headers())
    assert back.content == content
    # The temporary upload was moved, not left behind.
    tmp = api.settings.storage_root / "tmp"
    assert not tmp.exists() or list(tmp.iterdir()) == []


def test_a_file_an_unfinished_job_uses_cannot_be_deleted(api) -> None:
    train = upload(api, jsonl(sentiment_rows(20, seed=10))).json()["id"]
    valid = upload(api, jsonl(sentiment_rows(10, seed=11))).json()["id"]
    created = api.client.post(
        "/v1/fine_tuning/jobs",
        headers=api.headers(),
        json={"model": BASE_MODEL, "training_file": train, "validation_file": valid},
    )
    assert created.status_code == 200, created.text
    job_id = created.json()["id"]
    jobs_url = f"/v1/fine_tuning/jobs/{job_id}"

    def refused(status: str) -> None:
        assert api.client.get(jobs_url, headers=api.headers()).json()["status"] == status
        for file_id in (train, valid):
            response = api.client.delete(f"/v1/files/{file_id}", headers=api.headers())
            error = assert_error(response, 409, param="file_id", words=job_id)
            assert error["code"] == "file_in_use" and status in error["message"]
            assert response.headers["x-should-retry"] == "false"
        assert stored_files(api) == sorted([train, valid])
        content = api.client.get(f"/v1/files/{train}/content", headers=api.headers())
        assert content.content == jsonl(sentiment_rows(20, seed=10))

    refused("queued")
    paused = api.client.post(f"{jobs_url}/pause", headers=api.headers())
    assert paused.status_code == 200, paused.text
    refused("paused")

    # Once the job has finished (here: cancelled), its files may go.
    assert api.client.post(f"{jobs_url}/cancel", headers=api.headers()).status_code == 200
    for file_id in (train, valid):
        assert api.client.delete(f"/v1/files/{file_id}", headers=api.headers()).status_code == 200
    assert stored_files(api) == []
