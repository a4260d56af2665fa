"""The two deployments a soak runs against, started as a user starts them (tests/stacks.py),
with the soak's models registered: `tunehouse run` on the embedded defaults, and two
`tunehouse api` processes plus one `tunehouse worker` on PostgreSQL and Redis."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tests.soak.ops import CORPUS_ENV
from tests.soak.run import Target
from tests.soak.zoo import ModelFiles, Zoo
from tests.stacks import embedded_stack, replicated_stack

# A model cache smaller than the models called: it loads and evicts all the time, LoRA
# adapters of one base included. Jobs slowed to a few seconds of training, so that a pause or a
# cancel lands on a running job as often as on a queued one.
SOAK_ENV = {
    "TUNEHOUSE_MODEL_CACHE_SIZE": "2",
    "TUNEHOUSE_DEBUG_STEP_DELAY_SECONDS": "0.1",
    **CORPUS_ENV,
}


def soak_env(models: ModelFiles, cache_size: int) -> dict[str, str]:
    env = {**SOAK_ENV, **models.base_models_env()}
    env["TUNEHOUSE_MODEL_CACHE_SIZE"] = str(cache_size)
    return env


@contextmanager
def embedded(tmp: Path, models: ModelFiles, cache_size: int = 2) -> Iterator[tuple[Target, Zoo]]:
    """`tunehouse run`: its one process serves the API (uvicorn runs in it); the worker is its
    child."""
    with embedded_stack(tmp, soak_env(models, cache_size)) as (stack, key):
        data = (tmp / "data").resolve()
        zoo = models.register(f"sqlite:///{data / 'tunehouse.db'}", data / "storage", key)
        yield (
            Target(
                "embedded (tunehouse run: SQLite, filesystem broker)",
                [stack.base_url],
                key,
                [stack.processes[0].pid],
                data / "storage",
                stack.processes,
                stack.log_dir,
            ),
            zoo,
        )


@contextmanager
def distributed(
    tmp: Path,
    models: ModelFiles,
    database_url: str,
    redis_url: str,
    apis: int = 2,
    cache_size: int = 2,
) -> Iterator[tuple[Target, Zoo]]:
    env = soak_env(models, cache_size)
    with replicated_stack(tmp, database_url, redis_url, apis=apis, extra_env=env) as (
        stack,
        key,
        urls,
    ):
        data = (tmp / "data").resolve()
        zoo = models.register(database_url, data / "storage", key)
        yield (
            Target(
                f"PostgreSQL + Redis ({apis} x tunehouse api, 1 x tunehouse worker)",
                urls,
                key,
                [process.pid for process in stack.processes[:apis]],
                data / "storage",
                stack.processes,
                stack.log_dir,
            ),
            zoo,
        )
