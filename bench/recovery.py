"""What a crash costs at the default settings: steps lost, and time from the kill to the job
running (and training) again.

    .venv/bin/python bench/recovery.py [--rows 2000] [--kill-after 55]

Fine-tunes MiniLM on the first N rows of ../shared/data/sst2/train.tsv (2 epochs) on the
embedded defaults (`tunehouse worker`, SQLite, the filesystem broker, every timing at its
default), and interrupts one job per scenario `--kill-after` seconds into its training:

- `kill -9` of the training process (out of memory, a crash);
- `kill -9` of the worker, restarted at once (a restart policy, or the operator);
- `kill -9` of the worker, with a second worker already running on the machine;
- SIGTERM to the worker (a deploy, `docker stop`), with a second worker running.

For each it prints the steps trained at the kill, the step the job went on from (its newest
complete checkpoint), the steps lost, the seconds from the kill to `running` again and to its
next trained step. The baseline is a trainer without checkpoints and resume: a crash loses
every step trained so far (ratio: steps lost / steps trained).
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sqlalchemy import select  # noqa: E402

from app.core.db import session_scope  # noqa: E402
from app.models import JobEvent  # noqa: E402
from tests.crash_support import Deployment  # noqa: E402
from tests.support import (  # noqa: E402
    BASE_MODEL,
    SHARED_DATA,
    jsonl,
    read_sst2,
    training_processes,
    wait_until,  # noqa: E402
)

SCENARIOS = (
    "kill -9 trainer",
    "kill -9 worker, restarted",
    "kill -9 worker, 2nd worker",
    "SIGTERM worker",
)


def run_scenario(deployment: Deployment, scenario: str, kill_after: float) -> dict[str, float]:
    deployment.start_worker("a")
    if scenario in ("kill -9 worker, 2nd worker", "SIGTERM worker"):
        deployment.start_worker("b", beat=False)
    job_id = deployment.create_job()
    wait_until(lambda: deployment.job(job_id).status == "running", 120, 0.1, what="running")
    wait_until(lambda: (deployment.job(job_id).steps_completed or 0) > 0, 120, 0.1, what="step 1")
    time.sleep(kill_after)
    holder = deployment.worker_holding(job_id)
    killed_at = time.monotonic()
    if scenario == "kill -9 trainer":
        os.kill(training_processes(job_id)[0], signal.SIGKILL)
    elif scenario == "SIGTERM worker":
        deployment.kill_worker(holder, signal.SIGTERM)
    else:
        deployment.kill_worker(holder)
    # The steps done: the newest figure the trainer wrote (it writes one a second).
    trained = deployment.job(job_id).steps_completed or 0
    if scenario == "kill -9 worker, restarted":
        deployment.start_worker(holder, beat=holder == "a")

    def attempt(n: int) -> bool:
        job = deployment.job(job_id)
        return job.attempt >= n and job.status == "running"

    wait_until(lambda: attempt(2), 600, 0.05, what="the job running again")
    running_again = time.monotonic() - killed_at

    def second_start() -> JobEvent | None:
        # Each start says what it trains on; the second one says so once its model is loaded.
        with session_scope(deployment.settings.sqlalchemy_url) as session:
            starts = session.scalars(
                select(JobEvent)
                .where(JobEvent.job_id == job_id, JobEvent.message.like("training % rows, %"))
                .order_by(JobEvent.seq)
            ).all()
            return starts[1] if len(starts) > 1 else None

    started = wait_until(second_start, 600, 0.05, what="the second start's model loaded")
    events = deployment.events(job_id)
    restarted = [m for m in events if m.startswith("Restarted from checkpoint at step ")]
    resumed_step = int(restarted[-1].rsplit(" ", 1)[1]) if restarted else 0
    stopped = [m for m in events if re.search(r"shutdown; (checkpoint saved )?at step \d+$", m)]
    if stopped:  # a graceful stop: the trainer said where it stopped
        trained = int(stopped[-1].rsplit(" ", 1)[1])

    def stepped() -> bool:  # a step trained by the second start
        job = deployment.job(job_id)
        return job.updated_at > started.created_at and (job.steps_completed or 0) > resumed_step

    wait_until(stepped, 600, 0.05, what="a new step")
    training_again = time.monotonic() - killed_at
    deployment.wait_status(job_id, "succeeded", timeout=900)
    deployment.stop_workers()
    return {
        "trained": trained,
        "resumed": resumed_step,
        "lost": max(trained - resumed_step, 0),
        "running_again_s": running_again,
        "training_again_s": training_again,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=2000)
    parser.add_argument("--kill-after", type=float, default=55.0)
    parser.add_argument("--scenario", choices=SCENARIOS, action="append")
    args = parser.parse_args()

    rows = read_sst2(SHARED_DATA / "sst2" / "train.tsv")[: args.rows]
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        deployment = Deployment.create("bench", Path(tmp), timings={})
        deployment.training_file = deployment.upload(jsonl(rows), "sst2.jsonl")
        deployment.validation_file = deployment.upload(
            jsonl(read_sst2(SHARED_DATA / "sst2" / "dev.tsv")[:200]), "dev.jsonl"
        )
        deployment.job_body = {
            "model": BASE_MODEL,
            "seed": 0,
            "hyperparameters": {"n_epochs": 2, "batch_size": 16},
        }
        for scenario in args.scenario or SCENARIOS:
            try:
                results[scenario] = run_scenario(deployment, scenario, args.kill_after)
            except BaseException:
                print(deployment.logs())
                raise
            finally:
                deployment.stop_workers()
            print(scenario, results[scenario], flush=True)

    steps_per_epoch = -(-args.rows // 16)
    print(
        f"\nMiniLM on {args.rows} SST-2 rows, batch 16: {steps_per_epoch} steps an epoch, 2 epochs;"
        f" interrupted {args.kill_after:g} s into training; default settings"
    )
    print(
        f"{'scenario':<28} {'steps trained':>13} {'went on from':>12} {'lost':>5} "
        f"{'baseline lost':>13} {'ratio':>6} {'to running':>10} {'to training':>11}"
    )
    for scenario, r in results.items():
        ratio = r["lost"] / r["trained"] if r["trained"] else 0.0
        print(
            f"{scenario:<28} {r['trained']:>13} {r['resumed']:>12} {r['lost']:>5} "
            f"{r['trained']:>13} {ratio:>6.2f} {r['running_again_s']:>9.1f}s "
            f"{r['training_again_s']:>10.1f}s"
        )


if __name__ == "__main__":
    main()
