"""What a training process leaves behind: its checkpoints as it goes, and at the end the
fine-tuned model with its result file. The training process calls these (``worker/runner.py``);
every write is conditional on the job still being leased to it.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session

from app.core.ids import new_id
from app.core.storage import Storage
from app.models import Checkpoint, File, FineTunedModel, Job, Organization
from app.services.files import store_result_file
from app.services.jobs import RUNNING, SUCCEEDED, add_event, fine_tuned_model_name, transition
from app.services.lineage import root_base


class JobNotOurs(Exception):
    """The job was paused, cancelled, deleted or taken over before it could be finished."""


@dataclass(frozen=True)
class Registration:
    """A job's fine-tuned model, and its result file (None once a user deleted it)."""

    model: str
    result_file: Path | None


class TrainedModel(Protocol):
    """What registration needs from a finished training run (the worker's TrainingResult)."""

    model_kind: str  # the stored model's kind (app/core/kinds.py), not the dataset format
    labels: list[str]  # class names in id order; [] for generative kinds
    adapter: bool  # a LoRA adapter of the job's base model, not a full model
    trained_tokens: int
    steps: int
    metrics_history: list[dict[str, float | int]]  # one row of the result CSV each


def results_csv(history: list[dict[str, Any]]) -> bytes:
    """The metrics events of a run as CSV, one column per metric any of them has."""
    columns: list[str] = []
    for row in history:
        columns += [k for k in row if k not in columns]
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(history)
    return out.getvalue().encode()


def register_fine_tuned_model(
    session: Session,
    storage: Storage,
    job_id: str,
    owner: str,
    *,
    model_dir: Path,
    trained: TrainedModel,
) -> Registration:
    """Register the model stored in ``model_dir`` and the job's result file, and mark the job
    succeeded, all in the caller's transaction; raises JobNotOurs unless the job is still
    running under ``owner``'s lease, so the transaction must then not commit.

    Idempotent: when the job already succeeded with the model in ``model_dir`` (a directory
    of this attempt's own), a try whose reply was lost did commit, and this changes nothing.

    Returns the registration: the caller removes any result file it stored in tries that did
    not commit. When this raises, it has removed the file it stored itself."""
    already = registration(session, storage, job_id, model_dir)
    if already is not None:
        return already
    job = session.get(Job, job_id)
    org = session.get(Organization, job.organization_id) if job else None
    if job is None or org is None:
        raise JobNotOurs(job_id)
    name = fine_tuned_model_name(job, org)
    results = store_result_file(
        session, storage, org.id, f"{job_id}-results.csv", results_csv(trained.metrics_history)
    )
    written = storage.resolve(results.storage_path)
    try:
        base = root_base(job)  # what a continued job's model descends from
        adapter = f" (a LoRA adapter of {base})" if trained.adapter else ""
        add_event(session, job_id, f"New fine-tuned model created: {name}{adapter}")
        # The conditional UPDATE first: a stale attempt stops here, before its model row
        # could collide with the one its successor registered under the same name.
        if not transition(
            session,
            job_id,
            to=SUCCEEDED,
            from_=(RUNNING,),
            owner=owner,
            message="The job has successfully completed",
            fine_tuned_model=name,
            trained_tokens=trained.trained_tokens,
            steps_completed=trained.steps,
            result_files=[results.id],
            estimated_finish=None,
        ):
            raise JobNotOurs(job_id)
        session.add(
            FineTunedModel(
                id=name,
                organization_id=org.id,
                task=trained.model_kind,  # the model kind, not the dataset format
                base_model=base,  # for a LoRA adapter: the base it applies to
                job_id=job.id,
                storage_path=storage.relative(model_dir),
                labels=list(trained.labels) or None,  # generative models have none
            )
        )
        session.flush()
    except BaseException:
        written.unlink(missing_ok=True)  # stored by a transaction that will not commit
        raise
    return Registration(name, written)


def registration(
    session: Session, storage: Storage, job_id: str, model_dir: Path
) -> Registration | None:
    """How the job was registered, if it succeeded with the model stored in ``model_dir``
    (so by the attempt that owns that directory); else None."""
    model = session.scalar(
        select(FineTunedModel.id).where(
            FineTunedModel.job_id == job_id,
            FineTunedModel.storage_path == storage.relative(model_dir),
        )
    )
    job = session.get(Job, job_id)
    if model is None or job is None or job.status != SUCCEEDED:
        return None
    result = session.get(File, job.result_files[0]) if job.result_files else None
    return Registration(model, storage.resolve(result.storage_path) if result else None)


def record_checkpoint(
    session: Session,
    job_id: str,
    step: int,
    storage_path: str,
    metrics: dict[str, float],
    size_bytes: int = 0,
) -> None:
    """Record a complete checkpoint at ``storage_path`` (``size_bytes`` on disk); once per
    (job, step): a step checkpointed again after a restart keeps its first row (the files
    were rewritten)."""
    known = session.scalar(
        select(Checkpoint.id).where(Checkpoint.job_id == job_id, Checkpoint.step_number == step)
    )
    if known is not None:
        return
    session.add(
        Checkpoint(
            id=new_id("ftckpt"),
            job_id=job_id,
            step_number=step,
            metrics={"step": step, **metrics},
            storage_path=storage_path,
            bytes=size_bytes,
        )
    )
    session.flush()


def update_checkpoints(
    session: Session, job_id: str, *, removed: Sequence[int], resized: Mapping[int, int]
) -> None:
    """Forget the checkpoints of the ``removed`` steps (their files go once this commits),
    and record the new size of those that lost their training state."""
    if removed:
        session.execute(
            delete(Checkpoint).where(
                Checkpoint.job_id == job_id, Checkpoint.step_number.in_(list(removed))
            )
        )
    for step, size in resized.items():
        session.execute(
            update(Checkpoint)
            .where(Checkpoint.job_id == job_id, Checkpoint.step_number == step)
            .values(bytes=size)
        )
