"""The training process: one per job, started with ``spawn`` by the supervisor.

It owns the accelerator and everything torch allocates; when it exits, all of it is freed. It
reports to the database directly (progress, events, checkpoints, the lease) and finishes the
job itself, every write conditional on the job still being leased to it.
"""

from __future__ import annotations

import csv
import io
import logging
import os
import signal
import threading
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import select

from app.core.db import session_scope
from app.core.ids import new_id
from app.core.process import die_with_parent
from app.core.settings import Settings, get_settings
from app.core.storage import Storage
from app.models import Checkpoint, File, FineTunedModel, Job, Organization, utcnow
from app.services import jobs
from app.services.files import store_result_file
from app.services.models import MLP_MODEL

log = logging.getLogger("tunehouse.training")


class DatabaseReporter:
    """The training loop's view of the job row: progress, events, checkpoints and the lease."""

    def __init__(self, settings: Settings, job_id: str, owner: str):
        self.settings, self.job_id, self.owner = settings, job_id, owner
        self.url = settings.sqlalchemy_url
        self.storage = Storage(settings.storage_root)
        self._stop = threading.Event()
        self._started = time.monotonic()
        self._last_progress = 0.0
        self._lease_ok_until = time.monotonic() + settings.lease_seconds

    # -- the lease ------------------------------------------------------------------------------

    def start_heartbeat(self) -> None:
        threading.Thread(target=self._heartbeat, name="lease-heartbeat", daemon=True).start()

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.settings.heartbeat_seconds):
            try:
                with session_scope(self.url) as session:
                    ours = jobs.renew_lease(
                        session, self.job_id, self.owner, self.settings.lease_seconds
                    )
            except Exception:  # the database is briefly away: keep training, retry soon
                log.warning("heartbeat for %s failed; retrying", self.job_id, exc_info=True)
                if time.monotonic() > self._lease_ok_until:
                    log.error("lease for %s has expired; stopping", self.job_id)
                    self.request_stop()
                continue
            if not ours:
                log.info("job %s is no longer ours (cancelled or taken over)", self.job_id)
                self.request_stop()
                return
            self._lease_ok_until = time.monotonic() + self.settings.lease_seconds

    def request_stop(self) -> None:
        self._stop.set()

    def should_stop(self) -> bool:
        return self._stop.is_set()

    # -- what the loop reports -------------------------------------------------------------------

    def progress(self, step: int, total_steps: int) -> None:
        now = time.monotonic()
        if step not in (0, total_steps) and now - self._last_progress < 1.0:
            return
        self._last_progress = now
        finish = None
        if step > 0:
            remaining = (now - self._started) / step * (total_steps - step)
            finish = utcnow() + timedelta(seconds=remaining)
        with session_scope(self.url) as session:
            jobs.record_progress(
                session,
                self.job_id,
                self.owner,
                steps_completed=step,
                total_steps=total_steps,
                estimated_finish=finish,
            )

    def metrics(self, data: dict[str, float | int]) -> None:
        parts = [f"Step {data.get('step')}"]
        for key, label in (
            ("train_loss", "training loss"),
            ("valid_loss", "validation loss"),
            ("valid_accuracy", "validation accuracy"),
            ("valid_mean_token_accuracy", "validation token accuracy"),
        ):
            if key in data:
                parts.append(f"{label}={float(data[key]):.4f}")
        with session_scope(self.url) as session:
            jobs.add_event(session, self.job_id, ", ".join(parts), type="metrics", data=dict(data))

    def message(self, text: str, level: str = "info") -> None:
        with session_scope(self.url) as session:
            jobs.add_event(session, self.job_id, text, level=level)

    def checkpoint(self, step: int, path: Path, metrics: dict[str, float]) -> None:
        with session_scope(self.url) as session:
            known = session.scalar(
                select(Checkpoint.id).where(
                    Checkpoint.job_id == self.job_id, Checkpoint.step_number == step
                )
            )
            if known is not None:  # written before a restart; the files were just rewritten
                return
            session.add(
                Checkpoint(
                    id=new_id("ftckpt"),
                    job_id=self.job_id,
                    step_number=step,
                    metrics={"step": step, **metrics},
                    storage_path=self.storage.relative(path),
                )
            )


def _result_csv(history: list[dict[str, Any]]) -> bytes:
    columns: list[str] = []
    for row in history:
        columns += [k for k in row if k not in columns]
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(history)
    return out.getvalue().encode()


