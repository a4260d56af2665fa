"""Jobs past one process (issue 11): `resources.processes` = 2 trains one job as a
torch.distributed group (gloo on CPU) under torchrun's elastic agent, started by a
`tunehouse worker` as a user starts it. Rank 0 reports; a rank that dies is a crash of the
whole group, which restarts from its last checkpoint; cancel reaches every rank; killing the
worker takes the whole group with it.

The job is the crash tests' small MLP (60 steps, a checkpoint every 5), slowed down per step
where a test must act mid-training."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.crash_support import (
    CHECKPOINT_EVERY,
    EPOCHS,
    STEPS_PER_EPOCH,
    Deployment,
    gone,
    same_weights,
)
from tests.support import wait_until

pytestmark = pytest.mark.slow

TOTAL_STEPS = STEPS_PER_EPOCH * EPOCHS
TWO_PROCESSES = {"resources": {"processes": 2}}
DEVICE = "2 × cpu (gloo)"


def group_processes(job_id: str) -> dict[str, int]:
    """The job's live training processes by role: "agent" (the elastic agent, started with
    ``--processes``) and "rank 0", "rank 1"... (its ranks, by their RANK)."""
    found: dict[str, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"worker.runner" not in cmdline or job_id.encode() not in cmdline:
            continue
        if gone(int(entry.name)):
            continue
        if b"--processes" in cmdline:
            found["agent"] = int(entry.name)
            continue
        rank = next((v for v in environ if v.startswith(b"RANK=")), b"RANK=?")
        found[f"rank {rank.decode().removeprefix('RANK=')}"] = int(entry.name)
    return found


def whole_group(job_id: str) -> dict[str, int] | None:
    processes = group_processes(job_id)
    return processes if set(processes) == {"agent", "rank 0", "rank 1"} else None


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Deployment:
    return Deployment.create("distributed", tmp_path_factory.mktemp("distributed"))


@pytest.fixture
def cluster(deployment: Deployment) -> Iterator[Deployment]:
    try:
        yield deployment
    except BaseException:
        print(deployment.logs())
        raise
    finally:
        deployment.stop_workers()
        deployment.cancel_active()


@pytest.fixture(scope="module")
def reference(deployment: Deployment) -> dict[str, Any]:
    """A two-process job run once without interruption, at full speed: it succeeds, says what
    it trained on, and its weights are what an interrupted run must end with."""
    deployment.start_worker("reference", TUNEHOUSE_DEBUG_STEP_DELAY_SECONDS="0")
    try:
        job_id = deployment.create_job(**TWO_PROCESSES)
        job = deployment.wait_status(job_id, "succeeded", timeout=240)
        events = deployment.events(job_id)
    finally:
        deployment.stop_workers()
    assert (job.attempt, job.steps_completed, job.device) == (1, TOTAL_STEPS, DEVICE)
    assert f"Training on {DEVICE}" in events
    assert events.count("The job has successfully completed") == 1
    return {"id": job_id, "weights": deployment.final_weights(job_id)}


def test_a_two_process_job_succeeds_and_says_what_it_trained_on(
    cluster: Deployment, reference: dict[str, Any]
) -> None:
    with cluster.client() as client:
        job = client.get(f"/v1/fine_tuning/jobs/{reference['id']}").json()
        events = client.get(f"/v1/fine_tuning/jobs/{job['id']}/events?limit=100").json()
    assert job["status"] == "succeeded"
    assert job["resources"] == {"device": "cpu", "processes": 2}
    assert job["device"] == DEVICE
    metrics = [e["data"] for e in events["data"] if e["type"] == "metrics"]
    assert metrics, events
    # Rank 0 alone reports: one metrics event per step it reports, none twice.
    steps = [m["step"] for m in metrics]
    assert len(steps) == len(set(steps)), steps
    final = max(metrics, key=lambda m: m["step"])
    assert final["step"] == TOTAL_STEPS and final["valid_accuracy"] >= 0.85, final


def test_a_killed_rank_restarts_the_group_from_its_checkpoint(
    cluster: Deployment, reference: dict[str, Any]
) -> None:
    # Rank 0, the one that reports and writes checkpoints: the agent treats every rank alike.
    victim = "rank 0"
    cluster.start_worker("a")
    job_id = cluster.create_job(**TWO_PROCESSES)
    cluster.wait_steps(job_id, CHECKPOINT_EVERY + 3, timeout=180)
    group = wait_until(lambda: whole_group(job_id), 10, what="the agent and both ranks")
    os.kill(group[victim], signal.SIGKILL)
    # The agent stops the other rank and exits; nothing of the first group is left.
    wait_until(lambda: all(gone(pid) for pid in group.values()), 30, what="the first group to end")
    saved = cluster.checkpoint_steps(job_id)
    assert saved and saved[-1] >= CHECKPOINT_EVERY

    job = cluster.wait_status(job_id, "succeeded", timeout=240)
    events = cluster.events(job_id)
    assert (job.attempt, job.crash_count) == (2, 1)
    assert any("stopped unexpectedly" in m and "crash 1 of" in m for m in events), events
    assert any(m.startswith("Restarted from checkpoint at step ") for m in events), events
    assert events.count(f"Training on {DEVICE}") == 2
    assert events.count("The job has successfully completed") == 1
    assert job.steps_completed == TOTAL_STEPS
    assert same_weights(cluster.final_weights(job_id), reference["weights"])


def test_cancel_reaches_every_rank_during_a_checkpoint_write(cluster: Deployment) -> None:
    # The pause test below stops the group mid-step; this one stops it inside a checkpoint.
    # With slow writes, each checkpoint takes 2 s between its files and its rename.
    cluster.start_worker("a", TUNEHOUSE_DEBUG_CHECKPOINT_DELAY_SECONDS="2")
    job_id = cluster.create_job(**TWO_PROCESSES)
    folder = cluster.checkpoints_folder(job_id)
    wait_until(
        lambda: (folder / f".tmp-step-{2 * CHECKPOINT_EVERY}").is_dir(),
        180,
        0.05,
        what="the second checkpoint's write",
    )
    group = wait_until(lambda: whole_group(job_id), 10, what="the agent and both ranks")
    response = cluster.post(f"/v1/fine_tuning/jobs/{job_id}/cancel")
    assert response.status_code == 200, response.text
    # Within the cancel's grace (4 s here) every process of the group has stopped.
    wait_until(lambda: all(gone(pid) for pid in group.values()), 8, what="the group to stop")
    assert group_processes(job_id) == {}
    job = cluster.wait_status(job_id, "cancelled")
    assert job.fine_tuned_model is None
    log = cluster.worker_log("a")
    # Each rank got the SIGTERM (forwarded by the agent) and stopped cleanly at the same step.
    assert f"rank 1 of {job_id} failed" not in log, log[-3000:]
    stops = [line for line in log.splitlines() if f"training of {job_id} stopped" in line]
    assert any("rank=0]" in line for line in stops), log[-3000:]
    assert any("rank=1]" in line for line in stops), log[-3000:]
    assert len({line.rsplit("at step ", 1)[-1].split()[0] for line in stops}) == 1, stops


def test_pause_reaches_every_rank_and_resume_goes_on_exactly(
    cluster: Deployment, reference: dict[str, Any]
) -> None:
    cluster.start_worker("a")
    job_id = cluster.create_job(**TWO_PROCESSES)
    cluster.wait_steps(job_id, CHECKPOINT_EVERY + 2, timeout=180)
    group = wait_until(lambda: whole_group(job_id), 10, what="the agent and both ranks")
    assert cluster.post(f"/v1/fine_tuning/jobs/{job_id}/pause").status_code == 200
    wait_until(lambda: all(gone(pid) for pid in group.values()), 25, what="the group to stop")
    # The supervisor releases the lease once the agent has exited: a moment after the ranks.
    paused = wait_until(
        lambda: (job := cluster.job(job_id)).lease_owner is None and job,
        15,
        what="the supervisor to release the lease",
    )
    assert paused.status == "paused"
    # Rank 0 saved the step where the group stopped, and said so; both ranks stopped there.
    said = [m for m in cluster.events(job_id) if m.startswith("Fine-tuning job paused; ")]
    assert len(said) == 1 and "checkpoint saved at step " in said[0], said
    step = int(said[0].rsplit(" ", 1)[-1])
    assert step in cluster.checkpoint_steps(job_id)
    log = cluster.worker_log("a")
    assert f"rank 1 of {job_id} failed" not in log, log[-3000:]
    stops = [line for line in log.splitlines() if f"training of {job_id} stopped" in line]
    assert {line.split("] ")[0].rsplit("rank=", 1)[-1] for line in stops} == {"0", "1"}, stops
    assert {line.rsplit("at step ", 1)[-1].split()[0] for line in stops} == {str(step)}

    assert cluster.post(f"/v1/fine_tuning/jobs/{job_id}/resume").status_code == 200
    job = cluster.wait_status(job_id, "succeeded", timeout=240)
    events = cluster.events(job_id)
    assert f"Restarted from checkpoint at step {step}" in events
    assert (job.attempt, job.crash_count) == (2, 0)
    assert same_weights(cluster.final_weights(job_id), reference["weights"])


def test_killing_the_worker_kills_the_whole_group(
    cluster: Deployment, reference: dict[str, Any]
) -> None:
    cluster.start_worker("a")
    job_id = cluster.create_job(**TWO_PROCESSES)
    cluster.wait_steps(job_id, CHECKPOINT_EVERY + 3, timeout=180)
    group = wait_until(lambda: whole_group(job_id), 10, what="the agent and both ranks")
    cluster.kill_worker("a")  # kill -9: no chance to stop anything itself
    wait_until(lambda: all(gone(pid) for pid in group.values()), 5, what="the group to die with it")
    cluster.start_worker("b")
    job = cluster.wait_status(job_id, "succeeded", timeout=240)
    assert (job.attempt, job.crash_count) == (2, 1)
    assert same_weights(cluster.final_weights(job_id), reference["weights"])
