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

The first tests check the harness's own judgement against a mocked server (milliseconds): a 5xx,
a shed 503, a wrong status, a missing envelope, a slow or missing answer, a broken stream, a job
in the wrong state and files left behind are each reported. Each soak case takes one and a half
to two minutes on two cores: start-up, the first inference
request (it imports torch), 40 s of load, and the drain of the last jobs.
"""

from __future__ import annotations

import random
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.soak import ModelFiles, SoakConfig, build_models, distributed, embedded, ops, run_soak
from tests.soak.http import Http
from tests.soak.record import Recorder, hung_routes
from tests.soak.run import check_storage, drain_jobs
from tests.soak.world import CANCEL, UNTOUCHED, JobPlan, World
from tests.soak.zoo import Zoo
from tests.support import fresh_postgres_database

pytestmark = [pytest.mark.soak, pytest.mark.timeout(600)]

SHORT = SoakConfig(duration=40, clients=10, watchers=16)


# -- the harness judges what a user sees (against a mocked server, in milliseconds) -------------

ENVELOPE = {"error": {"message": "no", "type": "t", "param": None, "code": None}}


def mocked(handler: Any, bound: float = 30) -> Http:
    recorder = Recorder(bound)
    recorder.start_load()
    transport = httpx.MockTransport(handler)
    return Http("probe", ["http://server"], "sk-th-x", recorder, random.Random(0), transport)


@pytest.mark.parametrize(
    ("response", "expect", "kind"),
    [
        (httpx.Response(200, json={}), (200,), None),
        (httpx.Response(500, json=ENVELOPE), (200,), "5xx"),
        (httpx.Response(503, json=ENVELOPE), (200,), "5xx"),  # no Retry-After: not shedding
        (httpx.Response(503, json=ENVELOPE, headers={"Retry-After": "0"}), (200,), None),
        (httpx.Response(404, json=ENVELOPE), (200,), "status"),
        (httpx.Response(400, text="bad"), (400,), "envelope"),
    ],
)
def test_each_answer_is_judged_by_status_and_envelope(
    response: httpx.Response, expect: tuple[int, ...], kind: str | None
) -> None:
    h = mocked(lambda request: response)
    h.call("probe", "GET", "/v1/models", expect=expect)
    assert [v.kind for v in h.recorder.violations] == ([kind] if kind else [])
    assert h.recorder.shed == (1 if response.status_code == 503 and kind is None else 0)
    if kind:  # the report names the request, its status and its latency
        text = h.recorder.violations[0].text
        assert "GET /v1/models" in text and "request soak-probe-1" in text and " s " in text


def test_an_answer_over_the_bound_and_no_answer_are_violations() -> None:
    def slow(request: httpx.Request) -> httpx.Response:
        time.sleep(0.2)
        return httpx.Response(200, json={})

    h = mocked(slow, bound=0.1)
    h.call("probe", "GET", "/v1/models")
    assert [v.kind for v in h.recorder.violations] == ["slow"]

    h = mocked(_never_answers)
    assert h.call("probe", "GET", "/v1/models") is None
    assert [v.kind for v in h.recorder.violations] == ["timeout"]


def test_a_kind_of_request_that_stopped_being_answered_is_named_as_hung() -> None:
    h = mocked(lambda request: httpx.Response(200, json={}))
    for _ in range(2):
        h.call("chat", "POST", "/v1/chat/completions", model="m")
    h.client = httpx.Client(transport=httpx.MockTransport(_never_answers))
    for _ in range(3):
        h.call("chat", "POST", "/v1/chat/completions", model="m")
        h.call("models-list", "GET", "/v1/models")
    chat, models = hung_routes(h.recorder.calls)
    assert chat.startswith("chat (POST /v1/chat/completions): the last 3 requests, from +")
    assert models.startswith("models-list (GET /v1/models): the last 3 requests, from +")


def _never_answers(request: httpx.Request) -> httpx.Response:
    raise httpx.ReadTimeout("no answer", request=request)


def test_a_stream_without_done_and_an_error_chunk_are_violations() -> None:
    zoo = Zoo(generative=["m"], classifiers=[], encoders=[])
    for body, problem in [
        (b'data: {"choices": [{"delta": {"content": "a"}}]}\n\n', "without [DONE]"),
        (b'data: {"error": {"message": "boom"}}\n\ndata: [DONE]\n\n', "error in the stream"),
    ]:
        h = mocked(lambda request, body=body: httpx.Response(200, content=body))
        ops.chat_stream(h, World(zoo, 1), random.Random(0), model="m", cut=False)
        assert [v.kind for v in h.recorder.violations] == ["stream"]
        assert problem in h.recorder.violations[0].text


def test_a_job_that_ends_in_another_state_than_its_fate_calls_for_is_a_violation() -> None:
    statuses = {"ftjob-a": "succeeded", "ftjob-b": "succeeded"}

    def server(request: httpx.Request) -> httpx.Response:
        job_id = request.url.path.rsplit("/", 1)[-1]
        return httpx.Response(200, json={"id": job_id, "status": statuses[job_id], "error": None})

    h = mocked(server)
    world = World(Zoo([], [], []), 2)
    world.jobs = {
        "ftjob-a": JobPlan("ftjob-a", "probe", UNTOUCHED, due=0),
        "ftjob-b": JobPlan("ftjob-b", "probe", CANCEL, due=0, expected="cancelled"),
    }
    drain_jobs(h, world, random.Random(0), bound=5, watchers=[])
    (violation,) = h.recorder.violations
    assert violation.kind == "job"
    assert "ftjob-b (cancel) should have ended cancelled but is succeeded" in violation.text


def test_files_left_in_tmp_or_stored_without_a_listing_are_violations(tmp_path: Path) -> None:
    for sub in ("tmp", "files"):
        (tmp_path / sub).mkdir()
    (tmp_path / "tmp" / "upload-123").write_bytes(b"half")
    (tmp_path / "files" / "file-orphan").write_bytes(b"x")
    (tmp_path / "files" / "file-listed").write_bytes(b"x")
    listed = {"object": "list", "data": [{"id": "file-listed"}, {"id": "file-lost"}]}
    h = mocked(lambda request: httpx.Response(200, json=listed))
    check_storage(h, tmp_path)
    texts = [v.text for v in h.recorder.violations]
    assert len(texts) == 3
    assert "upload-123" in texts[0] and "file-orphan" in texts[1] and "file-lost" in texts[2]


# -- the soak itself --------------------------------------------------------------------------


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
