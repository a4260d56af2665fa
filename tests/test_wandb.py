"""A job's wandb integration: with the wandb package installed and W&B configured
(WANDB_MODE=offline here), the training process (a real one, started by the supervisor) logs the
job's metrics events to a W&B run named after the job, and W&B's own reader finds them in the
offline run's file; a W&B failure leaves the job succeeding with a warning event. (The refusal
without the package or without a configuration: tests/test_job_object.py.)"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from app.core.db import session_scope
from app.core.migrate import upgrade
from app.main import create_app
from app.services import keys
from tests.conftest import Api, make_settings
from tests.support import jsonl, wait_until
from tests.tiny_models import build_causal_lm
from worker import supervisor

TINY = "tiny-llama"
ROWS = [
    {"prompt": f"{word} says", "completion": f" hello {word}"}
    for word in ("fox", "dog", "cat", "owl", "bee", "ant", "elk", "yak")
]
WANDB = {"project": "tunehouse-tests", "name": "tiny-run", "tags": ["tiny", "offline"]}


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    texts = [f"{r['prompt']}{r['completion']}" for r in ROWS]
    return build_causal_lm(tmp_path_factory.mktemp("bases") / "tiny", texts, hidden_size=32)


@pytest.fixture
def api(tmp_path: Path, tiny_llama: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Api]:
    """An in-process API, and the environment a worker's training process reads its settings
    from; W&B in offline mode, its files under the data directory."""
    # The supervisor looks for a pause every 0.2 s (and stops the training process).
    settings = make_settings(
        tmp_path / "data", base_models={TINY: str(tiny_llama)}, cancel_poll_seconds=0.2
    )
    for name in ("WANDB_DIR", "WANDB_API_KEY", "WANDB_BASE_URL", "WANDB_PROJECT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("TUNEHOUSE_DATA_DIR", str(settings.data_dir))
    monkeypatch.setenv("TUNEHOUSE_BASE_MODELS", json.dumps({TINY: str(tiny_llama)}))
    upgrade(settings.sqlalchemy_url)
    with session_scope(settings.sqlalchemy_url) as session:
        key_a = keys.create_key(session, "org-a").key
        key_b = keys.create_key(session, "org-b").key
    with TestClient(create_app(settings)) as client:
        yield Api(client, settings, key_a, key_b)


def upload(api: Api, rows: list[dict[str, Any]], name: str) -> str:
    response = api.client.post(
        "/v1/files",
        headers=api.headers(),
        files={"file": (name, jsonl(rows), "application/octet-stream")},
        data={"purpose": "fine-tune"},
    )
    assert response.status_code == 200, response.text
    return str(response.json()["id"])


def create_job(api: Api, **hyperparameters: Any) -> str:
    """A queued job with a wandb integration; its id."""
    body = {
        "model": TINY,
        "training_file": upload(api, ROWS, "train.jsonl"),
        "validation_file": upload(api, ROWS[:4], "valid.jsonl"),
        "hyperparameters": {"n_epochs": 2, "batch_size": 4, **hyperparameters},
        "integrations": [{"type": "wandb", "wandb": WANDB}],
    }
    created = api.client.post("/v1/fine_tuning/jobs", headers=api.headers(), json=body)
    assert created.status_code == 200, created.text
    job_id = str(created.json()["id"])
    wait_until(lambda: job_of(api, job_id)["status"] == "queued", 30, what="the job queued")
    return job_id


def job_of(api: Api, job_id: str) -> dict[str, Any]:
    return dict(api.client.get(f"/v1/fine_tuning/jobs/{job_id}", headers=api.headers()).json())


def events_of(api: Api, job_id: str) -> list[dict[str, Any]]:
    url = f"/v1/fine_tuning/jobs/{job_id}/events?limit=100"
    return list(reversed(api.client.get(url, headers=api.headers()).json()["data"]))


def read_offline_run(run_file: Path) -> dict[str, Any]:
    """The records of an offline run's .wandb file, read with the wandb package's own
    reader (its data store and record protocol)."""
    from wandb.proto import wandb_internal_pb2
    from wandb.sdk.internal import datastore

    store = datastore.DataStore()
    store.open_for_scan(str(run_file))
    found: dict[str, Any] = {"history": []}
    while (data := store.scan_data()) is not None:
        record = wandb_internal_pb2.Record()
        record.ParseFromString(data)
        kind = record.WhichOneof("record_type")
        if kind == "history":
            found["history"].append(
                {
                    item.key or "/".join(item.nested_key): json.loads(item.value_json)
                    for item in record.history.item
                }
            )
        elif kind in ("run", "exit"):
            found[kind] = getattr(record, kind)
    return found


def test_an_offline_wandb_run_holds_the_jobs_metrics_across_a_resume(
    api: Api, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A metrics event every step; each step slowed, so the job is paused half way.
    monkeypatch.setenv("TUNEHOUSE_DEBUG_STEP_DELAY_SECONDS", "0.5")
    job_id = create_job(api, n_epochs=4, eval_every_steps=1)  # 8 steps
    first = threading.Thread(target=supervisor.supervise_job, args=(api.settings, job_id))
    first.start()
    wait_until(
        lambda: any(e["type"] == "metrics" for e in events_of(api, job_id)),
        120, interval=0.1, what="the first metrics event",
    )  # fmt: skip
    paused = api.client.post(f"/v1/fine_tuning/jobs/{job_id}/pause", headers=api.headers())
    assert paused.status_code == 200, paused.text
    first.join(timeout=120)
    assert job_of(api, job_id)["status"] == "paused"
    resumed = api.client.post(f"/v1/fine_tuning/jobs/{job_id}/resume", headers=api.headers())
    assert resumed.status_code == 200, resumed.text
    supervisor.supervise_job(api.settings, job_id)

    job, events = job_of(api, job_id), events_of(api, job_id)
    assert job["status"] == "succeeded", job["error"]
    assert job["attempt"] == 2
    assert job["integrations"] == [{"type": "wandb", "wandb": {**WANDB, "entity": None}}]
    assert not [e for e in events if e["level"] != "info"], events
    metrics = [e["data"] for e in events if e["type"] == "metrics"]
    assert len(metrics) == job["total_steps"]

    # One run per training process, both the job's (offline, W&B starts a new one for the
    # same id; synced, they are one run), under the data directory.
    runs = sorted((api.settings.data_dir / "wandb" / "wandb").glob(f"offline-run-*-{job_id}"))
    assert len(runs) == 2, runs
    logged = [read_offline_run(run / f"run-{job_id}.wandb") for run in runs]
    for part in logged:
        run = part["run"]
        assert run.run_id == job_id and run.display_name == "tiny-run"
        assert run.project == WANDB["project"]
        assert list(run.tags) == WANDB["tags"]
        config = {item.key: json.loads(item.value_json) for item in run.config.update}
        for name in ("n_epochs", "batch_size", "learning_rate", "eval_every_steps"):
            assert config[name] == job["hyperparameters"][name], name
        assert config["model"] == TINY and config["seed"] == job["seed"]
        assert part["exit"].exit_code == 0  # finished: paused, then succeeded
        assert part["history"], "each process logged metrics"

    # Every metrics event, logged as the job recorded it, in order.
    history = [
        {k: v for k, v in row.items() if not k.startswith("_")}
        for part in logged
        for row in part["history"]
    ]
    assert history == metrics
    assert {"step", "train_loss", "learning_rate", "tokens_per_second"} <= set(history[-1])
    assert {"valid_loss", "valid_mean_token_accuracy"} <= set(history[-1])


def test_a_wandb_failure_never_fails_the_job(api: Api, monkeypatch: pytest.MonkeyPatch) -> None:
    # Configured for the API (a key), but W&B cannot start a run in the training process.
    monkeypatch.setenv("WANDB_API_KEY", "not-a-real-key")
    monkeypatch.setenv("WANDB_MODE", "no-such-mode")
    job_id = create_job(api)
    supervisor.supervise_job(api.settings, job_id)
    job, events = job_of(api, job_id), events_of(api, job_id)
    assert job["status"] == "succeeded", job["error"]
    warnings = [e["message"] for e in events if e["level"] == "warn"]
    assert len(warnings) == 1 and "W&B logging is off for this job" in warnings[0], warnings
    assert any(e["type"] == "metrics" for e in events)
    assert not list(api.settings.data_dir.rglob("offline-run-*"))
