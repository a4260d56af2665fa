"""What a job leaves on disk once it has ended (issue 9, A13), through the real worker paths: a
supervised training process, and the reconciler's sweep. A succeeded job keeps only the weights
of its kept checkpoints; a failed or cancelled one keeps nothing, whether its trainer ended it
or nobody did (cancelled while paused, failed by the reconciler); a deleted model takes its
job's checkpoints along; a queued or paused job keeps everything it resumes from; and a full
disk during a checkpoint fails the job with ``disk_full`` and leaves no directory."""

from __future__ import annotations

import textwrap
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from functools import partial
from pathlib import Path

import pytest
from sqlalchemy import select, update

from app.core.db import get_engine, session_scope
from app.core.migrate import upgrade
from app.core.settings import Settings
from app.core.storage import Storage
from app.models import Checkpoint, FineTunedModel, Job, utcnow
from app.schemas import HyperparametersRequest, JobCreate
from app.services import job_files, jobs, keys, leases, models, results
from tests.conftest import make_settings
from tests.crash_support import tabular_rows
from tests.support import add_training_file, jsonl
from worker import reconciler, supervisor

# 240 rows, 10% held out: 216 to train on, 7 steps of 32 per epoch.
STEPS_PER_EPOCH, EPOCHS = 7, 2
KEEP = 3


@dataclass
class World:
    settings: Settings
    org_name: str

    @property
    def url(self) -> str:
        return self.settings.sqlalchemy_url

    @property
    def storage(self) -> Storage:
        return Storage(self.settings.storage_root)

    def new_job(self) -> str:
        """A tabular job that checkpoints every step, queued as the API leaves it."""
        hyperparameters = HyperparametersRequest(
            n_epochs=EPOCHS, batch_size=32, checkpoint_every_steps=1
        )
        with session_scope(self.url) as session:
            org = keys.get_or_create_organization(session, self.org_name)
            content = jsonl(tabular_rows(240))
            file_id = add_training_file(session, self.storage, org.id, content)
            body = JobCreate(
                model="tunehouse/mlp", training_file=file_id, hyperparameters=hyperparameters
            )
            job_id = jobs.create_job(session, self.settings, org, body)[0].id
        sessions = partial(session_scope, self.url)
        assert job_files.validate_job_files(self.settings, job_id, sessions=sessions)
        return job_id

    def job(self, job_id: str) -> Job:
        with session_scope(self.url) as session:
            job = session.get(Job, job_id)
            assert job is not None
            return job

    def steps(self, job_id: str) -> set[int]:
        """The steps of the job's checkpoint rows (what the checkpoints route lists)."""
        with session_scope(self.url) as session:
            query = select(Checkpoint.step_number).where(Checkpoint.job_id == job_id)
            return set(session.scalars(query))

    def sizes(self, job_id: str) -> dict[int, int]:
        """The job's checkpoint rows: step -> bytes (what the storage quota counts)."""
        with session_scope(self.url) as session:
            query = select(Checkpoint.step_number, Checkpoint.bytes)
            found = session.execute(query.where(Checkpoint.job_id == job_id))
            return {step: size for step, size in found}

    def fake_checkpoint(self, job_id: str, step: int) -> Path:
        """A complete checkpoint on disk with its row, as a trainer leaves it."""
        path = self.storage.checkpoints_dir(job_id) / f"step-{step}"
        path.mkdir(parents=True)
        (path / "model.safetensors").write_bytes(b"\0" * 4096)
        (path / "training_state.pt").write_bytes(b"\0" * 8192)
        (path / "COMPLETE").write_text(f"step {step}\n")
        with session_scope(self.url) as session:
            results.record_checkpoint(session, job_id, step, self.storage.relative(path), {})
        return path

    def backdate_end(self, job_id: str) -> None:
        """As if the job had ended long ago: no trainer of it can still be alive."""
        with session_scope(self.url) as session:
            session.execute(
                update(Job)
                .where(Job.id == job_id)
                .values(finished_at=utcnow() - timedelta(hours=1))
            )

    def reconcile(self) -> None:
        reconciler.reconcile_once(self.settings)


def files_under(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_size for p in root.rglob("*") if p.is_file()}


