"""One soak, start to end: a baseline of the same requests one at a time on the idle server,
then the mixed load for a bounded time, then the drain (every job must end in the state its
clients' actions call for), then the checks an operator would make."""

from __future__ import annotations

import random
import re
import subprocess
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.soak import ops
from tests.soak.clients import ROLES, Client, Watcher
from tests.soak.http import Http
from tests.soak.record import (
    Call,
    Recorder,
    Violation,
    hung_routes,
    latency_table,
    violations_text,
)
from tests.soak.resources import ResourceSampler, Sample
from tests.soak.world import CANCEL, World
from tests.soak.zoo import Zoo

# The lines of a server log that say what failed (not the frames of a traceback).
_ERROR_LINE = re.compile(r"ERROR|CRITICAL|unhandled error|\w(Error|Exception)\b")


@dataclass(frozen=True)
class SoakConfig:
    duration: float = 40.0  # seconds of mixed load
    clients: int = 10  # busy clients (closed loop), in the roles of clients.ROLES
    # Idle clients following event streams, per API process (each stays with one, as an open
    # dashboard does): more than the 15 connections of a process's database pool.
    watchers: int = 16
    bound: float = 30.0  # no request may wait longer for its answer (a stream: for its headers)
    drain_bound: float = 150.0  # every job must have ended this long after the load stops
    max_active_jobs: int = 2  # unfinished jobs at a time (one worker trains them in turn)
    # No job is created in the load's last seconds: the worker finishes the last ones while
    # the load goes on, and the drain after it stays short.
    last_jobs_before_end: float = 20.0
    warmup: float = 15.0  # memory growth is measured from this far into the load
    # Most the API's memory may grow under load after warm-up: room for a few MiniLM-sized
    # models still answering requests after the cache evicted them, not for a leak that grows
    # with the requests served (the long form shows the trend).
    rss_growth_mib: float = 256.0
    fd_growth: int = 32  # most open descriptors the idle API may hold beyond its idle start
    baseline_rounds: int = 1
    seed: int = 0


@dataclass
class Target:
    """A running deployment: where its API processes listen, a key, and what to check."""

    name: str
    urls: list[str]
    key: str
    api_pids: list[int]
    storage_root: Path
    processes: list[subprocess.Popen[bytes]]
    log_dir: Path  # the processes' logs (one file each)

    def log_errors(self, lines: int = 30) -> str:
        """The last errors the server logged (each distinct line once, with its count): where
        a violation's request id leads."""
        out = []
        for log in sorted(self.log_dir.glob("*.log")):
            text = log.read_text(errors="replace").splitlines()
            counts = Counter(line for line in text if _ERROR_LINE.search(line))
            if counts:
                out.append(f"--- {log.name} ---")
                out += [f"{line} (x{n})" if n > 1 else line for line, n in counts.items()][-lines:]
        return "\n".join(out) or "(no errors logged)"


@dataclass
class SoakReport:
    target: str
    config: SoakConfig
    calls: list[Call]
    violations: list[Violation]
    shed: int
    resources: str
    jobs: str
    load_started: float = 0.0  # soak time
    seconds: dict[str, float] = field(default_factory=dict)
    samples: list[Sample] = field(default_factory=list)  # the API processes' memory and fds

    @property
    def load_calls(self) -> list[Call]:
        """The requests sent while the load ran (not the drain's)."""
        end = self.load_started + self.config.duration
        return [c for c in self.calls if not c.baseline and c.at < end]

    def summary(self) -> str:
        c = self.config
        phases = ", ".join(f"{name} {s:.0f} s" for name, s in self.seconds.items())
        lines = [
            f"soak on {self.target}: {len(self.load_calls)} requests in {c.duration:.0f} s by "
            f"{c.clients} clients and {c.watchers} event-stream watchers per API process "
            f"({phases}; the load from {self.load_started:.0f} s on); "
            f"bound {c.bound:.0f} s per answer; {self.shed} answered 503 + Retry-After (shed)",
            violations_text(self.violations) if self.violations else "no violations",
            *(f"hung: {line}" for line in hung_routes(self.calls)),
            "latency under load beside the idle baseline (same requests, one at a time):",
            latency_table(self.load_calls, [c for c in self.calls if c.baseline]),
            "API processes (memory and open file descriptors):",
            self.resources,
            "jobs (expected -> ended):",
            self.jobs,
        ]
        return "\n".join(lines)