def _finish(reporter: DatabaseReporter, job_id: str, output_dir: Path, result: Any) -> None:
    """Register the model and the result file and mark the job succeeded, in one transaction
    that only commits while the job is still ours. Otherwise the model is thrown away."""
    storage = reporter.storage
    model_dir = storage.model_dir(job_id)
    storage.remove_tree(model_dir)
    model_dir.parent.mkdir(parents=True, exist_ok=True)
    os.replace(output_dir, model_dir)
    results: File | None = None
    try:
        with session_scope(reporter.url) as session:
            job = session.get(Job, job_id)
            org = session.get(Organization, job.organization_id) if job else None
            if job is None or org is None:
                raise LookupError("job deleted")
            name = jobs.fine_tuned_model_name(job, org)
            results = store_result_file(
                session,
                storage,
                org.id,
                f"{job_id}-results.csv",
                _result_csv(result.metrics_history),
            )
            session.add(
                FineTunedModel(
                    id=name,
                    organization_id=org.id,
                    task=result.model_kind,  # the model kind, not the dataset format
                    base_model=job.model,  # for a LoRA adapter: the base it applies to
                    job_id=job.id,
                    storage_path=storage.relative(model_dir),
                    labels=list(result.labels) or None,  # generative models have none
                )
            )
            adapter = f" (a LoRA adapter of {job.model})" if result.adapter else ""
            jobs.add_event(session, job_id, f"New fine-tuned model created: {name}{adapter}")
            if not jobs.transition(
                session,
                job_id,
                to=jobs.SUCCEEDED,
                from_=(jobs.RUNNING,),
                owner=reporter.owner,
                message="The job has successfully completed",
                fine_tuned_model=name,
                trained_tokens=result.trained_tokens,
                steps_completed=result.steps,
                result_files=[results.id],
                estimated_finish=None,
            ):
                raise LookupError("job no longer ours")
    except Exception:
        storage.remove_tree(model_dir)
        if results is not None:
            storage.resolve(results.storage_path).unlink(missing_ok=True)
        raise


def _spec(settings: Settings, job_id: str) -> Any:
    from worker.training.checkpoint import latest_complete_checkpoint
    from worker.training.spec import TrainingSpec

    storage = Storage(settings.storage_root)
    with session_scope(settings.sqlalchemy_url) as session:
        job = session.get(Job, job_id)
        if job is None:
            raise LookupError(f"job {job_id} not found")

        def path_of(file_id: str | None) -> Path | None:
            if file_id is None:
                return None
            file = session.get(File, file_id)
            if file is None:
                raise FileNotFoundError(f"file {file_id} was deleted")
            return storage.resolve(file.storage_path)

        return TrainingSpec(
            job_id=job.id,
            task=job.task,
            # A model designed from scratch has no base directory: its architecture is in the
            # method.
            base_model_dir=(
                None if job.model == MLP_MODEL else settings.registered_base_models()[job.model]
            ),
            training_file=path_of(job.training_file),
            validation_file=path_of(job.validation_file),
            output_dir=storage.job_dir(job.id) / "final",
            checkpoints_dir=storage.checkpoints_dir(job.id),
            hyperparameters=dict(job.hyperparameters),
            seed=job.seed,
            method=dict(job.method or {}),
            # A job restarted after its worker died goes on from its newest complete checkpoint.
            resume_from=latest_complete_checkpoint(storage.checkpoints_dir(job.id)),
        )


def _fail(reporter: DatabaseReporter, code: str, message: str) -> None:
    with session_scope(reporter.url) as session:
        jobs.fail_job(
            session,
            reporter.job_id,
            code=code,
            message=message,
            owner=reporter.owner,
            from_=(jobs.RUNNING,),
        )


def run_training_process(job_id: str, owner: str) -> None:
    """Entry point of the spawned training process (its own session and process group)."""
    die_with_parent()
    if os.getppid() == 1:  # the worker died before the line above took effect
        return
    settings = get_settings()
    logging.basicConfig(
        level=settings.log_level, format=f"%(asctime)s %(levelname)s [train {job_id}] %(message)s"
    )
    reporter = DatabaseReporter(settings, job_id, owner)
    # SIGTERM asks for a clean stop at the next step; the supervisor kills after its grace.
    signal.signal(signal.SIGTERM, lambda *_: reporter.request_stop())
    reporter.start_heartbeat()

    from transformers.utils import logging as hf_logging

    from worker.training.loop import train
    from worker.training.spec import TrainingStopped

    hf_logging.disable_progress_bar()

    try:
        spec = _spec(settings, job_id)
        result = train(spec, reporter)
        _finish(reporter, job_id, spec.output_dir, result)
    except TrainingStopped:
        log.info("training of %s stopped on request", job_id)
    except MemoryError:
        log.exception("out of memory")
        _fail(reporter, "out_of_memory", "Training ran out of memory; try a smaller batch_size.")
    except Exception as exc:
        log.exception("training of %s failed", job_id)
        code = "out_of_memory" if "out of memory" in str(exc).lower() else "training_error"
        _fail(
            reporter,
            code,
            f"{type(exc).__name__}: {str(exc).splitlines()[0][:500] if str(exc) else ''}",
        )
    finally:
        reporter.request_stop()


if __name__ == "__main__":
    import sys

    run_training_process(sys.argv[1], sys.argv[2])
