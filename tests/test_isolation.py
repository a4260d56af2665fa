"""Organization isolation (design rule 5): every object of organization A — file, job, event,
checkpoint, fine-tuned model, API key — is, to organization B, exactly what an object that does
not exist is: a 404 on every route that takes its id (the same answer as for a made-up id),
refused as input to fine-tuning and inference, and absent from every list.

The routes with an id in their path are read from the app itself, so a route added later is in
the matrix without editing this file (a new kind of id fails the test until it is added)."""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import select

from app.core.db import session_scope
from app.core.ids import new_id
from app.models import ApiKey, Checkpoint, FineTunedModel, JobEvent, Organization
from app.services import keys
from tests.support import BASE_MODEL
from tests.test_bad_input import assert_error, good_file
from tests.tiny_models import build_causal_lm

TEXTS = ["hello there, a tiny model answers", "isolation keeps each organization apart"] * 5
STEP = 5


@dataclass
class Objects:
    """One organization's objects, and an admin key that reaches all of its routes."""

    org_id: str
    key: str
    file: str
    job: str
    events: list[str]
    checkpoint: str  # the checkpoint row's id (ftckpt-…)
    model: str
    checkpoint_model: str  # the checkpoint as a model id ({model}:ckpt-step-N)
    key_id: str

    def ids(self) -> list[str]:
        return [self.org_id, self.file, self.job, *self.events, self.checkpoint, self.model,
                self.checkpoint_model, self.key_id]  # fmt: skip


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_causal_lm(tmp_path_factory.mktemp("tiny") / "tiny-llama", TEXTS)


def make_objects(api, organization: str, model_dir: Path) -> Objects:
    """A file and a job through the API; the job's checkpoint and fine-tuned model as rows
    pointing at a tiny saved model, as a finished training run would leave them."""
    with session_scope(api.settings.sqlalchemy_url) as session:
        new = keys.create_key(session, organization, name="admin", admin=True)
        key, key_id, org_id = new.key, new.record.id, new.organization.id
    headers = {"Authorization": f"Bearer {key}"}
    file = good_file(api, key=key)
    job = api.client.post(
        "/v1/fine_tuning/jobs",
        headers=headers,
        json={"model": BASE_MODEL, "training_file": file, "suffix": organization},
    )
    assert job.status_code == 200, job.text
    job_id = job.json()["id"]
    model = f"ft:tiny-llama:{organization}:{organization}:{job_id.split('-', 1)[1][:8]}"
    storage = api.settings.storage_root
    shutil.copytree(model_dir, storage / "models" / job_id)
    shutil.copytree(model_dir, storage / "checkpoints" / job_id / f"step-{STEP}")
    with session_scope(api.settings.sqlalchemy_url) as session:
        checkpoint = Checkpoint(
            id=new_id("ftckpt"), job_id=job_id, step_number=STEP, metrics={"train_loss": 1.0},
            storage_path=f"checkpoints/{job_id}/step-{STEP}",
        )  # fmt: skip
        session.add(checkpoint)
        session.add(
            FineTunedModel(
                id=model, organization_id=org_id, task="causal-lm", base_model="tiny-llama",
                job_id=job_id, storage_path=f"models/{job_id}",
            )
        )  # fmt: skip
        checkpoint_id = checkpoint.id
        events = list(session.scalars(select(JobEvent.id).where(JobEvent.job_id == job_id)))
    assert events
    return Objects(
        org_id=org_id, key=key, file=file, job=job_id, events=events, checkpoint=checkpoint_id,
        model=model, checkpoint_model=f"{model}:ckpt-step-{STEP}", key_id=key_id,
    )  # fmt: skip


@pytest.fixture
def orgs(api, tiny_model: Path) -> tuple[Objects, Objects]:
    return make_objects(api, "org-a", tiny_model), make_objects(api, "org-b", tiny_model)


def id_params(a: Objects) -> dict[str, list[str]]:
    """Path parameter -> A's ids to put there."""
    return {
        "file_id": [a.file],
        "job_id": [a.job],
        "model": [a.model, a.checkpoint_model],
        "key_id": [a.key_id],
    }


