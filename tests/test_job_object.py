"""The job object as OpenAI's: metadata filters in jobs.list (SQLite and PostgreSQL),
integrations in OpenAI's shape (a wandb one refused without the wandb package or its
configuration), checkpoint metrics with OpenAI's full key set, and the seed a job's trainer
gets."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from openai import BadRequestError, OpenAI
from openai.types.fine_tuning import FineTuningJob
from sqlalchemy import insert

from app.core.db import session_scope
from app.core.ids import new_id
from app.models import Checkpoint, File, Job
from app.services import integrations, jobs, keys
from tests.conftest import Api, in_process_api
from tests.support import BASE_MODEL, jsonl, sentiment_rows


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    """One in-process app for the module (conftest's api fixture, shared)."""
    with in_process_api(tmp_path_factory.mktemp("job-object") / "data") as api:
        yield api


@pytest.fixture(scope="module")
def client(api: Api) -> OpenAI:
    return OpenAI(base_url="http://testserver/v1", api_key=api.key_a, http_client=api.client)


@pytest.fixture(scope="module")
def training_file(client: OpenAI) -> str:
    return client.files.create(
        file=("train.jsonl", jsonl(sentiment_rows(20, seed=1))), purpose="fine-tune"
    ).id


def create(client: OpenAI, training_file: str, **body: Any) -> FineTuningJob:
    return client.fine_tuning.jobs.create(model=BASE_MODEL, training_file=training_file, **body)


def error_of(api: Api, response: Any) -> dict[str, Any]:
    assert response.status_code == 400, response.text
    error: dict[str, Any] = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    return error


def test_metadata_filters_through_the_sdk(api: Api, client: OpenAI, training_file: str) -> None:
    red1 = create(client, training_file, metadata={"flt": "red", "tier": "1"})
    red = create(client, training_file, metadata={"flt": "red"})
    odd = create(client, training_file, metadata={"flt": "blue", 'we"ird]': "", "n": "1"})
    bare = create(client, training_file)

    def listed(**params: Any) -> list[str]:
        return [j.id for j in client.fine_tuning.jobs.list(**params)]

    assert listed(metadata={"flt": "red"}) == [red.id, red1.id]
    assert listed(metadata={"flt": "red", "tier": "1"}) == [red1.id]
    assert listed(metadata={"flt": "red", "tier": "2"}) == []
    assert listed(metadata={"n": "1"}) == [odd.id]  # a string, never the number 1
    # A key with a quote and a bracket (SQLite's JSON paths cannot name it); an empty value.
    assert listed(metadata={"flt": "blue", 'we"ird]': ""}) == [odd.id]
    assert listed(metadata={"flt": "blue", 'we"ird]': "x"}) == []
    # Paging keeps the filter.
    first = client.fine_tuning.jobs.list(metadata={"flt": "red"}, limit=1)
    assert [j.id for j in first.data] == [red.id] and first.has_more
    assert [j.id for j in first.get_next_page().data] == [red1.id]
    # metadata=null: the jobs created without metadata, here and nowhere else.
    nulls = api.client.get("/v1/fine_tuning/jobs?metadata=null", headers=api.headers()).json()
    assert bare.id in [j["id"] for j in nulls["data"]]
    assert all(j["metadata"] is None for j in nulls["data"])
    theirs = api.client.get(
        "/v1/fine_tuning/jobs?metadata[flt]=red", headers=api.headers(api.key_b)
    )
    assert theirs.json()["data"] == []

    for query in (
        "metadata=red",
        "metadata[]=x",
        "metadata[a][b]=x",
        "metadata[flt=x",
        "metadata[flt]=red&metadata[flt]=blue",
        "metadata=null&metadata[flt]=red",
    ):
        response = api.client.get(f"/v1/fine_tuning/jobs?{query}", headers=api.headers())
        assert error_of(api, response)["param"] == "metadata", query


def test_metadata_filter_is_stated_in_openapi(api: Api) -> None:
    operation = api.client.get("/openapi.json").json()["paths"]["/v1/fine_tuning/jobs"]["get"]
    (parameter,) = [p for p in operation["parameters"] if p["name"] == "metadata"]
    assert parameter["style"] == "deepObject" and parameter["in"] == "query"
    assert parameter["schema"]["anyOf"][0]["maxProperties"] == 16
    assert "400" in operation["responses"]


def seed_jobs(url: str, metadata: list[dict[str, str] | None]) -> tuple[Any, list[str], str]:
    """One job of organization acme for each of ``metadata``; returns the organization, the
    job ids and their training file's id."""
    with session_scope(url) as session:
        org = keys.get_or_create_organization(session, "acme")
        file = File(
            id=new_id("file"),
            organization_id=org.id,
            filename="t.jsonl",
            purpose="fine-tune",
            bytes=1,
            sha256="0" * 64,
            storage_path="files/x",
        )
        session.add(file)
        session.flush()
        ids = [new_id("ftjob") for _ in metadata]
        for job_id, meta in zip(ids, metadata, strict=True):
            session.add(
                Job(
                    id=job_id,
                    organization_id=org.id,
                    model=BASE_MODEL,
                    task="classification",
                    training_file=file.id,
                    status=jobs.QUEUED,
                    hyperparameters={},
                    method={},
                    seed=0,
                    integrations=[],
                    result_files=[],
                    metadata_=meta,
                )
            )
            session.flush()
        session.expunge(org)
        file_id = file.id
    return org, ids, file_id


def test_metadata_filter_in_sql(database_url: str) -> None:
    """The same answers on SQLite (json_each) and PostgreSQL (->>), with SQL NULL as well."""
    org, ids, file_id = seed_jobs(
        database_url, [{"k": "v", 'q"': "1"}, {"k": "v"}, {"k": "w"}, None, {}]
    )
    with session_scope(database_url) as session:
        session.execute(
            insert(Job).values(  # SQL NULL, not JSON null
                id="ftjob-sqlnull",
                organization_id=org.id,
                model=BASE_MODEL,
                task="classification",
                training_file=file_id,
                status=jobs.QUEUED,
                hyperparameters={},
                method={},
                seed=0,
                integrations=[],
                result_files=[],
                steps_completed=0,
                attempt=0,
                crash_count=0,
            )
        )

        def ids_of(**kw: Any) -> set[str]:
            rows, _ = jobs.list_jobs(session, org, limit=100, after=None, **kw)
            return {j.id for j in rows}

        assert ids_of(metadata={"k": "v"}) == {ids[0], ids[1]}
        assert ids_of(metadata={"k": "v", 'q"': "1"}) == {ids[0]}
        assert ids_of(metadata={'q"': "2"}) == set()
        assert ids_of(null_metadata=True) == {ids[3], "ftjob-sqlnull"}
        assert len(ids_of()) == 6


def test_integrations_shape_and_wandb_refusal(
    api: Api,
    client: OpenAI,
    training_file: str,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    wandb = {"type": "wandb", "wandb": {"project": "p", "name": "run", "tags": ["a"]}}
    # Without the wandb package, or with it but W&B not configured (no WANDB_API_KEY, no
    # WANDB_MODE=offline, no ~/.netrc login): a clear 400 that says which, and no job.
    for name in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_BASE_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    for installed, says in ((False, "pip install wandb"), (True, "set WANDB_API_KEY")):
        monkeypatch.setattr(integrations, "wandb_installed", lambda installed=installed: installed)
        with pytest.raises(BadRequestError) as refused:
            create(client, training_file, integrations=[wandb], metadata={"flt": "wandb"})
        assert refused.value.param == "integrations.0"
        assert refused.value.code == "integration_unavailable"
        assert says in refused.value.message
    assert not list(client.fine_tuning.jobs.list(metadata={"flt": "wandb"}))

    for bad, param in (
        ({"type": "slack", "wandb": {"project": "p"}}, "integrations.0.type"),
        ({"type": "wandb"}, "integrations.0.wandb"),
        ({"type": "wandb", "wandb": {}}, "integrations.0.wandb.project"),
        ({"type": "wandb", "wandb": {"project": ""}}, "integrations.0.wandb.project"),
        ({"type": "wandb", "wandb": {"project": "p", "tags": [""]}}, "integrations.0.wandb.tags.0"),
        ({"type": "wandb", "wandb": {"project": "p", "team": "x"}}, "integrations.0.wandb.team"),
    ):
        response = api.client.post(
            "/v1/fine_tuning/jobs",
            headers=api.headers(),
            json={"model": BASE_MODEL, "training_file": training_file, "integrations": [bad]},
        )
        assert error_of(api, response)["param"] == param, (bad, response.text)

    # Where wandb is installed and configured, the integration is stored and returned as OpenAI
    # returns it (tests/test_wandb.py: its run).
    monkeypatch.setenv("WANDB_MODE", "offline")
    job = create(client, training_file, integrations=[wandb])
    for seen in (job, client.fine_tuning.jobs.retrieve(job.id)):
        assert seen.integrations is not None
        (integration,) = seen.integrations
        assert integration.type == "wandb"
        assert integration.wandb.project == "p" and integration.wandb.tags == ["a"]
        assert integration.wandb.entity is None
    assert create(client, training_file).integrations == []


OPENAI_METRICS = (
    "step",
    "train_loss",
    "train_mean_token_accuracy",
    "valid_loss",
    "valid_mean_token_accuracy",
    "full_valid_loss",
    "full_valid_mean_token_accuracy",
)


def test_checkpoint_metrics_have_openais_keys(api: Api, client: OpenAI, training_file: str) -> None:
    job = create(client, training_file)
    stored = {  # what the trainer records: a classifier at an evaluated step, and a bare step
        4: {"step": 4, "train_loss": 0.5, "valid_loss": 0.25, "valid_accuracy": 0.75},
        2: {"step": 2},
    }
    with session_scope(api.settings.sqlalchemy_url) as session:
        for step, metrics in stored.items():
            session.add(
                Checkpoint(
                    id=new_id("ftckpt"),
                    job_id=job.id,
                    step_number=step,
                    metrics=metrics,
                    storage_path=f"checkpoints/x/step-{step}",
                )
            )
    # Every key is sent (null where not measured), and reads back through the SDK's types.
    url = f"/v1/fine_tuning/jobs/{job.id}/checkpoints"
    raw = {
        c["step_number"]: c["metrics"]
        for c in api.client.get(url, headers=api.headers()).json()["data"]
    }
    assert raw[2] == {k: 2 if k == "step" else None for k in OPENAI_METRICS}
    assert raw[4] == {
        "step": 4,
        "train_loss": 0.5,
        "train_mean_token_accuracy": None,
        "valid_loss": 0.25,
        "valid_mean_token_accuracy": 0.75,
        "full_valid_loss": 0.25,
        "full_valid_mean_token_accuracy": 0.75,
        "valid_accuracy": 0.75,  # as the trainer stored it
    }
    by_step = {c.step_number: c.metrics for c in client.fine_tuning.jobs.checkpoints.list(job.id)}
    assert by_step[4].full_valid_mean_token_accuracy == 0.75 and by_step[2].train_loss is None


def test_the_trainer_gets_the_jobs_seed(api: Api, client: OpenAI, training_file: str) -> None:
    """The job path of `seed`: what the runner hands the training loop (tests/training/
    test_loop.py: the same seed and data give the same weights)."""
    from worker.runner import _spec

    job = create(client, training_file, seed=4321)
    assert job.seed == 4321
    assert _spec(api.settings, job.id, "worker-1:attempt").seed == 4321