def run_soak(target: Target, zoo: Zoo, config: SoakConfig) -> SoakReport:
    recorder = Recorder(config.bound)
    world = World(zoo, config.max_active_jobs)
    rng = random.Random(config.seed)
    sampler = ResourceSampler(target.api_pids)
    sampler.start()
    seconds: dict[str, float] = {}
    main = Http("main", target.urls, target.key, recorder, rng)
    try:
        started = time.monotonic()
        _warm_up(target, zoo, recorder)
        seconds["warm-up"] = time.monotonic() - started
        started = time.monotonic()
        _baseline(main, world, rng, config.baseline_rounds)
        seconds["baseline"] = time.monotonic() - started
        sampler.mark("idle start")
        watchers = _load(target, world, recorder, sampler, config)
        started = time.monotonic()
        drain_jobs(main, world, rng, config.drain_bound, watchers)
        seconds["drain"] = time.monotonic() - started
        _check_models_serve(main, world, rng)
        check_storage(main, target.storage_root)
        sampler.mark("idle end")
    finally:
        world.drained.set()
        sampler.stop()
        main.close()
    _check_resources(sampler, target, recorder, config)
    return SoakReport(
        target.name,
        config,
        recorder.calls,
        recorder.violations,
        recorder.shed,
        sampler.table(),
        _jobs_table(world),
        recorder.load_started or 0.0,
        seconds,
        sampler.samples,
    )


# The first inference request of an API process imports torch and transformers (lazily, so
# that the control plane never does): tens of seconds on a busy machine. It is not what a
# request costs afterwards, so it gets a bound of its own and stays out of the baseline.
WARM_UP_BOUND = 180.0


def _warm_up(target: Target, zoo: Zoo, recorder: Recorder) -> None:
    for index, url in enumerate(target.urls):
        h = Http(f"warmup{index}", [url], target.key, recorder, random.Random(index))
        body = {"model": zoo.encoders[0], "input": ["warm up"]}
        h.call("warm-up", "POST", "/v1/embeddings", json=body, bound=WARM_UP_BOUND)
        h.close()


def _baseline(h: Http, w: World, rng: random.Random, rounds: int) -> None:
    """Each kind of request once per model, one at a time, on the idle server; stopped at the
    first request left unanswered (a hung server would only add one timeout per request)."""
    z = w.zoo
    requests: list[tuple[Any, dict[str, Any]]] = [
        *[(ops.predict_classifier, {"model": m}) for m in z.classifiers],
        *[(ops.embed, {"model": m}) for m in z.encoders],
        *[(op, {"model": m}) for m in z.generative for op in (ops.chat, ops.completion)],
        *[(ops.predict_generative, {"model": m}) for m in z.generative[:2]],
        *[(ops.chat_stream, {"model": m, "cut": False}) for m in z.generative[:2]],
        (ops.completion_stream, {"model": z.generative[0], "cut": False}),
        (ops.upload_good, {"kind": "tabular"}),
        (ops.upload_good, {"kind": "classification"}),
        (ops.upload_bad, {}),
        (ops.read_files, {}),
        (ops.read_control, {}),
        (_create_and_cancel, {}),
    ]
    for _ in range(rounds):
        for op, kwargs in requests:
            op(h, w, rng, **kwargs)
            if h.recorder.calls and h.recorder.calls[-1].status is None:
                h.recorder.violation(
                    "baseline", "the idle server left a request unanswered; baseline stopped"
                )
                return


def _create_and_cancel(h: Http, w: World, rng: random.Random) -> None:
    for plan in ops.create_job(h, w, rng, fate=CANCEL):
        plan.due = 0
        ops.act_on_jobs(h, w, rng)


def _load(
    target: Target, world: World, recorder: Recorder, sampler: ResourceSampler, c: SoakConfig
) -> list[Watcher]:
    """The mixed load for ``c.duration`` seconds; returns the watchers, which go on following
    the jobs' streams until the drain is over."""

    def http(name: str, seed: int) -> Http:
        return Http(name, target.urls, target.key, recorder, random.Random(seed))

    started = recorder.start_load()
    world.jobs_until = started + c.duration - c.last_jobs_before_end
    clients = [
        Client(
            http(f"{ROLES[i % len(ROLES)]}{i}", c.seed + i),
            world,
            ROLES[i % len(ROLES)],
            c.seed + i,
        )
        for i in range(c.clients)
    ]
    watchers = [
        Watcher(
            Http(f"watcher{i}", [url], target.key, recorder, random.Random(c.seed + 1000 + i)),
            world,
            c.seed + 1000 + i,
        )
        for i in range(c.watchers * len(target.urls))
        for url in [target.urls[i % len(target.urls)]]
    ]
    for thread in clients + watchers:
        thread.start()
    time.sleep(min(c.warmup, c.duration))
    sampler.mark("warm")
    time.sleep(max(0.0, c.duration - c.warmup))
    sampler.mark("load end")
    world.load_over.set()
    # No deadlock: every client is back within the bound of its last request.
    deadline = time.monotonic() + c.bound + 15
    for thread in clients:
        thread.join(timeout=max(0.0, deadline - time.monotonic()))
        if thread.is_alive():
            recorder.violation(
                "deadlock",
                f"client {thread.name} still waiting {c.bound + 15:.0f} s after the load "
                f"stopped, on {thread.http.waiting_on}",
            )
    return watchers


