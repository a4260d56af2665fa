"""What the crash tests share: a deployment whose workers the tests start, kill and restart as
real processes, a watch on the training processes of a job, a TCP link that can be cut, and a
Redis server of our own to restart."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from fastapi.testclient import TestClient
from sqlalchemy import select

from app.core.db import session_scope
from app.core.settings import Settings
from app.core.storage import Storage
from app.main import create_app
from app.models import FineTunedModel, Job, JobEvent
from app.services import jobs
from tests.stacks import FAST_TIMINGS, base_env
from tests.support import (
    ROOT,
    Response,
    free_port,
    jsonl,
    training_processes,
    tunehouse,
    wait_until,
)

# Short timings: a dead trainer is noticed in seconds, a cancel acted on within half a second.
CRASH_TIMINGS = {
    "TUNEHOUSE_HEARTBEAT_SECONDS": "1",
    "TUNEHOUSE_LEASE_SECONDS": "6",
    "TUNEHOUSE_RECONCILE_INTERVAL_SECONDS": "2",
    "TUNEHOUSE_REQUEUE_AFTER_SECONDS": "3",
    "TUNEHOUSE_CANCEL_POLL_SECONDS": "0.25",
    "TUNEHOUSE_CANCEL_GRACE_SECONDS": "4",
    "TUNEHOUSE_SHUTDOWN_GRACE_SECONDS": "20",
    "TUNEHOUSE_DEBUG_STEP_DELAY_SECONDS": "0.12",
}

# A job long enough to interrupt: 60 steps of a small MLP (with dropout, so that the RNG state
# matters on resume), a checkpoint every 5 steps.
STEPS_PER_EPOCH, EPOCHS, CHECKPOINT_EVERY = 30, 2, 5


def tabular_rows(n: int = STEPS_PER_EPOCH * 8, seed: int = 3) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        x = [round(rng.uniform(-1, 1), 4) for _ in range(6)]
        label = "up" if x[0] + 0.5 * x[1] - x[2] > 0 else "down"
        rows.append({"features": x, "label": label})
    return rows


JOB_BODY: dict[str, Any] = {
    "model": "tunehouse/mlp",
    "seed": 11,
    "method": {
        "type": "supervised",
        "supervised": {
            "hyperparameters": {
                "n_epochs": EPOCHS,
                "batch_size": 8,
                "learning_rate": 0.01,
                "checkpoint_every_steps": CHECKPOINT_EVERY,
            },
            "architecture": {"hidden_sizes": [16], "activation": "relu", "dropout": 0.2},
        },
    },
}


@dataclass
class Deployment:
    """One database and broker with its API in process (to create jobs) and workers started as
    `tunehouse worker`, the way a user starts them."""

    name: str
    root: Path
    env: dict[str, str]
    workers: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    training_file: str = ""
    validation_file: str = ""
    key: str = ""
    job_body: dict[str, Any] = field(default_factory=lambda: dict(JOB_BODY))

    @classmethod
    def create(
        cls, name: str, root: Path, timings: dict[str, str] | None = None, **env: str
    ) -> Deployment:
        """``timings`` replaces the crash tests' short timings ({} for the defaults)."""
        full = {k: v for k, v in base_env(root / "data").items() if k not in FAST_TIMINGS}
        full.update(CRASH_TIMINGS if timings is None else timings)
        full.update(env)
        deployment = cls(name, root, full)
        tunehouse("migrate", env=full)
        deployment.key = tunehouse(
            "keys", "create", "--organization", "acme", env=full
        ).stdout.strip()
        deployment.training_file = deployment.upload(jsonl(tabular_rows()), "rows.jsonl")
        deployment.validation_file = deployment.upload(
            jsonl(tabular_rows(40, seed=4)), "valid.jsonl"
        )
        return deployment

    @cached_property
    def settings(self) -> Settings:  # read on every poll; the environment never changes
        # Strings, as in the environment: Settings parses them as it parses the environment.
        values: dict[str, Any] = {
            k.removeprefix("TUNEHOUSE_").lower(): v
            for k, v in self.env.items()
            if k.startswith("TUNEHOUSE_")
        }
        return Settings(_env_file=None, **values)

    @contextlib.contextmanager
    def client(self, **overrides: Any) -> Iterator[TestClient]:
        settings = self.settings.model_copy(update=overrides)
        with TestClient(create_app(settings, "control")) as client:
            client.headers["Authorization"] = f"Bearer {self.key}"
            yield client

    def upload(self, content: bytes, name: str) -> str:
        with self.client() as client:
            response = client.post(
                "/v1/files", files={"file": (name, content)}, data={"purpose": "fine-tune"}
            )
        assert response.status_code == 200, response.text
        return str(response.json()["id"])

    def create_job(self, **changes: Any) -> str:
        with self.client() as client:
            body = {
                **self.job_body,
                "training_file": self.training_file,
                "validation_file": self.validation_file,
                **changes,
            }
            response = client.post("/v1/fine_tuning/jobs", json=body)
        assert response.status_code == 200, response.text
        return str(response.json()["id"])

    def post(self, path: str) -> Response:
        with self.client() as client:
            return client.post(path)

    # -- workers ----------------------------------------------------------------------------

    def start_worker(self, name: str, *, beat: bool = True, **env: str) -> subprocess.Popen[bytes]:
        log = (self.root / f"worker-{name}.log").open("ab")
        args = ["worker"] + ([] if beat else ["--no-beat"])
        process = subprocess.Popen(
            [sys.executable, "-m", "app.cli", *args],
            env={**self.env, **env},
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.workers[name] = process
        return process

    def kill_worker(self, name: str, sig: int = signal.SIGKILL) -> None:
        process = self.workers[name]
        os.kill(process.pid, sig)
        if sig == signal.SIGKILL:
            process.wait(timeout=10)

    def worker_holding(self, job_id: str) -> str:
        """The name of the worker whose process holds the job's lease."""
        owner = self.job(job_id).lease_owner
        assert owner, f"{job_id} is not leased"
        pid = int(owner.split(":")[2])
        for name, process in self.workers.items():
            if process.pid == pid and process.poll() is None:
                return name
        raise AssertionError(f"no worker of ours holds {job_id} ({owner})")

    def stop_workers(self) -> None:
        for process in self.workers.values():
            if process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGTERM)
        for process in self.workers.values():
            try:
                process.wait(timeout=40)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        self.workers.clear()

    def logs(self) -> str:
        return "\n".join(
            f"--- {p.name} ---\n{p.read_text(errors='replace')[-6000:]}"
            for p in sorted(self.root.glob("worker-*.log"))
        )

    def worker_log(self, name: str) -> str:
        return (self.root / f"worker-{name}.log").read_text(errors="replace")

    # -- the database's view ----------------------------------------------------------------

    def job(self, job_id: str) -> Job:
        with session_scope(self.settings.sqlalchemy_url) as session:
            job = session.get(Job, job_id)
            assert job is not None
            session.expunge(job)
            return job

    def events(self, job_id: str) -> list[str]:
        with session_scope(self.settings.sqlalchemy_url) as session:
            return list(
                session.scalars(
                    select(JobEvent.message).where(JobEvent.job_id == job_id).order_by(JobEvent.seq)
                )
            )

    def wait_status(self, job_id: str, *statuses: str, timeout: float = 120) -> Job:
        def reached() -> Job | None:
            job = self.job(job_id)
            return job if job.status in statuses else None

        try:
            return wait_until(reached, timeout, 0.1, what=f"{job_id} to be {statuses}")
        except AssertionError:
            print(self.logs())
            print("\n".join(self.events(job_id)))
            raise

    def wait_steps(self, job_id: str, steps: int, timeout: float = 90) -> None:
        def done() -> bool:
            job = self.job(job_id)
            assert job.status in ("queued", "running", "validating_files"), job.status
            return (job.steps_completed or 0) >= steps and job.status == "running"

        wait_until(done, timeout, 0.05, what=f"{job_id} to pass step {steps}")

    def cancel_active(self) -> None:
        """Leave no job behind for the next test's workers."""
        with session_scope(self.settings.sqlalchemy_url) as session:
            active = session.scalars(select(Job.id).where(Job.status.in_(jobs.ACTIVE))).all()
            for job_id in active:
                jobs.transition(session, job_id, to=jobs.CANCELLED, from_=jobs.ACTIVE)

    def checkpoints_folder(self, job_id: str) -> Path:
        return Storage(self.settings.storage_root).checkpoints_dir(job_id)

    def checkpoint_steps(self, job_id: str) -> list[int]:
        """Steps of the job's complete checkpoints on disk."""
        folder = self.checkpoints_folder(job_id)
        if not folder.is_dir():
            return []
        return sorted(
            int(p.name.removeprefix("step-"))
            for p in folder.glob("step-*")
            if (p / "COMPLETE").is_file()
        )

    def final_weights(self, job_id: str) -> dict[str, Any]:
        from safetensors.torch import load_file

        with session_scope(self.settings.sqlalchemy_url) as session:
            job = session.get(Job, job_id)
            assert job is not None and job.fine_tuned_model is not None
            model = session.get(FineTunedModel, job.fine_tuned_model)
            assert model is not None
        model_dir = Storage(self.settings.storage_root).resolve(model.storage_path)
        return load_file(model_dir / "model.safetensors")


