"""The training process: one per job, started with ``spawn`` by the supervisor.

It owns the accelerator and everything torch allocates; when it exits, all of it is freed. It
reports to the database directly (progress, events, checkpoints, the lease) and finishes the
job itself, every write conditional on the job still being leased to it.

A job of several processes runs one of these per rank, under torchrun's elastic agent
(``worker/process_group.py``): rank 0 is the job's trainer as a lone process is; the other
ranks train in step with it and write nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import update
from sqlalchemy.orm import Session

from app.core.db import session_scope
from app.core.process import die_with_parent
from app.core.retry import retry_for
from app.core.settings import Settings, get_settings
from app.core.storage import (
    DISK_FULL_MESSAGE,
    Storage,
    attempt_name,
    is_disk_full,
    redact_paths,
    tree_bytes,
)
from app.models import File, Job, utcnow
from app.services import jobs, leases, results
from app.services.lineage import Start, starting_point
from app.services.models import MLP_MODEL, base_model_dir
from app.services.rowcount import rowcount
from worker.process_group import (
    RankReporter,
    group_broke,
    join_group,
    leave_group,
    log_as_trainer,
    rank_environment,
    run_agent,
)
from worker.wandb_run import WandbRun

log = logging.getLogger("tunehouse.training")


class DatabaseReporter:
    """The training loop's view of the job row: progress, events, checkpoints and the lease.

    The database may be away for a moment: the heartbeat retries with backoff, progress that
    cannot be written is skipped (the next step writes newer), and events and checkpoint rows
    wait in order and are written once the database answers again. Training goes on until the
    lease would have run out."""

    def __init__(self, settings: Settings, job_id: str, owner: str):
        self.settings, self.job_id, self.owner = settings, job_id, owner
        self.url = settings.sqlalchemy_url
        self.storage = Storage(settings.storage_root)
        self._stop = threading.Event()  # the loop should stop at its next step
        self._done = threading.Event()  # the process is exiting: the heartbeat ends
        self._started = time.monotonic()
        self._last_progress = 0.0
        self._lease_ok_until = time.monotonic() + settings.lease_seconds
        self._pending: list[Callable[[Session], object]] = []
        self._pending_lock = threading.Lock()
        # Called with each metrics event once it is recorded (the job's W&B run).
        self.metrics_sinks: list[Callable[[dict[str, float | int]], None]] = []

    # -- the lease ------------------------------------------------------------------------------

    def start_heartbeat(self) -> None:
        threading.Thread(target=self._heartbeat, name="lease-heartbeat", daemon=True).start()

    def _heartbeat(self) -> None:
        wait, failures = self.settings.heartbeat_seconds, 0
        while not self._done.wait(wait):
            try:
                with session_scope(self.url) as session:
                    status = leases.renew_lease(
                        session, self.job_id, self.owner, self.settings.lease_seconds
                    )
            except Exception:  # the database is briefly away: keep training, retry sooner
                failures += 1
                wait = min(self.settings.heartbeat_seconds, 0.5 * 2**failures)
                log.warning("heartbeat for %s failed (%d); retrying in %.1f s",
                            self.job_id, failures, wait, exc_info=failures == 1)  # fmt: skip
                if time.monotonic() > self._lease_ok_until:
                    log.error("the lease of %s has run out; stopping", self.job_id)
                    self.request_stop()
                continue
            wait, failures = self.settings.heartbeat_seconds, 0
            self._lease_ok_until = time.monotonic() + self.settings.lease_seconds
            if status is None:
                log.info("job %s is no longer ours (cancelled or taken over)", self.job_id)
                self.request_stop()
                return
            if status != jobs.RUNNING:  # paused or handed back: checkpoint, keep the lease
                self.request_stop()

    def request_stop(self) -> None:
        self._stop.set()

    def should_stop(self) -> bool:
        return self._stop.is_set()

    def _lease_state(self) -> leases.LeaseState | None:
        with session_scope(self.url) as session:
            return leases.lease_state(session, self.job_id)

    def still_ours(self) -> bool:
        """The job is running under our lease (as of now: read before touching files)."""
        return self._lease_state() == leases.LeaseState(jobs.RUNNING, self.owner)

    def checkpoint_on_stop(self) -> bool:
        """Stopping to be resumed later (a pause, a worker shutting down) saves a checkpoint
        first; a cancel, or a lease that is no longer ours, does not."""
        try:
            state = self._lease_state()
        except Exception:
            log.warning("could not read job %s before stopping", self.job_id, exc_info=True)
            return time.monotonic() < self._lease_ok_until  # still ours, as far as we know
        resumable = (jobs.PAUSED, jobs.QUEUED)
        return state is not None and state.owner == self.owner and state.status in resumable

    def stopped(self, step: int, checkpointed: bool) -> None:
        """The event that says where a stopped job will go on from."""
        with session_scope(self.url) as session:
            state = leases.lease_state(session, self.job_id)
            status = state.status if state is not None else None
            saved = f"at step {step}"
            if checkpointed and step:
                saved = f"checkpoint saved at step {step}"
            if status == jobs.PAUSED:
                jobs.add_event(session, self.job_id, f"Fine-tuning job paused; {saved}")
            elif status == jobs.QUEUED:
                jobs.add_event(
                    session, self.job_id, f"Training stopped for the worker's shutdown; {saved}"
                )

    def finished(self) -> None:
        self._done.set()
        self._stop.set()

    # -- writes that may wait for the database --------------------------------------------------

    def _write(self, write: Callable[[Session], object]) -> bool:
        """Write now, after anything still waiting; keep it for later if the database is away.
        True when it is written."""
        with self._pending_lock:
            self._pending.append(write)
            try:
                with session_scope(self.url) as session:
                    for pending in self._pending:
                        pending(session)
            except Exception:
                log.warning("could not write to the database (%d writes waiting)",
                            len(self._pending), exc_info=len(self._pending) == 1)  # fmt: skip
                return False
            self._pending.clear()
            return True

    def flush(self) -> None:
        """Everything still waiting, written (or an error if the database is still away)."""
        with self._pending_lock:
            if self._pending:
                with session_scope(self.url) as session:
                    for pending in self._pending:
                        pending(session)
                self._pending.clear()

    # -- what the loop reports -------------------------------------------------------------------

    def progress(self, step: int, total_steps: int) -> None:
        if self.settings.debug_step_delay_seconds and step > 0:
            time.sleep(self.settings.debug_step_delay_seconds)  # fault injection for tests
        now = time.monotonic()
        if step not in (0, total_steps) and now - self._last_progress < 1.0:
            return
        self._last_progress = now
        finish = None
        if step > 0:
            remaining = (now - self._started) / step * (total_steps - step)
            finish = utcnow() + timedelta(seconds=remaining)
        try:
            with session_scope(self.url) as session:
                leases.record_progress(
                    session,
                    self.job_id,
                    self.owner,
                    steps_completed=step,
                    total_steps=total_steps,
                    estimated_finish=finish,
                )
        except Exception:  # the next step writes newer figures
            log.warning("could not record progress of %s at step %d", self.job_id, step)

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
        text, payload = ", ".join(parts), dict(data)
        self._write(
            lambda session: jobs.add_event(session, self.job_id, text, type="metrics", data=payload)
        )
        for sink in self.metrics_sinks:
            sink(payload)

    def message(self, text: str, level: str = "info") -> None:
        text = redact_paths(text, self.storage.root)
        self._write(lambda session: jobs.add_event(session, self.job_id, text, level=level))

    def checkpoint(self, step: int, path: Path, metrics: dict[str, float]) -> None:
        relative, size = self.storage.relative(path), tree_bytes(path)
        self._write(
            lambda session: results.record_checkpoint(
                session, self.job_id, step, relative, metrics, size
            )
        )

    def checkpoints_pruned(self, removed: list[int], resized: dict[int, int]) -> bool:
        return self._write(
            lambda session: results.update_checkpoints(
                session, self.job_id, removed=removed, resized=resized
            )
        )

    def training_on(self, device: str) -> None:
        """Record what the job trains on, on the job and in an event."""
        self._write(lambda session: _record_device(session, self.job_id, self.owner, device))


def _record_device(session: Session, job_id: str, owner: str, device: str) -> None:
    result = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.lease_owner == owner)
        .values(device=device)
        .execution_options(synchronize_session=False)
    )
    if rowcount(result):
        jobs.add_event(session, job_id, f"Training on {device}")


def _finish(reporter: DatabaseReporter, job_id: str, output_dir: Path, result: Any) -> None:
    """Register the model and the result file and mark the job succeeded, in one transaction
    that only commits while the job is still ours (retried while the database is away; a try
    whose reply was lost but that did commit makes the next one a no-op).

    The model goes to a directory of this attempt's own, and only once the job was found still
    ours; an attempt that lost its job removes its own files, never another's."""
    storage, seconds = reporter.storage, reporter.settings.lease_seconds
    model_dir = storage.attempt_model_dir(job_id, attempt_name(reporter.owner))
    if not retry_for(seconds, reporter.still_ours, what="reading the lease"):
        storage.remove_tree(output_dir)
        raise results.JobNotOurs(job_id)
    model_dir.parent.mkdir(parents=True, exist_ok=True)
    os.replace(output_dir, model_dir)
    stored: list[Path] = []  # the result file of each try

    def register() -> results.Registration:
        with session_scope(reporter.url) as session:
            registration = results.register_fine_tuned_model(
                session, storage, job_id, reporter.owner, model_dir=model_dir, trained=result
            )
            if registration.result_file is not None:
                stored.append(registration.result_file)
        return registration

    try:
        kept = retry_for(seconds, register, what="registering").result_file
    except Exception:
        # The last try failed, but an earlier one may have committed with its reply lost.
        # When that cannot be told (the database is still away), the files stay.
        done = retry_for(seconds, lambda: _registration(reporter, model_dir), what="reading")
        if done is None:
            storage.remove_tree(model_dir)
            for path in stored:
                path.unlink(missing_ok=True)
            raise
        kept = done.result_file
    for path in stored:
        if path != kept:  # stored by a try that did not commit
            path.unlink(missing_ok=True)