@pytest.fixture
def world(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[World]:
    settings = make_settings(tmp_path / "data", keep_checkpoints=KEEP, max_attempts=1)
    upgrade(settings.sqlalchemy_url)
    # The training process reads its settings from the environment.
    monkeypatch.setenv("TUNEHOUSE_DATA_DIR", str(settings.data_dir))
    monkeypatch.setenv("TUNEHOUSE_KEEP_CHECKPOINTS", str(KEEP))
    yield World(settings, f"org-{uuid.uuid4().hex[:8]}")
    get_engine(settings.sqlalchemy_url).dispose()


def test_a_succeeded_job_keeps_the_weights_of_its_kept_checkpoints_only(world: World) -> None:
    job_id = world.new_job()
    supervisor.supervise_job(world.settings, job_id)
    job = world.job(job_id)
    assert job.status == jobs.SUCCEEDED, job.error

    total = STEPS_PER_EPOCH * EPOCHS
    kept = {STEPS_PER_EPOCH, total} | set(range(total - KEEP + 1, total + 1))
    job_dir = world.storage.job_dir(job_id)
    on_disk = files_under(job_dir)
    assert {Path(name).parts[1] for name in on_disk} == {f"step-{s}" for s in kept}
    assert {Path(name).parts[0] for name in on_disk} == {"checkpoints"}  # no scratch left
    assert not [name for name in on_disk if name.endswith("training_state.pt")]
    # Every row has its directory, with its size; every directory its row.
    sizes = {
        step: sum(n for name, n in on_disk.items() if Path(name).parts[1] == f"step-{step}")
        for step in kept
    }
    assert world.sizes(job_id) == sizes
    with session_scope(world.url) as session:
        model = session.scalar(select(FineTunedModel).where(FineTunedModel.job_id == job_id))
        assert model is not None
        model_dir = world.storage.resolve(model.storage_path)
        assert model.bytes == sum(files_under(model_dir).values()) > 0
    assert job.storage_state == "tidied"


def test_a_full_disk_during_a_checkpoint_fails_the_job_with_disk_full(
    world: World, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The training process is a fresh interpreter: its torch.save is made to find a full disk
    # through a sitecustomize module, loaded at its start.
    inject = tmp_path / "inject"
    inject.mkdir()
    (inject / "sitecustomize.py").write_text(
        textwrap.dedent(
            """
            import errno
            import torch

            def _full_disk(*args, **kwargs):
                raise OSError(errno.ENOSPC, "No space left on device")

            torch.save = _full_disk
            """
        )
    )
    monkeypatch.setenv("PYTHONPATH", str(inject))
    job_id = world.new_job()
    supervisor.supervise_job(world.settings, job_id)

    job = world.job(job_id)
    assert job.status == jobs.FAILED
    assert job.error is not None and job.error["code"] == "disk_full", job.error
    assert "disk is full" in job.error["message"]
    assert str(world.settings.data_dir) not in job.error["message"]
    # Nothing of the job is left: no temporary or half-written checkpoint, no directory.
    assert not world.storage.job_dir(job_id).exists()
    assert world.steps(job_id) == set()


def test_a_paused_job_keeps_its_checkpoints_until_it_is_cancelled(world: World) -> None:
    paused, queued = world.new_job(), world.new_job()
    assert world.job(paused).status == jobs.QUEUED
    with session_scope(world.url) as session:
        assert leases.claim_job(session, paused, "worker-a", 60)
    checkpoint = world.fake_checkpoint(paused, 3)
    with session_scope(world.url) as session:
        org = keys.get_or_create_organization(session, world.org_name)
        jobs.pause_job(session, org, paused)
        leases.release_lease(session, paused, "worker-a")
    resumed_from = world.fake_checkpoint(queued, 5)  # a queued job goes on from here
    before = files_under(world.storage.root / "jobs")

    world.reconcile()
    assert files_under(world.storage.root / "jobs") == before
    assert world.job(paused).status == jobs.PAUSED

    with session_scope(world.url) as session:
        org = keys.get_or_create_organization(session, world.org_name)
        jobs.cancel_job(session, org, paused)
    world.backdate_end(paused)
    world.reconcile()
    assert not checkpoint.exists() and not world.storage.job_dir(paused).exists()
    assert world.steps(paused) == set()
    assert world.job(paused).storage_state == "removed"
    assert (resumed_from / "training_state.pt").is_file() and world.steps(queued) == {5}


def test_a_job_failed_by_the_reconciler_loses_its_directory(world: World) -> None:
    job_id = world.new_job()
    with session_scope(world.url) as session:
        assert leases.claim_job(session, job_id, "worker-gone", 60)
    world.fake_checkpoint(job_id, 2)
    with session_scope(world.url) as session:  # its worker died: the lease runs out
        session.execute(
            update(Job)
            .where(Job.id == job_id)
            .values(lease_expires_at=utcnow() - timedelta(seconds=5))
        )
    world.reconcile()
    job = world.job(job_id)
    assert (job.status, job.error and job.error["code"]) == (jobs.FAILED, "max_attempts_exceeded")
    # Its trainer could still be on its way out: the directory waits out the lease...
    assert world.storage.job_dir(job_id).exists()
    world.backdate_end(job_id)
    world.reconcile()  # ...then goes.
    assert not world.storage.job_dir(job_id).exists() and world.steps(job_id) == set()


def test_a_deleted_models_checkpoints_go_with_it(world: World) -> None:
    job_id = world.new_job()
    with session_scope(world.url) as session:
        assert leases.claim_job(session, job_id, "worker-a", 60)
    checkpoint = world.fake_checkpoint(job_id, 4)
    model_dir = world.storage.model_dir(job_id)
    model_dir.mkdir(parents=True)
    (model_dir / "model.safetensors").write_bytes(b"\0" * 1000)
    name = f"ft:tunehouse/mlp:{world.org_name}::{uuid.uuid4().hex[:8]}"
    with session_scope(world.url) as session:
        org = keys.get_or_create_organization(session, world.org_name)
        session.add(
            FineTunedModel(
                id=name,
                organization_id=org.id,
                task="tabular",
                base_model="tunehouse/mlp",
                job_id=job_id,
                storage_path=world.storage.relative(model_dir),
            )
        )
        assert jobs.transition(
            session, job_id, to=jobs.SUCCEEDED, from_=(jobs.RUNNING,), fine_tuned_model=name
        )
    world.backdate_end(job_id)  # as if its supervisor had died before tidying it
    world.reconcile()
    assert checkpoint.is_dir() and not (checkpoint / "training_state.pt").exists()
    assert world.sizes(job_id) == {4: 4096 + len("step 4\n")}  # its weights, measured
    assert world.job(job_id).storage_state == "tidied"

    with session_scope(world.url) as session:
        org = keys.get_or_create_organization(session, world.org_name)
        models.delete_model(session, world.storage, org, name)
    world.reconcile()
    assert not world.storage.job_dir(job_id).exists() and world.steps(job_id) == set()
    assert world.job(job_id).storage_state == "removed"
