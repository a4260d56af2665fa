"""What the soak's clients share: the models to call, the files uploaded, and each job with the
state it must end in, which follows from what the clients did to it."""

from __future__ import annotations

import hashlib
import random
import threading
from dataclasses import dataclass, field
from typing import Any

from tests.soak.zoo import Zoo

# What a client does to a job it created; the job's expected end state follows from it.
UNTOUCHED, CANCEL, PAUSE_RESUME = "untouched", "cancel", "pause-resume"
# Taken in turn, so that even a short soak's few jobs meet every fate.
FATES = (PAUSE_RESUME, UNTOUCHED, CANCEL)
TERMINAL = ("succeeded", "failed", "cancelled")


@dataclass
class JobPlan:
    id: str
    owner: str  # the client that created it, and carries out its fate
    fate: str
    due: float  # soak time of the next action on it
    expected: str = "succeeded"
    status: str = "validating_files"  # as last seen
    paused: bool = False  # a pause was accepted and its resume is still to come
    history: list[str] = field(default_factory=list)
    fine_tuned_model: str | None = None
    error: str | None = None  # the job's error, when it failed

    @property
    def ended(self) -> bool:
        return self.status in TERMINAL

    def note(self, at: float, text: str) -> None:
        self.history.append(f"{at:+.1f}s {text}")


@dataclass
class World:
    zoo: Zoo
    max_active_jobs: int
    jobs_until: float = float("inf")  # soak time after which no job is created
    lock: threading.Lock = field(default_factory=threading.Lock)
    load_over: threading.Event = field(default_factory=threading.Event)
    drained: threading.Event = field(default_factory=threading.Event)
    jobs: dict[str, JobPlan] = field(default_factory=dict)
    job_files: list[str] = field(default_factory=list)  # tabular training files; never deleted
    deletable_files: list[str] = field(default_factory=list)
    contents: dict[str, str] = field(default_factory=dict)  # file id -> sha256 of its bytes
    # Models the soak's own jobs made (tabular), and whether a client has deleted each.
    job_models: dict[str, bool] = field(default_factory=dict)

    def next_fate(self) -> str:
        with self.lock:
            return FATES[sum(plan.owner != "main" for plan in self.jobs.values()) % len(FATES)]

    def active_jobs(self) -> list[JobPlan]:
        with self.lock:
            return [plan for plan in self.jobs.values() if not plan.ended]

    def live_job_models(self) -> list[str]:
        with self.lock:
            return [model for model, deleted in self.job_models.items() if not deleted]

    def remember_upload(self, file_id: str, content: bytes, *, for_jobs: bool) -> None:
        with self.lock:
            self.contents[file_id] = hashlib.sha256(content).hexdigest()
            (self.job_files if for_jobs else self.deletable_files).append(file_id)

    def take_deletable_file(self, rng: random.Random) -> str | None:
        with self.lock:
            if len(self.deletable_files) < 3:  # keep a few for the readers
                return None
            return self.deletable_files.pop(rng.randrange(len(self.deletable_files)))

    def seen_status(self, plan: JobPlan, job: dict[str, Any], at: float) -> None:
        """What a retrieve of the job showed."""
        status, model = job["status"], job.get("fine_tuned_model")
        with self.lock:
            if status != plan.status:
                plan.note(at, f"seen {status}")
            plan.status = status
            plan.error = job["error"]["message"] if job.get("error") else None
            if status == "succeeded" and model and plan.fine_tuned_model is None:
                plan.fine_tuned_model = model
                self.job_models.setdefault(model, False)