def _registration(reporter: DatabaseReporter, model_dir: Path) -> results.Registration | None:
    with session_scope(reporter.url) as session:
        return results.registration(session, reporter.storage, reporter.job_id, model_dir)


def _base_dir(session: Session, settings: Settings, model_id: str) -> Path:
    """A registered base model's directory, or an uploaded one's (POST /v1/models)."""
    path = base_model_dir(session, settings, Storage(settings.storage_root), model_id)
    if path is None:
        raise LookupError(f"base model {model_id} is neither registered nor uploaded")
    return path


def _spec(settings: Settings, job_id: str, owner: str) -> Any:
    from worker.training.checkpoint import latest_complete_checkpoint
    from worker.training.spec import TrainingSpec

    storage = Storage(settings.storage_root)
    with session_scope(settings.sqlalchemy_url) as session:
        job = session.get(Job, job_id)
        if job is None:
            raise LookupError(f"job {job_id} not found")

        def path_of(file_id: str) -> Path:
            file = session.get(File, file_id)
            if file is None:
                raise FileNotFoundError(f"file {file_id} was deleted")
            return storage.resolve(file.storage_path)

        parent = starting_point(session, settings, job)
        return TrainingSpec(
            job_id=job.id,
            task=job.task,
            base_model_dir=_start_dir(session, settings, job, parent),
            training_file=path_of(job.training_file),
            validation_file=None if job.validation_file is None else path_of(job.validation_file),
            output_dir=storage.final_output_dir(job.id, attempt_name(owner)),
            checkpoints_dir=storage.checkpoints_dir(job.id),
            hyperparameters=dict(job.hyperparameters),
            seed=job.seed,
            method=dict(job.method or {}),
            # A job restarted after its worker died goes on from its newest complete checkpoint.
            resume_from=latest_complete_checkpoint(storage.checkpoints_dir(job.id)),
            checkpoint_every_seconds=settings.checkpoint_every_seconds,
            max_dataset_line_bytes=settings.max_dataset_line_bytes,
            debug_checkpoint_delay_seconds=settings.debug_checkpoint_delay_seconds,
            keep_checkpoints=settings.keep_checkpoints,
            resources=dict(job.resources or {}),
            model=job.model,
            integrations=list(job.integrations or []),
            parent=parent,
        )