# Ids shaped like A's, of nothing: what B gets for A's object must be what it gets for these.
GHOSTS = {
    "file_id": "file-000000000000000000000000",
    "job_id": "ftjob-000000000000000000000000",
    "model": "ft:tiny-llama:org-a:org-a:00000000",
    "key_id": "key-000000000000000000000000",
}


def id_routes(api) -> list[tuple[str, str]]:
    """(method, path template) of every API route with a path parameter, from the app's own
    OpenAPI description."""
    paths = api.client.get("/openapi.json").json()["paths"]
    return [
        (method.upper(), path)
        for path, operations in paths.items()
        if path.startswith("/v1") and "{" in path
        for method in operations
    ]


def fill(template: str, values: dict[str, str]) -> str:
    return re.sub(r"\{(\w+)\}", lambda m: values[m.group(1)], template)


def send(api, key: str, method: str, url: str, body: Any = None) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    content = b"" if body is None else None
    return api.client.request(method, url, headers=headers, json=body, content=content)


def assert_same_as_missing(response: httpx.Response, ghost: httpx.Response, real: str, fake: str):
    """B's answer for A's object is the answer for an object that does not exist."""
    assert response.status_code == ghost.status_code, response.text
    assert response.json() == ghost.json() or (
        response.json() == _swap(ghost.json(), fake, real)
    ), (response.text, ghost.text)


def _swap(value: Any, old: str, new: str) -> Any:
    if isinstance(value, dict):
        return {k: _swap(v, old, new) for k, v in value.items()}
    return value.replace(old, new) if isinstance(value, str) else value


def test_every_route_with_an_id_answers_404_for_another_organizations_object(
    api, orgs: tuple[Objects, Objects]
) -> None:
    a, b = orgs
    routes = id_routes(api)
    covered = {name for _, path in routes for name in re.findall(r"\{(\w+)", path)}
    assert covered <= set(id_params(a)), f"add these path parameters to the matrix: {covered}"
    assert len(routes) >= 11  # files ×3, jobs ×4+, models ×2, keys ×2: the matrix is not empty
    # Reads first, then actions (cancel, pause, resume), deletes last.
    order = {"GET": 0, "POST": 1, "DELETE": 2}
    for method, template in sorted(routes, key=lambda r: order.get(r[0], 3)):
        params = re.findall(r"\{(\w+)", template)
        for value in id_params(a)[params[0]]:
            url = fill(template, {params[0]: value})
            response = send(api, b.key, method, url)
            error = assert_error(response, 404)
            assert error["type"] == "not_found_error", (method, url, error)
            assert "no such route" not in error["message"], (method, url)
            ghost = send(api, b.key, method, fill(template, {params[0]: GHOSTS[params[0]]}))
            assert_same_as_missing(response, ghost, value, GHOSTS[params[0]])
    stream = send(api, b.key, "GET", f"/v1/fine_tuning/jobs/{a.job}/events?stream=true")
    assert_error(stream, 404)
    assert_owner_still_has_everything(api, a)


def test_another_organizations_objects_are_refused_as_input(
    api, orgs: tuple[Objects, Objects]
) -> None:
    a, b = orgs
    ghost_file, ghost_model = GHOSTS["file_id"], GHOSTS["model"]
    fine_tune = "/v1/fine_tuning/jobs"
    cases: list[tuple[str, dict[str, Any], str, str, int]] = [
        # Fine-tuning from another organization's file: as for a file that does not exist
        # (a 400 on `training_file`, as api-contract.md has it for a missing file).
        (fine_tune, {"model": BASE_MODEL, "training_file": a.file}, a.file, ghost_file, 400),
        (fine_tune, {"model": BASE_MODEL, "training_file": b.file, "validation_file": a.file},
         a.file, ghost_file, 400),
    ]  # fmt: skip
    for model in (a.model, a.checkpoint_model):
        cases += [
            # Continuing from another organization's model or checkpoint: as from one that
            # does not exist (404 model_not_found, app/services/lineage.py).
            (fine_tune, {"model": model, "training_file": b.file}, model, ghost_model, 404),
            ("/v1/predictions", {"model": model, "input": "hi"}, model, ghost_model, 404),
            ("/v1/embeddings", {"model": model, "input": "hi"}, model, ghost_model, 404),
            ("/v1/completions", {"model": model, "prompt": "hi", "max_tokens": 2},
             model, ghost_model, 404),
        ]  # fmt: skip
        for stream in (False, True):
            chat = {"model": model, "messages": [{"role": "user", "content": "hi"}],
                    "max_tokens": 2, "stream": stream}  # fmt: skip
            cases.append(("/v1/chat/completions", chat, model, ghost_model, 404))
    jobs_before = len(api.client.get(fine_tune, headers=api.headers(b.key)).json()["data"])
    for url, body, real, fake, status in cases:
        response = send(api, b.key, "POST", url, body)
        assert_error(response, status)
        ghost = send(api, b.key, "POST", url, _swap(body, real, fake))
        assert_same_as_missing(response, ghost, real, fake)
    jobs_after = len(api.client.get(fine_tune, headers=api.headers(b.key)).json()["data"])
    assert jobs_after == jobs_before  # no job was made from A's objects
    assert_owner_still_has_everything(api, a)


