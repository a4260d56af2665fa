"""Registering a finished model (issue 9 A6), on SQLite and on PostgreSQL: a commit whose reply
is lost is not undone by its retry, and an attempt that lost its job removes its own output and
nothing of its successor's. Each attempt writes its model to a directory of its own."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select, update
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from app.core.db import session_scope
from app.core.settings import Settings
from app.core.storage import Storage, attempt_name
from app.main import create_app
from app.models import File, FineTunedModel, Job, JobEvent, utcnow
from app.services import keys, leases, models, results
from tests.conftest import make_settings
from tests.support import jsonl
from tests.tiny_models import build_causal_lm
from worker import reconciler
from worker.runner import DatabaseReporter, _finish

TINY = "tiny/base"
TEXTS = ["the capital of france is paris", "two plus two is four", "hello there"]
CHAT = [
    {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
    for q, a in [("capital of france?", "Paris."), ("two plus two?", "Four.")] * 5
]


@dataclass
class Trained:
    """What the training loop hands to registration (worker.training's TrainingResult)."""

    model_kind: str = "causal-lm"
    labels: list[str] = field(default_factory=list)
    adapter: bool = False
    trained_tokens: int = 120
    steps: int = 6
    metrics_history: list[dict[str, float | int]] = field(
        default_factory=lambda: [{"step": 3, "train_loss": 2.5}, {"step": 6, "train_loss": 1.5}]
    )


@dataclass
class Server:
    settings: Settings
    client: TestClient
    key: str

    @property
    def url(self) -> str:
        return self.settings.sqlalchemy_url

    @property
    def storage(self) -> Storage:
        return Storage(self.settings.storage_root)

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"}

    def running_job(self, owner: str) -> str:
        """A chat job created through the API, validated, and claimed by ``owner``."""
        upload = self.client.post(
            "/v1/files",
            headers=self.headers(),
            files={"file": ("chat.jsonl", jsonl(CHAT), "application/octet-stream")},
            data={"purpose": "fine-tune"},
        )
        assert upload.status_code == 200, upload.text
        body = {"model": TINY, "training_file": upload.json()["id"]}
        created = self.client.post("/v1/fine_tuning/jobs", headers=self.headers(), json=body)
        assert created.status_code == 200, created.text
        job_id: str = created.json()["id"]
        with session_scope(self.url) as session:
            assert leases.claim_job(session, job_id, owner, 600)
        return job_id

    def trained_output(self, job_id: str, owner: str, tiny_model: Path) -> Path:
        """What the training process of ``owner``'s attempt leaves before registering."""
        output = self.storage.final_output_dir(job_id, attempt_name(owner))
        shutil.copytree(tiny_model, output)
        return output

    def job(self, job_id: str) -> Job:
        with session_scope(self.url) as session:
            job = session.get(Job, job_id)
            assert job is not None
            return job

    def model_rows(self, job_id: str) -> list[FineTunedModel]:
        with session_scope(self.url) as session:
            return list(
                session.scalars(select(FineTunedModel).where(FineTunedModel.job_id == job_id))
            )

    def count(self, message: str, job_id: str) -> int:
        with session_scope(self.url) as session:
            return int(
                session.scalar(
                    select(func.count())
                    .select_from(JobEvent)
                    .where(JobEvent.job_id == job_id, JobEvent.message == message)
                )
                or 0
            )

    def stored_files(self) -> set[str]:
        """The ids of the files on disk, each of which must have its row."""
        folder = self.storage.root / "files"
        on_disk = {p.name for p in folder.iterdir()}
        with session_scope(self.url) as session:
            rows = set(session.scalars(select(File.id)))
        assert on_disk == rows, "a file on disk without its row, or a row without its bytes"
        return on_disk

    def assert_serves(self, job_id: str) -> None:
        """The job's model, as a user finds it: listed, loadable from safetensors, answering."""
        job = self.job(job_id)
        assert job.status == "succeeded" and job.fine_tuned_model is not None
        (row,) = self.model_rows(job_id)
        assert row.id == job.fine_tuned_model
        with session_scope(self.url) as session:
            org = keys.get_or_create_organization(session, "org-a")
            loadable = models.resolve_loadable(session, self.settings, self.storage, org, row.id)
        assert (loadable.path / "model.safetensors").is_file()
        assert models.unsafe_weights(loadable.path) is None
        completion = self.client.post(
            "/v1/completions",
            headers=self.headers(),
            json={"model": row.id, "prompt": "two plus", "max_tokens": 3},
        )
        assert completion.status_code == 200, completion.text
        (result_file,) = job.result_files
        content = self.client.get(f"/v1/files/{result_file}/content", headers=self.headers())
        assert content.status_code == 200 and content.text.startswith("step,train_loss")


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_causal_lm(tmp_path_factory.mktemp("tiny") / "model", TEXTS, layers=1)


@pytest.fixture
def server(database_url: str, tmp_path: Path, tiny_model: Path) -> Iterator[Server]:
    settings = make_settings(
        tmp_path / "data", base_models={TINY: tiny_model}, database_url=database_url
    )
    with session_scope(settings.sqlalchemy_url) as session:
        key = keys.create_key(session, "org-a").key
    with TestClient(create_app(settings)) as client:
        yield Server(settings, client, key)


def fail_one_commit(monkeypatch: pytest.MonkeyPatch, *, committed: bool) -> list[str]:
    """The first commit after a registration raises a connection error, having committed
    (``committed``: its reply was lost) or not; returns a log of what happened."""
    real_register, real_commit = results.register_fine_tuned_model, Session.commit
    log: list[str] = []

    def register(*args: Any, **kwargs: Any) -> results.Registration:
        log.append("register")
        return real_register(*args, **kwargs)

    def commit(self: Session) -> None:
        if log[-1:] != ["register"] or "lost" in log:
            return real_commit(self)
        log.append("lost")
        if committed:
            real_commit(self)
        else:
            self.rollback()
        raise OperationalError("COMMIT", {}, ConnectionResetError("connection reset by peer"))

    monkeypatch.setattr(results, "register_fine_tuned_model", register)
    monkeypatch.setattr(Session, "commit", commit)
    return log


@pytest.mark.parametrize("committed", [True, False], ids=["reply-lost", "commit-failed"])
def test_a_commit_whose_reply_is_lost_keeps_the_model(
    server: Server, tiny_model: Path, monkeypatch: pytest.MonkeyPatch, committed: bool
) -> None:
    owner = "host:1:100:attemptA"
    job_id = server.running_job(owner)
    output = server.trained_output(job_id, owner, tiny_model)
    files_before = server.stored_files()
    log = fail_one_commit(monkeypatch, committed=committed)

    _finish(DatabaseReporter(server.settings, job_id, owner), job_id, output, Trained())

    monkeypatch.undo()
    assert log == ["register", "lost", "register"]  # the retry ran
    server.assert_serves(job_id)
    job = server.job(job_id)
    assert (job.trained_tokens, job.steps_completed, job.lease_owner) == (120, 6, None)
    assert server.count("The job has successfully completed", job_id) == 1
    assert server.count(f"New fine-tuned model created: {job.fine_tuned_model}", job_id) == 1
    # One result file on disk: the one the job names (the failed try's copy is removed).
    assert server.stored_files() == files_before | set(job.result_files)
    assert not output.exists()
    (row,) = server.model_rows(job_id)
    assert row.storage_path == f"models/{job_id}/{attempt_name(owner)}"


@pytest.mark.parametrize("lost", ["before-its-check", "after-its-check"])
def test_a_stale_attempt_removes_its_own_output_only(
    server: Server, tiny_model: Path, monkeypatch: pytest.MonkeyPatch, lost: str
) -> None:
    """Attempt A's lease runs out, the reconciler queues the job again, attempt B takes it
    over and registers its model; then A finishes too. A's files go, B's stay, B's model
    serves. ``after-its-check``: A found the job still its own just before B took it."""
    stale, successor = "host:1:100:attemptA", "host:1:200:attemptB"
    job_id = server.running_job(stale)
    with session_scope(server.url) as session:
        session.execute(update(Job).where(Job.id == job_id).values(lease_expires_at=utcnow()))
    assert reconciler.reconcile_once(server.settings)["expired"] == 1
    with session_scope(server.url) as session:
        assert leases.claim_job(session, job_id, successor, 600)
    stale_output = server.trained_output(job_id, stale, tiny_model)
    successor_output = server.trained_output(job_id, successor, tiny_model)
    _finish(DatabaseReporter(server.settings, job_id, successor), job_id, successor_output,
            Trained())  # fmt: skip
    server.assert_serves(job_id)
    registered = server.job(job_id)
    files_after_successor = server.stored_files()

    if lost == "after-its-check":
        monkeypatch.setattr(DatabaseReporter, "still_ours", lambda self: True)
    with pytest.raises(results.JobNotOurs):
        _finish(DatabaseReporter(server.settings, job_id, stale), job_id, stale_output,
                Trained(trained_tokens=1, steps=1))  # fmt: skip

    assert not stale_output.exists()
    model_folder = server.storage.model_dir(job_id)
    assert [p.name for p in model_folder.iterdir()] == [attempt_name(successor)]
    server.assert_serves(job_id)
    job = server.job(job_id)
    assert (job.fine_tuned_model, job.result_files) == (
        registered.fine_tuned_model,
        registered.result_files,
    )
    assert (job.trained_tokens, job.steps_completed) == (120, 6)
    assert server.stored_files() == files_after_successor
    assert server.count("The job has successfully completed", job_id) == 1


def test_deleting_the_model_removes_its_attempt_directory(server: Server, tiny_model: Path) -> None:
    owner = "host:1:100:attemptA"
    job_id = server.running_job(owner)
    output = server.trained_output(job_id, owner, tiny_model)
    _finish(DatabaseReporter(server.settings, job_id, owner), job_id, output, Trained())
    name = server.job(job_id).fine_tuned_model
    attempt_dir = server.storage.attempt_model_dir(job_id, attempt_name(owner))
    assert attempt_dir.is_dir()
    deleted = server.client.delete(f"/v1/models/{name}", headers=server.headers())
    assert deleted.status_code == 200, deleted.text
    assert not attempt_dir.exists()
    assert server.model_rows(job_id) == []
