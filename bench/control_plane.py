"""Control-plane scale: job create, retrieve and list, and a reconcile pass, while 200
simulated workers train 10,000 queued jobs on PostgreSQL + Redis.

    .venv/bin/python bench/control_plane.py [--jobs 10000] [--workers 200] [--duration 150]
    .venv/bin/python bench/control_plane.py --jobs 2000 --workers 40 --duration 30  # quicker

Each phase gets a fresh PostgreSQL database (dropped afterwards), migrated with Alembic:

- setup (not measured): organizations with an API key each, one real training file each, and
  the queued jobs bulk-inserted with their first events, then ANALYZE. One organization ("big")
  holds half of the jobs, the others share the rest; the jobs were created over the last hour
  and have waited since, so the reconciler finds them idle;
- a real API process (`python -m app.cli api`, as tests/stacks.py starts it);
- simulated workers: threads in a few processes (`--threads-per-process`, 50 by default;
  reniced, so that on one machine they take less of the CPU the measured processes need; the
  API and the reconciler each have a process of their own, so the workers' GIL is not theirs).
  Each worker takes a wake-up from a Redis list (the stand-in for the Celery queue: the
  reconciler's re-sent wake-ups go to the real Celery queue in Redis and are not consumed) and
  runs the job through the same code as `worker/supervisor.py` and `worker/runner.py`: reads
  the job, `leases.claim_job`, reads the spec (job and training file), then, with a no-op
  trainer for `--job-seconds` (+-30%), `leases.record_progress` after each step
  (`--step-seconds`: the runner writes at most one a second), a metrics event every 5 steps,
  the supervisor's `leases.lease_state` every `--poll-seconds` (cancel_poll_seconds) and
  `leases.renew_lease` every `--heartbeat` seconds; it finishes through the real success path,
  `results.register_fine_tuned_model` (it writes a result CSV of a few hundred bytes, and the
  trainer a one-file model directory: not what dominates), then the supervisor's settle
  (`lease_state`, `release_lease`);
- a reconciler process calling `worker.reconciler.reconcile_once` every `--reconcile-every`
  seconds (the beat's default is 30), each pass timed;
- `--clients` HTTP clients (threads of this process, sharing `--rate` requests a second):
  create (in an organization of its own, each created job cancelled at once, untimed, so the
  others keep their size), retrieve, list (limit=20) and list with `after` (a random job of the
  organization as the cursor), for a typical organization and for the big one.

The baseline is the same phase with 10 jobs and 1 worker, measured in the same run; the table
gives p50 and p99 of each, and the ratios, then the CPU the API, the reconciler and the
workers used (on a shared machine the latencies are mostly the wait for a CPU).
`--explain` prints PostgreSQL's plans (EXPLAIN ANALYZE) of the control plane's queries on the
large database; their execution times are always printed.
"""

from __future__ import annotations

import argparse
import logging
import math
import multiprocessing as mp
import os
import random
import resource
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402
import redis  # noqa: E402
from sqlalchemy import event, insert, text  # noqa: E402

from app.core.db import PoolLimits, get_engine, session_scope, use_pool_limits  # noqa: E402
from app.core.ids import new_id  # noqa: E402
from app.core.kinds import KIND_CLASSIFICATION  # noqa: E402
from app.core.migrate import upgrade  # noqa: E402
from app.core.process import local_owner_prefix  # noqa: E402
from app.core.settings import Settings  # noqa: E402
from app.core.storage import Storage  # noqa: E402
from app.models import File, Job, JobEvent, utcnow  # noqa: E402
from app.schemas import HyperparametersRequest, SupervisedMethod  # noqa: E402
from app.services import files, jobs, keys, leases, results  # noqa: E402
from app.services.hyperparameters import resolve_hyperparameters  # noqa: E402
from tests.support import (  # noqa: E402
    BASE_MODEL,
    Stack,
    add_training_file,
    fresh_postgres_database,
    jsonl,
    sentiment_rows,
)