def test_lists_never_show_another_organizations_objects(api, orgs: tuple[Objects, Objects]) -> None:
    a, b = orgs
    own = {
        "/v1/files": b.file,
        "/v1/fine_tuning/jobs": b.job,
        f"/v1/fine_tuning/jobs/{b.job}/events": b.events[0],
        f"/v1/fine_tuning/jobs/{b.job}/checkpoints": b.checkpoint,
        "/v1/models": b.model,
        "/v1/organization/api_keys": b.key_id,
    }
    # A cursor taken from A's objects must not page into them either.
    cursors = {
        "/v1/files": a.file,
        "/v1/fine_tuning/jobs": a.job,
        f"/v1/fine_tuning/jobs/{b.job}/events": a.events[0],
        f"/v1/fine_tuning/jobs/{b.job}/checkpoints": a.checkpoint,
        "/v1/organization/api_keys": a.key_id,
    }
    for url, mine in own.items():
        listed = send(api, b.key, "GET", url)
        assert listed.status_code == 200, listed.text
        assert listed.json()["object"] == "list"
        assert mine in [item["id"] for item in listed.json()["data"]]  # the list works
        assert_mentions_none(listed, a)
    for url, cursor in cursors.items():
        paged = send(api, b.key, "GET", f"{url}?after={cursor}")
        if paged.status_code == 200:
            assert paged.json()["data"] == [], paged.text
        else:
            assert_error(paged, 404)
        assert_mentions_none(paged, a, but=cursor)
    # B's key listing names no key of A's, revoked or not, even after A makes another.
    send(api, a.key, "POST", "/v1/organization/api_keys", {"name": "later"})
    assert_mentions_none(send(api, b.key, "GET", "/v1/organization/api_keys"), a)


def assert_mentions_none(response: httpx.Response, a: Objects, but: str = "") -> None:
    leaked = [i for i in a.ids() if i != but and i in response.text]
    assert not leaked, f"{response.request.url} shows {leaked}: {response.text[:500]}"


def assert_owner_still_has_everything(api, a: Objects) -> None:
    """Nothing B did reached A: every object is there for its owner, the job not cancelled,
    the key not revoked, and the models still serve."""
    for url in (
        f"/v1/files/{a.file}",
        f"/v1/files/{a.file}/content",
        f"/v1/fine_tuning/jobs/{a.job}/events",
        f"/v1/fine_tuning/jobs/{a.job}/checkpoints",
        f"/v1/models/{a.model}",
        f"/v1/organization/api_keys/{a.key_id}",
    ):
        assert send(api, a.key, "GET", url).status_code == 200, url
    job = send(api, a.key, "GET", f"/v1/fine_tuning/jobs/{a.job}").json()
    assert job["status"] not in ("cancelled", "paused"), job
    for model in (a.model, a.checkpoint_model):
        body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
        answer = send(api, a.key, "POST", "/v1/chat/completions", body)
        assert answer.status_code == 200, answer.text
    with session_scope(api.settings.sqlalchemy_url) as session:
        key = session.get(ApiKey, a.key_id)
        assert key is not None and key.revoked_at is None
        assert session.get(Organization, a.org_id) is not None
