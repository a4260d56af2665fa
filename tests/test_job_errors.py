"""A job's error names files by their ids or storage-relative paths, never by the server's
absolute paths (issue 9 A14): neither when validation finds a file gone nor when the training
process does."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from app.core.storage import Storage, redact_paths
from tests.conftest import Api
from tests.support import BASE_MODEL, jsonl, sentiment_rows
from tests.test_files_api import upload
from worker import supervisor

# A slash that starts a word and is followed by a name: "/tmp/...", "'/home/..."
ABSOLUTE_PATH = re.compile(r"(?<![\w.:/-])/[\w.-]")


def assert_no_server_paths(api: Api, text: str) -> None:
    for path in (api.settings.storage_root, api.settings.resolved_data_dir, Path.home()):
        assert str(path) not in text, text
    assert not ABSOLUTE_PATH.search(text), text


def training_file(api: Api) -> str:
    response = upload(api, jsonl(sentiment_rows(24, seed=2)), content_type="text/plain")
    assert response.status_code == 200, response.text
    return str(response.json()["id"])


def remove_bytes(api: Api, file_id: str) -> None:
    """The stored file is lost from the disk (its row stays)."""
    Storage(api.settings.storage_root).file_path(file_id).unlink()


def job_with_events(api: Api, job_id: str) -> tuple[dict[str, Any], list[str]]:
    job = api.client.get(f"/v1/fine_tuning/jobs/{job_id}", headers=api.headers()).json()
    events = api.client.get(
        f"/v1/fine_tuning/jobs/{job_id}/events", headers=api.headers(), params={"limit": 100}
    ).json()["data"]
    return job, [event["message"] for event in events]


def test_a_file_gone_before_validation_is_named_by_its_id(api: Api) -> None:
    file_id = training_file(api)
    remove_bytes(api, file_id)
    body = {"model": BASE_MODEL, "training_file": file_id}
    created = api.client.post("/v1/fine_tuning/jobs", headers=api.headers(), json=body)
    assert created.status_code == 200, created.text
    job, events = job_with_events(api, created.json()["id"])
    assert job["status"] == "failed"
    assert job["error"]["code"] == "invalid_training_file"
    assert job["error"]["message"] == (
        f"File '{file_id}' cannot be read: No such file or directory."
    )
    for text in [job["error"]["message"], *events]:
        assert_no_server_paths(api, text)


def test_a_file_gone_before_training_is_named_without_server_paths(
    api: Api, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The job was validated and queued; then its file is lost, and the training process
    (a real one, started by the supervisor) fails the job."""
    file_id = training_file(api)
    body = {"model": BASE_MODEL, "training_file": file_id}
    created = api.client.post("/v1/fine_tuning/jobs", headers=api.headers(), json=body)
    job_id = created.json()["id"]
    assert job_with_events(api, job_id)[0]["status"] == "queued"
    remove_bytes(api, file_id)
    # The training process reads its settings from the environment, as under a worker.
    monkeypatch.setenv("TUNEHOUSE_DATA_DIR", str(api.settings.data_dir))
    supervisor.supervise_job(api.settings, job_id)
    job, events = job_with_events(api, job_id)
    assert job["status"] == "failed", job
    assert job["error"]["code"] == "training_error"
    assert "FileNotFoundError" in job["error"]["message"]
    assert f"files/{file_id}" in job["error"]["message"]  # named within the storage
    for text in [job["error"]["message"], *events]:
        assert_no_server_paths(api, text)


def test_redact_paths_names_storage_files_relative_to_the_root(tmp_path: Path) -> None:
    root = tmp_path / "storage"
    text = (
        f"[Errno 2] No such file or directory: '{root}/jobs/ftjob-a/final-x/config.json'; "
        "Can't load '/opt/bases/minilm/'. Model ft:tiny/base:org:: and "
        "sentence-transformers/all-MiniLM-L6-v2 stay; see https://example.com/a/b; 8/16"
    )
    assert redact_paths(text, root) == (
        "[Errno 2] No such file or directory: 'jobs/ftjob-a/final-x/config.json'; "
        "Can't load 'minilm'. Model ft:tiny/base:org:: and "
        "sentence-transformers/all-MiniLM-L6-v2 stay; see https://example.com/a/b; 8/16"
    )