def _start_dir(session: Session, settings: Settings, job: Job, parent: Start | None) -> Path | None:
    """The directory a job's model, tokenizer and config come from: its base model's; a full
    parent's own (it holds all three); none for a model designed from scratch (its
    architecture is in the method, or in its parent)."""
    base = parent.base if parent is not None else job.model
    if base == MLP_MODEL:
        return None
    if parent is not None and not parent.adapter:
        return parent.path
    return _base_dir(session, settings, base)


def _fail(reporter: DatabaseReporter, code: str, message: str) -> None:
    # Files named relative to the storage root, never by the server's absolute paths.
    message = redact_paths(message, reporter.storage.root)

    def fail() -> None:
        with session_scope(reporter.url) as session:
            jobs.fail_job(
                session,
                reporter.job_id,
                code=code,
                message=message,
                owner=reporter.owner,
                from_=(jobs.RUNNING,),
            )

    with contextlib.suppress(Exception):
        reporter.flush()
    retry_for(reporter.settings.lease_seconds, fail, what="recording the failure")


def run_training_process(job_id: str, owner: str) -> int:
    """Entry point of a training process: the job's only one, or one rank of its group (its
    own session and process group either way). Returns the exit status: 0 once the job is
    settled or stopped; non-zero when a rank of a group fails, so that the agent stops the
    group and the supervisor treats it as a crash."""
    die_with_parent()
    if os.getppid() == 1:  # the worker died before the line above took effect
        return 0
    rank, world_size = rank_environment()
    if rank != 0:
        return _run_rank(job_id, owner, rank, world_size)

    settings = get_settings()
    log_as_trainer(settings, job_id, rank if world_size > 1 else None)
    reporter = DatabaseReporter(settings, job_id, owner)
    # SIGTERM asks for a stop at the next step: with a checkpoint first when the job was paused
    # or handed back; the supervisor kills the process if it takes longer than its grace.
    signal.signal(signal.SIGTERM, lambda *_: reporter.request_stop())
    reporter.start_heartbeat()

    from transformers.utils import logging as hf_logging

    from worker.training.devices import describe_device, training_device
    from worker.training.loop import train
    from worker.training.spec import DeadlineExceeded, TrainingStopped

    hf_logging.disable_progress_bar()

    wandb_run: WandbRun | None = None
    exit_code = 1  # for the W&B run: 0 once the job succeeded or stopped to be resumed
    try:
        spec = retry_for(
            settings.lease_seconds, lambda: _spec(settings, job_id, owner), what="reading"
        )
        # The job's W&B run, for a wandb integration (None without one: wandb is not imported).
        wandb_run = WandbRun.start(
            spec, settings.data_dir, lambda text: reporter.message(text, level="warn")
        )
        if wandb_run is not None:
            reporter.metrics_sinks.append(wandb_run.log)
        device = training_device(spec.resources)
        # Every rank has read the spec (and so the checkpoint to resume from) before the
        # group forms, so none can see a checkpoint that rank 0 wrote since.
        join_group(device, world_size)
        reporter.training_on(describe_device(device, world_size))
        result = train(spec, reporter)
        retry_for(settings.lease_seconds, reporter.flush, what="writing events")
        _finish(reporter, job_id, spec.output_dir, result)
        exit_code = 0
    except TrainingStopped as stop:
        exit_code = 0
        log.info("training of %s stopped on request: %s", job_id, stop)
        with contextlib.suppress(Exception):
            reporter.flush()
            reporter.stopped(stop.step, stop.checkpointed)
    except DeadlineExceeded as exc:
        log.info("training of %s ran past its max_duration", job_id)
        _fail(reporter, "max_duration_exceeded", str(exc))
    except results.JobNotOurs:
        log.info("job %s was paused, cancelled or taken over as it finished", job_id)
    except MemoryError:
        log.exception("out of memory")
        _fail(reporter, "out_of_memory", "Training ran out of memory; try a smaller batch_size.")
    except Exception as exc:
        if world_size > 1 and group_broke(exc):
            log.error("another process of the group of %s is gone: %s", job_id, exc)
            return 1  # a crash: the supervisor puts the job back in the queue
        log.exception("training of %s failed", job_id)
        if is_disk_full(exc):
            _fail(reporter, "disk_full", DISK_FULL_MESSAGE)
            return 0
        code = "out_of_memory" if "out of memory" in str(exc).lower() else "training_error"
        _fail(
            reporter,
            code,
            f"{type(exc).__name__}: {str(exc).splitlines()[0][:500] if str(exc) else ''}",
        )
    finally:
        if wandb_run is not None:
            wandb_run.finish(exit_code)
            with contextlib.suppress(Exception):
                reporter.flush()  # a warning event W&B's finish may have added
        reporter.finished()
        leave_group()
    return 0