def drain_jobs(
    h: Http, w: World, rng: random.Random, bound: float, watchers: list[Watcher]
) -> None:
    """Owed resumes first; then wait (bounded) for every job to end, and compare each with the
    state its clients' actions call for."""
    deadline, unanswered = time.monotonic() + bound, 0
    while time.monotonic() < deadline:
        ops.act_on_jobs(h, w, rng, finishing=True)
        active = w.active_jobs()
        if not active:
            break
        for plan in active:
            unanswered = 0 if ops.refresh_job(h, w, plan) else unanswered + 1
        if unanswered >= 3:
            h.recorder.violation("drain", "3 job retrieves in a row failed; the drain gave up")
            break
        time.sleep(1)
    w.drained.set()
    for watcher in watchers:
        watcher.join(timeout=h.recorder.bound + 5)
        if watcher.is_alive():
            h.recorder.violation(
                "deadlock", f"watcher {watcher.name} still waiting on {watcher.http.waiting_on}"
            )
    for plan in w.jobs.values():
        if plan.status != plan.expected:
            h.recorder.violation(
                "job",
                f"{plan.id} ({plan.fate}) should have ended {plan.expected} but is "
                f"{plan.status}{f' ({plan.error})' if plan.error else ''}; "
                f"history: {'; '.join(plan.history)}",
            )


def _check_models_serve(h: Http, w: World, rng: random.Random) -> None:
    """Every model a job made, and nobody deleted, answers (stopped at the first request left
    unanswered: a hung server would only add one timeout per model)."""
    for model in w.live_job_models():
        ops.predict_tabular(h, w, rng, model=model)
        if h.recorder.calls[-1].status is None:
            return


def check_storage(h: Http, storage_root: Path) -> None:
    """Nothing left in storage/tmp; every stored file is a listed one and the other way round
    (a refused upload stored, or a deleted file left behind, is an orphan)."""
    recorder, tmp = h.recorder, storage_root / "tmp"
    left = sorted(p.name for p in tmp.iterdir()) if tmp.is_dir() else []
    if left:
        recorder.violation("storage", f"{len(left)} entries left in {tmp}: {left[:10]}")
    r = h.call("files-list-all", "GET", "/v1/files", params={"limit": 10000})
    if r is None or r.status_code != 200:
        return
    listed = {f["id"] for f in r.json()["data"]}
    stored = {p.name for p in (storage_root / "files").iterdir()}
    if stored - listed:
        recorder.violation("storage", f"stored but not listed: {sorted(stored - listed)[:10]}")
    if listed - stored:
        recorder.violation("storage", f"listed but not stored: {sorted(listed - stored)[:10]}")


def _check_resources(
    sampler: ResourceSampler, target: Target, recorder: Recorder, c: SoakConfig
) -> None:
    for process in target.processes:
        if process.poll() is not None:
            recorder.violation("process", f"{process.args!r} exited ({process.returncode})")
    for pid in target.api_pids:
        warm = sampler.median_rss_before(pid, "warm")
        end = sampler.median_rss_before(pid, "load end")
        if warm is not None and end is not None and end - warm > c.rss_growth_mib:
            recorder.violation(
                "resource",
                f"API pid {pid}: resident memory grew {end - warm:.0f} MiB under load after "
                f"warm-up ({warm:.0f} -> {end:.0f} MiB; bound {c.rss_growth_mib:.0f} MiB)",
            )
        idle_start, idle_end = sampler.at(pid, "idle start"), sampler.at(pid, "idle end")
        if idle_start and idle_end and idle_end.fds - idle_start.fds > c.fd_growth:
            recorder.violation(
                "resource",
                f"API pid {pid}: {idle_end.fds} open descriptors once idle again, "
                f"{idle_start.fds} before the load (bound +{c.fd_growth})",
            )


def _jobs_table(w: World) -> str:
    lines = []
    for plan in w.jobs.values():
        mark = "ok" if plan.status == plan.expected else "WRONG"
        lines.append(
            f"  {plan.id} {plan.fate:<13} {plan.expected} -> {plan.status} {mark}: "
            + "; ".join(plan.history)
        )
    return "\n".join(lines) or "  (none created)"
