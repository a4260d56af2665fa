"""The two ways Tunehouse runs, started as a user starts them: `tunehouse run` on the embedded
defaults, and `tunehouse api` + `tunehouse worker` as separate processes on PostgreSQL + Redis."""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from tests.support import Stack, answers_ready, free_port, tunehouse, wait_until

# Short timings so the tests see reconciles and cancels quickly.
FAST_TIMINGS = {
    "TUNEHOUSE_HEARTBEAT_SECONDS": "2",
    "TUNEHOUSE_LEASE_SECONDS": "20",
    "TUNEHOUSE_RECONCILE_INTERVAL_SECONDS": "5",
    "TUNEHOUSE_REQUEUE_AFTER_SECONDS": "10",
    "TUNEHOUSE_CANCEL_POLL_SECONDS": "0.5",
    "TUNEHOUSE_CANCEL_GRACE_SECONDS": "5",
}


def base_env(data_dir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TUNEHOUSE_")}
    env.update(FAST_TIMINGS)
    env.update(TUNEHOUSE_DATA_DIR=str(data_dir), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    return env


@contextmanager
def embedded_stack(
    tmp: Path, extra_env: dict[str, str] | None = None
) -> Iterator[tuple[Stack, str]]:
    """`tunehouse run`: migrations, API, worker and reconciler in one command. Its first start
    prints an API key, which is what the tests use."""
    stack = Stack("embedded", {**base_env(tmp / "data"), **(extra_env or {})}, tmp)
    stack.start("run", "--port", str(stack.port), log="run")
    try:
        stack.wait_ready(timeout=90)
        log = tmp / "run.log"
        key = wait_until(
            lambda: re.search(r"sk-th-[A-Za-z0-9_-]{20,}", log.read_text(errors="replace")),
            10,
            what="the first API key in the output of `tunehouse run`",
        ).group(0)
        yield stack, key
    except BaseException:
        print(stack.logs())
        raise
    finally:
        stack.stop()


@contextmanager
def distributed_stack(
    tmp: Path, database_url: str, broker_url: str, extra_env: dict[str, str] | None = None
) -> Iterator[tuple[Stack, str]]:
    """`tunehouse api` and `tunehouse worker` on one PostgreSQL and Redis."""
    stacked = replicated_stack(tmp, database_url, broker_url, apis=1, extra_env=extra_env)
    with stacked as (stack, key, _):
        yield stack, key


@contextmanager
def replicated_stack(
    tmp: Path,
    database_url: str,
    broker_url: str,
    *,
    apis: int = 2,
    roles: Sequence[str] = (),
    workers: Sequence[Sequence[str]] = ((),),
    extra_env: dict[str, str] | None = None,
) -> Iterator[tuple[Stack, str, list[str]]]:
    """`tunehouse api` started ``apis`` times on one PostgreSQL and Redis, each on a port of its
    own with no proxy in front (clients pick one, as with replicas behind DNS), and one
    `tunehouse worker`. ``roles`` starts one API per entry with that `--role` instead, and
    ``workers`` one worker per entry with those options. Yields the stack (its processes:
    the APIs in order, then the workers), a key and the base URLs of the APIs."""
    env = {**base_env(tmp / "data"), **(extra_env or {})}
    env.update(TUNEHOUSE_DATABASE_URL=database_url, TUNEHOUSE_BROKER_URL=broker_url)
    stack = Stack("postgres+redis", env, tmp)
    tunehouse("migrate", env=env)
    key = tunehouse("keys", "create", "--organization", "acme", env=env).stdout.strip()
    api_options = [["--role", role] for role in roles] or [[] for _ in range(apis)]
    ports = [stack.port]
    while len(ports) < len(api_options):
        port = free_port()
        if port not in ports:
            ports.append(port)
    for index, (port, options) in enumerate(zip(ports, api_options, strict=True)):
        stack.start("api", *options, "--port", str(port), log=f"api{index}")
    for index, worker_options in enumerate(workers):
        stack.start("worker", *worker_options, log=f"worker{index}" if index else "worker")
    urls = [f"http://127.0.0.1:{port}" for port in ports]
    try:
        stack.wait_ready(timeout=90)
        for url in urls[1:]:
            wait_until(lambda url=url: answers_ready(url), 90, what=f"the API at {url} to be ready")
        yield stack, key, urls
    except BaseException:
        print(stack.logs())
        raise
    finally:
        stack.stop()