PG_ADMIN_URL = os.environ.get("TUNEHOUSE_BENCH_PG", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS_URL = os.environ.get("TUNEHOUSE_BENCH_REDIS", "redis://127.0.0.1:6379/12")
LIMIT = 20  # the list page size measured (the SDK's default)
GOALS = {"retrieve": 0.050, "list": 0.050, "reconcile pass": 1.0}  # p99 the issue asks for


# ---- the phase's world: database, storage, organizations, seeded jobs --------------------------


@dataclass
class Org:
    name: str
    key: str
    file_id: str
    job_ids: list[str] = field(default_factory=list)


@dataclass
class World:
    url: str
    redis_url: str
    data_dir: Path
    orgs: list[Org]  # orgs[0] is the big one, orgs[-1] only receives creates
    wakeups_key: str

    @property
    def storage(self) -> Storage:
        return Storage(self.data_dir / "storage")

    def settings(self, **extra: Any) -> Settings:
        return Settings(
            database_url=self.url,
            broker_url=self.redis_url,
            data_dir=self.data_dir,
            _env_file=None,
            **extra,
        )


def _job_sizes(jobs_total: int, orgs: int) -> list[int]:
    """Half of the jobs in the big organization, the rest shared by the others."""
    big = (jobs_total + 1) // 2
    rest = jobs_total - big
    others = max(orgs - 1, 1)
    return [big] + [rest // others + (1 if i < rest % others else 0) for i in range(others)]


def seed(url: str, data_dir: Path, jobs_total: int, orgs_total: int) -> tuple[list[Org], list[str]]:
    """Organizations, keys, files and ``jobs_total`` queued jobs (bulk inserts: setup, not
    measured). Returns the organizations (the big one first, the create-only one last) and the
    job ids, oldest first: the wake-ups a queue would hold."""
    storage = Storage(data_dir / "storage")
    rng = random.Random(0)
    now = utcnow()
    hyperparameters = resolve_hyperparameters("classification", 40, HyperparametersRequest())
    method = jobs.normalised_method(BASE_MODEL, SupervisedMethod(), hyperparameters)
    sizes = _job_sizes(jobs_total, orgs_total) + [0]  # the last one only receives creates
    with session_scope(url) as session:
        orgs, org_ids = [], []
        for index in range(len(sizes)):
            name = (
                "big" if index == 0 else ("creates" if index == len(sizes) - 1 else f"org{index}")
            )
            made = keys.create_key(session, name)
            content = jsonl([dict(row) for row in sentiment_rows(40, index)])
            file_id = add_training_file(session, storage, made.organization.id, content)
            orgs.append(Org(name, made.key, file_id))
            org_ids.append(made.organization.id)
        owners = [index for index, size in enumerate(sizes) for _ in range(size)]
        rng.shuffle(owners)
        job_rows: list[dict[str, Any]] = []
        for n, index in enumerate(owners):
            # Over the last hour, ten at a time at the same instant (a batch submitted
            # together), so the list's id tiebreak matters; idle since they were queued.
            created = now - timedelta(seconds=3600 * (1 - n // 10 * 10 / jobs_total))
            job_id = new_id("ftjob")
            orgs[index].job_ids.append(job_id)
            job_rows.append(
                dict(
                    id=job_id,
                    organization_id=org_ids[index],
                    model=BASE_MODEL,
                    task="classification",
                    training_file=orgs[index].file_id,
                    status=jobs.QUEUED,
                    hyperparameters=hyperparameters,
                    method=method,
                    seed=rng.randrange(2**31),
                    integrations=[],
                    result_files=[],
                    steps_completed=0,
                    attempt=0,
                    crash_count=0,
                    created_at=created,
                    updated_at=created + timedelta(seconds=1),
                )
            )
        for start in range(0, len(job_rows), 2000):
            session.execute(insert(Job), job_rows[start : start + 2000])
        messages = ("Created fine-tuning job: {}", "Validating training file: {}",
                    "Files validated, moving job to queued state")  # fmt: skip
        event_rows = [
            dict(
                id=new_id("ftevent"),
                job_id=row["id"],
                created_at=row["created_at"],
                level="info",
                type="message",
                message=text.format(row["id"] if n == 0 else row["training_file"]),
            )
            for row in job_rows
            for n, text in enumerate(messages)
        ]
        for start in range(0, len(event_rows), 5000):
            session.execute(insert(JobEvent), event_rows[start : start + 5000])
    # A table that has held its jobs for an hour has its statistics (autovacuum's ANALYZE).
    with get_engine(url).connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
        connection.exec_driver_sql("ANALYZE")
    return orgs, [row["id"] for row in job_rows]


# ---- the simulated workers -------------------------------------------------------------------


@dataclass(frozen=True)
class WorkerPlan:
    url: str
    redis_url: str
    wakeups_key: str
    storage_root: str
    threads: int
    job_seconds: float  # the no-op trainer's run, +-30%
    step_seconds: float  # a training step: progress is written after each (runner: <= 1/s)
    poll_seconds: float  # the supervisor's look at the job (cancel_poll_seconds)
    heartbeat_seconds: float  # the trainer's lease renewal (heartbeat_seconds)
    lease_seconds: int
    stop_at: float  # time.time()


@dataclass
class NoOpResult:
    """What the no-op trainer hands to registration (results.TrainedModel)."""

    steps: int
    trained_tokens: int
    metrics_history: list[dict[str, float | int]]
    model_kind: str = KIND_CLASSIFICATION
    labels: list[str] = field(default_factory=lambda: ["negative", "positive"])
    adapter: bool = False


COUNTS = ("finished", "claims_lost", "stopped", "heartbeats", "errors")


class Tally:
    """What a process's simulated workers did."""

    def __init__(self) -> None:
        self.counts = dict.fromkeys(COUNTS, 0)
        self._lock = threading.Lock()

    def add(self, name: str) -> None:
        with self._lock:
            self.counts[name] += 1


class Stopped(Exception):
    """The job is no longer ours to train (or the phase is over)."""


class NoOpTrainer:
    """A training process that trains nothing, with its supervisor's watch: the same writes
    and reads as worker/runner.py and worker/supervisor.py, on their timings."""

    def __init__(self, plan: WorkerPlan, job_id: str, owner: str, tally: Tally, seconds: float):
        self.plan, self.job_id, self.owner, self.tally = plan, job_id, owner, tally
        self.steps = max(1, round(seconds / plan.step_seconds))
        self.started = time.monotonic()
        self.end = self.started + seconds

    def run(self) -> int:
        """Train to the end (the steps trained), or raise Stopped."""
        plan = self.plan
        step, next_beat, next_poll = 0, plan.heartbeat_seconds, plan.poll_seconds
        while step < self.steps:
            next_step = (step + 1) * plan.step_seconds
            due = min(next_step, next_beat, next_poll)
            time.sleep(max(0.0, self.started + due - time.monotonic()))
            if time.time() > plan.stop_at:
                raise Stopped
            if due == next_beat:
                self.heartbeat()
                next_beat += plan.heartbeat_seconds
            elif due == next_poll:
                self.watch()
                next_poll += plan.poll_seconds
            else:
                step += 1
                self.progress(step)
        return self.steps

    def heartbeat(self) -> None:
        with session_scope(self.plan.url) as session:
            status = leases.renew_lease(session, self.job_id, self.owner, self.plan.lease_seconds)
        self.tally.add("heartbeats")
        if status != jobs.RUNNING:
            raise Stopped

    def watch(self) -> None:
        with session_scope(self.plan.url) as session:
            state = leases.lease_state(session, self.job_id)
        if state is None or state.owner != self.owner or state.status != jobs.RUNNING:
            raise Stopped

    def progress(self, step: int) -> None:
        remaining = (time.monotonic() - self.started) / step * (self.steps - step)
        with session_scope(self.plan.url) as session:
            finish = utcnow() + timedelta(seconds=remaining)
            leases.record_progress(session, self.job_id, self.owner, steps_completed=step,
                                   total_steps=self.steps, estimated_finish=finish)  # fmt: skip
        if step % 5 == 0:  # a metrics event now and then, as an evaluation writes one
            with session_scope(self.plan.url) as session:
                loss = {"step": step, "train_loss": 1 / step}
                jobs.add_event(session, self.job_id, f"Step {step}", type="metrics", data=loss)

    def finish(self) -> None:
        """A tiny model directory, then the real success path (model, result file, event)."""
        storage = Storage(Path(self.plan.storage_root))
        model_dir = storage.model_dir(self.job_id)
        model_dir.mkdir(parents=True, exist_ok=True)
        (model_dir / "config.json").write_text('{"model_type": "noop"}')
        history: list[dict[str, float | int]] = [
            {"step": s, "train_loss": 1 / s} for s in range(1, self.steps + 1)
        ]
        trained = NoOpResult(self.steps, self.steps * 512, history)
        with session_scope(self.plan.url) as session:
            results.register_fine_tuned_model(
                session, storage, self.job_id, self.owner, model_dir=model_dir, trained=trained
            )


def _run_job(plan: WorkerPlan, job_id: str, tally: Tally, rng: random.Random) -> None:
    """worker/supervisor.py's supervise_job, with a no-op trainer."""
    from worker.supervisor import worker_identity

    with session_scope(plan.url) as session:  # is the job still there?
        if session.get(Job, job_id) is None:
            return
    owner = worker_identity()
    with session_scope(plan.url) as session:
        if not leases.claim_job(session, job_id, owner, plan.lease_seconds):
            tally.add("claims_lost")
            return
    with session_scope(plan.url) as session:  # runner._spec: the job and its files
        job = session.get(Job, job_id)
        assert job is not None
        session.get(File, job.training_file)
    trainer = NoOpTrainer(plan, job_id, owner, tally, plan.job_seconds * rng.uniform(0.7, 1.3))
    try:
        trainer.run()
        trainer.finish()
        tally.add("finished")
    except (Stopped, results.JobNotOurs):
        tally.add("stopped")
    with session_scope(plan.url) as session:  # _settle, once the trainer is gone
        state = leases.lease_state(session, job_id)
        if state is not None and state.owner == owner:
            leases.release_lease(session, job_id, owner)


def _worker_thread(plan: WorkerPlan, tally: Tally, seed: int) -> None:
    rng = random.Random(seed)
    client = redis.Redis.from_url(plan.redis_url, decode_responses=True)
    while time.time() < plan.stop_at:
        popped = client.blpop([plan.wakeups_key], timeout=1)
        if popped is None:
            continue
        try:
            _run_job(plan, str(popped[1]), tally, rng)
        except Exception:
            logging.getLogger("bench").exception("simulated worker")
            tally.add("errors")


def worker_process(plan: WorkerPlan, out: Any) -> None:
    """A process of ``plan.threads`` simulated workers; puts its counts and CPU time on
    ``out``."""
    logging.basicConfig(level=logging.WARNING)
    # On one machine the simulated workers would take the CPU that the measured API and
    # reconciler need; in a deployment they run elsewhere. Their database work, done by
    # PostgreSQL's own processes, keeps its priority.
    os.nice(10)
    # The workers of one process share a pool, as threads of a real worker would; PostgreSQL
    # (max_connections 100, shared) could not give 200 processes a connection each.
    use_pool_limits(plan.url, PoolLimits(size=min(plan.threads, 6), overflow=2, timeout=120))
    tally = Tally()
    threads = [
        threading.Thread(target=_worker_thread, args=(plan, tally, os.getpid() * 1000 + i))
        for i in range(plan.threads)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    usage = resource.getrusage(resource.RUSAGE_SELF)
    out.put({**tally.counts, "cpu_seconds": usage.ru_utime + usage.ru_stime})


# ---- the reconciler ---------------------------------------------------------------------------


def reconciler_process(world: World, every: float, stop_at: float, out: Any) -> None:
    """``reconcile_once`` every ``every`` seconds; puts [(seconds, summary), ...] on ``out``."""
    from app.core import queue
    from worker.reconciler import reconcile_once

    logging.basicConfig(level=logging.WARNING)
    settings = world.settings()
    # A running worker connected to the broker and the database long before a pass: one
    # wake-up for no job (a worker would drop it) and one query.
    queue.enqueue_job(settings, "ftjob-warm-up")
    with session_scope(settings.sqlalchemy_url) as session:
        session.execute(text("SELECT 1"))
    passes: list[tuple[float, dict[str, Any]]] = []
    while time.time() < stop_at:
        started, cpu = time.perf_counter(), time.process_time()
        summary = reconcile_once(settings)
        summary["cpu_seconds"] = time.process_time() - cpu  # the pass's own, waits excluded
        passes.append((time.perf_counter() - started, summary))
        time.sleep(max(0.0, min(every - (time.perf_counter() - started), stop_at - time.time())))
    out.put(passes)


# ---- the API process and its client ----------------------------------------------------------


@contextmanager
def api_process(world: World) -> Iterator[tuple[str, int]]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TUNEHOUSE_")}
    env.update(
        TUNEHOUSE_DATABASE_URL=world.url,
        TUNEHOUSE_BROKER_URL=world.redis_url,
        TUNEHOUSE_DATA_DIR=str(world.data_dir),
        TUNEHOUSE_LOG_LEVEL="WARNING",
        HF_HUB_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
    )
    stack = Stack("the API", env, world.data_dir)
    try:
        process = stack.start("api", "--role", "control", "--port", str(stack.port), log="api")
        stack.wait_ready(90)
        yield stack.base_url, process.pid
    finally:
        stack.stop()


Samples = dict[str, list[float]]


@dataclass(frozen=True)
class Request:
    name: str  # the table's row
    org: Org
    method: str
    path: str
    params: dict[str, Any] | None = None
    body: dict[str, Any] | None = None


JOBS_PATH = "/v1/fine_tuning/jobs"


def _reads(org: Org, suffix: str, rng: random.Random) -> list[Request]:
    job_id, cursor = rng.choice(org.job_ids), rng.choice(org.job_ids)
    return [
        Request(f"retrieve{suffix}", org, "GET", f"{JOBS_PATH}/{job_id}"),
        Request(f"list{suffix}", org, "GET", JOBS_PATH, {"limit": LIMIT}),
        Request(f"list after{suffix}", org, "GET", JOBS_PATH, {"limit": LIMIT, "after": cursor}),
    ]


def _round(world: World, rng: random.Random) -> list[Request]:
    """One of each measured request: a create, then reads in a typical and the big org."""
    big, typical, creates = world.orgs[0], world.orgs[1:-1], world.orgs[-1]
    body = {"model": BASE_MODEL, "training_file": creates.file_id}
    create = Request("create", creates, "POST", JOBS_PATH, body=body)
    return [create, *_reads(rng.choice(typical), "", rng), *_reads(big, ", big org", rng)]


def client_loop(
    base: str, world: World, rate: float, stop_at: float, seed: int
) -> tuple[Samples, list[str]]:
    """The measured requests, round after round, paced at ``rate`` requests per second."""
    rng = random.Random(seed)
    samples: Samples = {}
    errors: list[str] = []
    interval, next_at = 1 / rate, time.monotonic()
    with httpx.Client(base_url=base, timeout=60) as http:
        for warm_up in _round(world, rng):  # the API's first requests import and connect
            headers = {"Authorization": f"Bearer {warm_up.org.key}"}
            http.request(warm_up.method, warm_up.path, params=warm_up.params, headers=headers)
        while time.time() < stop_at:
            for request in _round(world, rng):
                next_at += interval
                time.sleep(max(0.0, next_at - time.monotonic()))
                headers = {"Authorization": f"Bearer {request.org.key}"}
                started = time.perf_counter()
                try:
                    response = http.request(request.method, request.path, params=request.params,
                                            json=request.body, headers=headers)  # fmt: skip
                except httpx.HTTPError as exc:
                    errors.append(f"{request.name}: {exc!r}")
                    continue
                samples.setdefault(request.name, []).append(time.perf_counter() - started)
                if response.status_code != 200:
                    errors.append(f"{request.name}: {response.status_code} {response.text[:200]}")
                elif request.name == "create":
                    # Untimed: the create-only organization's jobs stay out of everyone's way.
                    job_id = response.json()["id"]
                    http.post(f"{JOBS_PATH}/{job_id}/cancel", headers=headers)
                    samples.setdefault("cancel (untimed)", []).append(0.0)
    return samples, errors


def clients(
    base: str, world: World, args: argparse.Namespace, stop_at: float
) -> tuple[Samples, list[str]]:
    """``args.clients`` clients at once (threads: they wait on the API, not on the GIL),
    sharing ``args.rate``."""
    with ThreadPoolExecutor(args.clients) as pool:
        runs = list(pool.map(lambda n: client_loop(base, world, args.rate / args.clients,
                                                     stop_at, n), range(args.clients)))  # fmt: skip
    samples: Samples = {}
    for run, _ in runs:
        for name, values in run.items():
            samples.setdefault(name, []).extend(values)
    return samples, [error for _, errors in runs for error in errors]


def cpu_seconds(pid: int) -> float:
    """CPU time a live process has used so far (user + system), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# ---- the queries, explained ------------------------------------------------------------------


def explain_queries(world: World, show_plans: bool) -> dict[str, float]:
    """EXPLAIN ANALYZE each SELECT the control plane's hot paths issue, on this database;
    returns each one's execution time in milliseconds."""
    engine = get_engine(world.url)
    captured: list[tuple[str, Any]] = []

    def capture(_conn: Any, _cursor: Any, statement: str, parameters: Any, *_: Any) -> None:
        captured.append((statement, parameters))

    big = world.orgs[0]
    settings = world.settings()
    timings: dict[str, float] = {}
    with session_scope(world.url) as session:
        org = keys.organization_of(session, keys.authenticate(session, big.key))
        deep_cursor = big.job_ids[len(big.job_ids) // 10]  # a tenth of the way from the oldest
        unused = files.store_result_file(session, world.storage, org.id, "unused.csv", b"a\n1\n")
        session.flush()
        idle = settings.requeue_after_seconds
        cases: list[tuple[str, Callable[[], Any]]] = [
            ("get_job", lambda: jobs.get_job(session, org, big.job_ids[0])),
            ("list_jobs, first page",
             lambda: jobs.list_jobs(session, org, limit=LIMIT, after=None)),
            ("list_jobs, after a deep cursor",
             lambda: jobs.list_jobs(session, org, limit=LIMIT, after=deep_cursor)),
            ("list_events",
             lambda: jobs.list_events(session, org, big.job_ids[0], limit=LIMIT, after=None)),
            ("stale_job_ids(queued)", lambda: leases.stale_job_ids(session, jobs.QUEUED, idle)),
            ("stale_job_ids(validating)",
             lambda: leases.stale_job_ids(session, jobs.VALIDATING, idle)),
            ("expired_or_local_leases",
             lambda: leases.expired_or_local_leases(session, local_owner_prefix(), utcnow())),
            ("file in use? (delete_file)",
             lambda: files.delete_file(session, world.storage, org, unused.id)),
        ]  # fmt: skip
        for name, call in cases:
            captured.clear()
            event.listen(engine, "before_cursor_execute", capture)
            try:
                call()
            finally:
                event.remove(engine, "before_cursor_execute", capture)
            selects = [(s, p) for s, p in captured if s.lstrip().upper().startswith("SELECT")]
            total = 0.0
            for statement, parameters in selects:
                plan = [
                    row[0]
                    for row in session.connection().exec_driver_sql(
                        f"EXPLAIN (ANALYZE, BUFFERS) {statement}", parameters
                    )
                ]
                total += float(plan[-1].split(":")[1].split()[0])
                if show_plans:
                    print(f"\n-- {name}\n{statement}\n" + "\n".join(plan))
            timings[name] = total
        session.rollback()
    return timings


# ---- one phase ----------------------------------------------------------------------------------


@dataclass
class PhaseResult:
    samples: Samples
    errors: list[str]
    reconcile: list[tuple[float, dict[str, Any]]]
    workers: dict[str, float]  # their counts, and the CPU seconds they used
    api_cpu_seconds: float
    explain: dict[str, float]
    seed_seconds: float


def _worker_plans(
    world: World, args: argparse.Namespace, workers: int, stop_at: float
) -> list[WorkerPlan]:
    per = args.threads_per_process
    return [
        WorkerPlan(
            url=world.url,
            redis_url=world.redis_url,
            wakeups_key=world.wakeups_key,
            storage_root=str(world.storage.root),
            threads=min(per, workers - start),
            job_seconds=args.job_seconds,
            step_seconds=args.step_seconds,
            poll_seconds=args.poll_seconds,
            heartbeat_seconds=args.heartbeat,
            lease_seconds=60,
            stop_at=stop_at,
        )  # fmt: skip
        for start in range(0, workers, per)
    ]


def measure(world: World, args: argparse.Namespace, workers: int) -> PhaseResult:
    """The API, the workers and the reconciler for ``args.duration`` seconds, measured."""
    with api_process(world) as (base, api_pid):
        api_cpu = cpu_seconds(api_pid)
        stop_at = time.time() + args.duration
        spawn = mp.get_context("spawn")
        out = spawn.Queue()
        processes = [
            spawn.Process(target=worker_process, args=(plan, out))
            for plan in _worker_plans(world, args, workers, stop_at)
        ]
        processes.append(
            spawn.Process(
                target=reconciler_process, args=(world, args.reconcile_every, stop_at, out)
            )
        )
        for process in processes:
            process.start()
        samples, errors = clients(base, world, args, stop_at)
        api_cpu = cpu_seconds(api_pid) - api_cpu
        tallies: list[dict[str, float]] = []
        passes: list[tuple[float, dict[str, Any]]] = []
        for _ in processes:  # a pass may run on past the end: it is waited for
            item = out.get(timeout=600)
            if isinstance(item, list):
                passes = item
            else:
                tallies.append(item)
        for process in processes:
            process.join(timeout=60)
    totals = {k: sum(t[k] for t in tallies) for k in (*COUNTS, "cpu_seconds")}
    return PhaseResult(samples, errors, passes, totals, api_cpu, {}, 0.0)


def run_phase(args: argparse.Namespace, jobs_total: int, workers: int, orgs: int,
              explain: bool) -> PhaseResult:  # fmt: skip
    """A fresh database with ``jobs_total`` queued jobs, measured, explained and dropped."""
    redis_client = redis.Redis.from_url(REDIS_URL)
    with fresh_postgres_database(PG_ADMIN_URL, "tunehouse_bench") as url, \
            tempfile.TemporaryDirectory(prefix="tunehouse-bench-") as tmp:  # fmt: skip
        upgrade(url)
        data_dir = Path(tmp)
        wakeups_key = f"tunehouse-bench:{url.rsplit('/', 1)[1]}:wakeups"
        try:
            started = time.perf_counter()
            org_list, wakeups = seed(url, data_dir, jobs_total, orgs)
            redis_client.rpush(wakeups_key, *wakeups)
            seeded = time.perf_counter() - started
            print(f"  seeded {jobs_total} jobs in {len(org_list)} organizations in "
                  f"{seeded:.1f} s", flush=True)  # fmt: skip
            world = World(url, REDIS_URL, data_dir, org_list, wakeups_key)
            result = measure(world, args, workers)
            result.seed_seconds = seeded
            result.explain = explain_queries(world, explain)
        finally:
            # The wake-up list, and the Celery queue the reconciler and the API sent to.
            bindings = redis_client.keys("_kombu.binding*tunehouse")
            redis_client.delete(wakeups_key, "tunehouse", *bindings)
    return result


# ---- the table --------------------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f}"


def _row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def print_table(base: PhaseResult, scale: PhaseResult, args: argparse.Namespace) -> None:
    def series(result: PhaseResult) -> Samples:
        return {**result.samples, "reconcile pass": [s for s, _ in result.reconcile]}

    b, s = series(base), series(scale)
    label = f"{args.workers} workers, {args.jobs} jobs"
    head = ["ms", "n (baseline, scale)", "1 worker, 10 jobs: p50", "p99", f"{label}: p50", "p99",
            "ratio p50", "ratio p99", "goal (p99)"]  # fmt: skip
    print("\n" + _row(head) + "\n" + _row(["---"] * len(head)))
    for name in s:
        if not b.get(name) or not s[name] or name.endswith("(untimed)"):
            continue
        goal = next((g for k, g in GOALS.items() if name.startswith(k)), None)
        bp50, bp99 = percentile(b[name], 0.5), percentile(b[name], 0.99)
        sp50, sp99 = percentile(s[name], 0.5), percentile(s[name], 0.99)
        verdict = ""
        if goal is not None:
            verdict = f"< {goal * 1000:.0f}: {'met' if sp99 < goal else 'MISSED'}"
        cells = [name, f"{len(b[name])}, {len(s[name])}", _ms(bp50), _ms(bp99), _ms(sp50),
                 _ms(sp99), f"{sp50 / bp50:.1f}", f"{sp99 / bp99:.1f}", verdict]  # fmt: skip
        print(_row(cells))
    print("\nQueries on PostgreSQL after the run, EXPLAIN ANALYZE execution time (ms):")
    print(_row(["query", "10 jobs", f"{args.jobs} jobs"]) + "\n" + _row(["---"] * 3))
    for name, ms in scale.explain.items():
        print(_row([name, f"{base.explain.get(name, 0):.2f}", f"{ms:.2f}"]))
    for name, result in (("baseline", base), ("scale", scale)):
        requests = sum(len(v) for v in result.samples.values())
        cpu = [p["cpu_seconds"] for _, p in result.reconcile]
        w = result.workers
        print(f"\n{name}: {requests} requests, API CPU {_ms(result.api_cpu_seconds / requests)} "
              "ms a request (the creates' validation included); reconcile pass CPU p50 "
              f"{_ms(percentile(cpu, 0.5))} ms, max {_ms(max(cpu))} ms")  # fmt: skip
        print(f"  seeded in {result.seed_seconds:.1f} s; jobs finished {w['finished']:.0f}, "
              f"stopped at the end {w['stopped']:.0f}, claims lost {w['claims_lost']:.0f}, "
              f"heartbeats {w['heartbeats']:.0f}, worker errors {w['errors']:.0f}; CPU seconds: "
              f"workers {w['cpu_seconds']:.0f}, API {result.api_cpu_seconds:.0f}; "
              f"request errors {len(result.errors)}")  # fmt: skip
        passes = ", ".join(f"{s:.2f} s ({p.get('enqueued', 0)})" for s, p in result.reconcile)
        print(f"  reconcile passes (wake-ups sent): {passes}")
        for line in result.errors[:10]:
            print("  ", line)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--jobs", type=int, default=10_000)
    parser.add_argument("--workers", type=int, default=200)
    parser.add_argument("--orgs", type=int, default=20, help="organizations holding the jobs")
    parser.add_argument("--duration", type=float, default=150, help="seconds per phase")
    parser.add_argument("--job-seconds", type=float, default=15, help="a job's run, +-30%%")
    parser.add_argument("--step-seconds", type=float, default=1, help="progress written each")
    parser.add_argument("--poll-seconds", type=float, default=1, help="the supervisor's poll")
    parser.add_argument("--heartbeat", type=float, default=10, help="seconds between renewals")
    parser.add_argument("--reconcile-every", type=float, default=5, help="seconds between passes")
    parser.add_argument("--rate", type=float, default=40, help="measured requests per second")
    parser.add_argument("--clients", type=int, default=4, help="concurrent measuring clients")
    parser.add_argument("--threads-per-process", type=int, default=50)
    parser.add_argument("--explain", action="store_true", help="print the query plans")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.basicConfig(level=logging.WARNING)
    print(f"load average at start: {os.getloadavg()}; {os.cpu_count()} CPUs", flush=True)
    print("baseline: 1 worker, 10 jobs", flush=True)
    base = run_phase(args, 10, 1, 2, explain=False)
    print(f"scale: {args.workers} workers, {args.jobs} jobs", flush=True)
    scale = run_phase(args, args.jobs, args.workers, args.orgs, explain=args.explain)
    print(f"load average at end: {os.getloadavg()}")
    print(f"command: {' '.join(sys.argv)}")
    print_table(base, scale, args)


if __name__ == "__main__":
    main()