def same_weights(a: dict[str, Any], b: dict[str, Any]) -> bool:
    import torch

    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


class TrainerWatch:
    """Samples the job's live training processes every 20 ms; ``most`` is the largest number
    seen at once (two would be twins)."""

    def __init__(self, job_id: str):
        self.job_id, self.most, self.seen = job_id, 0, set[int]()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            pids = training_processes(self.job_id)
            self.most = max(self.most, len(pids))
            self.seen.update(pids)

    def __enter__(self) -> TrainerWatch:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()


def gone(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return True
    return "\nState:\tZ" in status


class Link:
    """A TCP relay to a server that the test can cut (every connection dropped, new ones
    refused) and restore: a network outage, seen from the client."""

    def __init__(self, target_port: int):
        self.target_port, self.port = target_port, free_port()
        self._loop = asyncio.new_event_loop()
        self._server: asyncio.base_events.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self.restore()

    def _call(self, coroutine: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(10)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.close()
            return
        self._writers.update((writer, up_writer))

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(Exception):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    async def _start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)

    async def _cut(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        for writer in list(self._writers):
            with contextlib.suppress(Exception):
                writer.transport.abort()
        self._writers.clear()

    def cut(self) -> None:
        self._call(self._cut())

    def restore(self) -> None:
        self._call(self._start())

    def close(self) -> None:
        self.cut()
        self._loop.call_soon_threadsafe(self._loop.stop)


class RedisServer:
    """A Redis of our own (no persistence), to kill and start again on the same port."""

    def __init__(self, root: Path):
        binary = shutil.which("redis-server")
        assert binary, "redis-server is not installed"
        self.binary, self.root, self.port = binary, root, free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.process = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.root)],
            stdout=subprocess.DEVNULL,
        )  # fmt: skip

        def answering() -> bool:
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as sock,
            ):
                sock.sendall(b"PING\r\n")
                return sock.recv(16).startswith(b"+PONG")
            return False

        wait_until(answering, 10, 0.05, what="redis-server")

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def __enter__(self) -> RedisServer:
        self.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.kill()
