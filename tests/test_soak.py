"""The soak test, short form (issue 9, B): mixed concurrent clients against a real Tunehouse for
40 s, on the embedded defaults (`tunehouse run`) and on PostgreSQL + Redis with two API processes
(clients pick one at random) and a worker. bench/soak.py runs the long form (`--duration`,
`--clients`, `--stack`).

Ten busy clients upload files (half of the uploads from the bad-dataset corpus), create jobs
and cancel, pause and resume them, poll the control plane, and call predictions, chat (plain and
streamed, a third of the streams dropped mid-answer), completions and embeddings across more
models than the model cache holds (TUNEHOUSE_MODEL_CACHE_SIZE=2; a Llama base, three LoRA
adapters of it, two classifiers, MiniLM, and the models the soak's jobs make); sixteen more per
API process follow the jobs' event streams, as open dashboards do (more than the 15 connections
of a process's database pool).

What must hold, as a user or an operator sees it: no 5xx (a 503 with Retry-After and the error
envelope counts as load shedding, not a failure: see tests/soak/record.py), every answer within
30 s and with the status its request calls for, every stream ending with [DONE], every client
back within that bound once the load stops (no deadlock), every job ending in the state its
clients' actions call for (cancelled -> cancelled, paused and resumed or untouched ->
succeeded), the API's resident memory growing less than 256 MiB after warm-up and its
descriptors back within 32 of where they started, and nothing left in storage/tmp. A failure
lists every violation with its request id (the server logs it), status and latency.

Each case takes one and a half to two minutes on two cores: start-up, the first inference
request (it imports torch), 40 s of load, and the drain of the last jobs.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.soak import ModelFiles, SoakConfig, build_models, distributed, embedded, run_soak
from tests.support import fresh_postgres_database

pytestmark = [pytest.mark.soak, pytest.mark.timeout(600)]

SHORT = SoakConfig(duration=40, clients=10, watchers=16)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> ModelFiles:
    return build_models(tmp_path_factory.mktemp("soak-models"))


def test_soak_embedded(models: ModelFiles, tmp_path: Path) -> None:
    with embedded(tmp_path, models) as (target, zoo):
        report = run_soak(target, zoo, SHORT)
        errors = target.log_errors() if report.violations else ""
    print(report.summary())
    assert not report.violations, f"{report.summary()}\nserver errors logged:\n{errors}"


@pytest.mark.postgres
def test_soak_postgres_redis_two_api_processes(
    models: ModelFiles, tmp_path: Path, postgres_url: str, redis_url: str
) -> None:
    # A database of its own: the session's may hold other tests' jobs, whose files live in
    # their own storage.
    with (
        fresh_postgres_database(postgres_url, prefix="tunehouse_soak") as database_url,
        distributed(tmp_path, models, database_url, redis_url) as (target, zoo),
    ):
        report = run_soak(target, zoo, SHORT)
        errors = target.log_errors() if report.violations else ""
    print(report.summary())
    assert not report.violations, f"{report.summary()}\nserver errors logged:\n{errors}"