def _run_rank(job_id: str, owner: str, rank: int, world_size: int) -> int:
    """Ranks 1 to N-1: train in step with rank 0, write nothing. Stopping or rank 0 settling
    the job ends them with 0; any error with 1, which makes the agent stop the whole group."""
    settings = get_settings()
    log_as_trainer(settings, job_id, rank)
    reporter = RankReporter()
    signal.signal(signal.SIGTERM, lambda *_: reporter.request_stop())

    from transformers.utils import logging as hf_logging

    from worker.training.devices import training_device
    from worker.training.loop import train
    from worker.training.spec import DeadlineExceeded, TrainingStopped

    hf_logging.disable_progress_bar()
    try:
        spec = retry_for(
            settings.lease_seconds, lambda: _spec(settings, job_id, owner), what="reading"
        )
        join_group(training_device(spec.resources), world_size)
        train(spec, reporter)
    except TrainingStopped as stop:  # rank 0 records where
        log.info("training of %s stopped on request: %s", job_id, stop)
        return 0
    except DeadlineExceeded:  # rank 0 fails the job
        return 0
    except Exception:
        log.exception("rank %d of %s failed", rank, job_id)
        return 1
    finally:
        reporter.finished()
        leave_group()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m worker.runner")
    parser.add_argument("job_id")
    parser.add_argument("owner")
    parser.add_argument(
        "--processes", type=int, default=1, help="start this many ranks under an elastic agent"
    )
    parser.add_argument(
        "--shutdown-timeout", type=float, default=30.0, help="seconds the ranks get to stop"
    )
    args = parser.parse_args(argv)
    if args.processes > 1:
        return run_agent(args.job_id, args.owner, args.processes, args.shutdown_timeout)
    return run_training_process(args.job_id, args.owner)


if __name__ == "__main__":
    sys.exit(main())
