"""Disk used by one job that checkpoints every step: the peak under storage/jobs while it
trains (sampled), and what storage/jobs and storage/models hold once it has ended.

    python bench/checkpoint_disk.py --model tabular   # tunehouse/mlp, 14 steps
    python bench/checkpoint_disk.py --model minilm    # the packaged MiniLM classifier, 8 steps

Runs one job through the worker's supervisor (a real training process) on SQLite in a
temporary data directory, removed at the end; TUNEHOUSE_KEEP_CHECKPOINTS is read from the
environment as usual.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import sys
import tempfile
import threading
import time
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from app.core.db import session_scope  # noqa: E402
from app.core.migrate import upgrade  # noqa: E402
from app.core.settings import Settings  # noqa: E402
from app.core.storage import Storage  # noqa: E402
from app.models import Job  # noqa: E402
from app.schemas import HyperparametersRequest, JobCreate  # noqa: E402
from app.services import job_files, jobs, keys  # noqa: E402
from tests.crash_support import tabular_rows  # noqa: E402
from tests.support import BASE_MODEL, add_training_file, jsonl, sentiment_rows  # noqa: E402
from worker.supervisor import supervise_job  # noqa: E402

JOBS = {
    # 216 training rows in batches of 32: 7 steps per epoch.
    "tabular": ("tunehouse/mlp", lambda: tabular_rows(240), {"n_epochs": 2, "batch_size": 32}),
    # 58 training rows in batches of 16: 4 steps per epoch.
    "minilm": (BASE_MODEL, lambda: sentiment_rows(64, seed=1), {"n_epochs": 2, "batch_size": 16}),
}


def tree_bytes(path: Path) -> int:
    total = 0
    for dirpath, _, names in os.walk(path):
        for name in names:
            with contextlib.suppress(FileNotFoundError):  # removed while we looked
                total += (Path(dirpath) / name).stat().st_size
    return total


def queue_job(
    settings: Settings, model: str, rows: list[dict[str, object]], hp: dict[str, int]
) -> str:
    storage = Storage(settings.storage_root)
    with session_scope(settings.sqlalchemy_url) as session:
        org = keys.get_or_create_organization(session, "bench")
        file_id = add_training_file(session, storage, org.id, jsonl(rows))
        hyperparameters = HyperparametersRequest(**hp, checkpoint_every_steps=1)
        body = JobCreate(model=model, training_file=file_id, hyperparameters=hyperparameters)
        job_id = jobs.create_job(session, settings, org, body)[0].id
    sessions = partial(session_scope, settings.sqlalchemy_url)
    assert job_files.validate_job_files(settings, job_id, sessions=sessions)
    return job_id


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(JOBS), default="tabular")
    args = parser.parse_args()
    data_dir = Path(tempfile.mkdtemp(prefix="tunehouse-disk-"))
    os.environ["TUNEHOUSE_DATA_DIR"] = str(data_dir)  # the training process reads it too
    settings = Settings(_env_file=None)
    upgrade(settings.sqlalchemy_url)
    model, rows, hp = JOBS[args.model]
    job_id = queue_job(settings, model, rows(), hp)
    jobs_dir = settings.storage_root / "jobs"
    peak, done = 0, threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.wait(0.1):
            peak = max(peak, tree_bytes(jobs_dir))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    started = time.monotonic()
    supervise_job(settings, job_id)
    done.set()
    sampler.join()
    with session_scope(settings.sqlalchemy_url) as session:
        job = session.get(Job, job_id)
        assert job is not None
        status, steps = job.status, job.steps_completed
    checkpoints = jobs_dir / job_id / "checkpoints"
    kept = [p.name for p in checkpoints.iterdir()] if checkpoints.is_dir() else []
    kept.sort(key=lambda name: int(name.rsplit("-", 1)[1]))
    models_dir = settings.storage_root / "models"
    print(f"{args.model}: job {status} after {steps} steps in {time.monotonic() - started:.0f} s")
    print(f"  peak under storage/jobs while training: {peak:>13,} bytes")
    left = tree_bytes(jobs_dir)
    print(f"  storage/jobs once ended:                {left:>13,} bytes")
    print(f"  storage/models once ended:              {tree_bytes(models_dir):>13,} bytes")
    print(f"  storage/jobs once ended vs its peak:    {left / max(peak, 1):>13.2f}x")
    print(f"  checkpoints left: {', '.join(kept) or 'none'}")
    shutil.rmtree(data_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
