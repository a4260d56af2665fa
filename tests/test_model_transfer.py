"""Weights you can take away: GET /v1/models/{model}/content streams a model's directory as a
tar; POST /v1/models (admin keys) takes such a tar in as a base model of the organization, on
another installation, where it answers the same greedy completions. Bad archives are refused
with a 400 and leave nothing behind."""

from __future__ import annotations

import io
import json
import tarfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from app.core.db import session_scope
from app.core.migrate import upgrade
from app.core.settings import Settings
from app.main import create_app
from app.models import FineTunedModel
from app.services import keys
from tests.conftest import make_settings
from tests.inference_support import TEXTS
from tests.tiny_models import build_causal_lm

PROMPTS = ["once upon a time", "the quick brown"]


@dataclass
class Server:
    client: TestClient
    settings: Settings
    admin: str  # an admin key of organization "acme"
    member: str  # a plain key of "acme"
    other: str  # a key of another organization

    def auth(self, key: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {key}"}

    def complete(self, model: str, prompt: str) -> str:
        response = self.client.post(
            "/v1/completions",
            headers=self.auth(self.member),
            json={"model": model, "prompt": prompt, "max_tokens": 8, "temperature": 0},
        )
        assert response.status_code == 200, response.text
        return str(response.json()["choices"][0]["text"])

    def stored(self) -> list[str]:
        root = self.settings.storage_root
        return sorted(str(p.relative_to(root)) for p in root.rglob("*") if "tmp" not in p.parts)


@contextmanager
def _server(data_dir: Path, **overrides: object) -> Iterator[Server]:
    settings = make_settings(data_dir, **overrides)
    upgrade(settings.sqlalchemy_url)
    with session_scope(settings.sqlalchemy_url) as session:
        admin = keys.create_key(session, "acme", admin=True).key
        member = keys.create_key(session, "acme").key
        other = keys.create_key(session, "other-org").key
    with TestClient(create_app(settings)) as client:
        yield Server(client, settings, admin, member, other)


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_causal_lm(
        tmp_path_factory.mktemp("tiny") / "tiny-llama", TEXTS, hidden_size=32, max_positions=32
    )


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory, tiny_base: Path) -> Iterator[Server]:
    """The first installation, with a fine-tuned model of acme's (weights unlike the base's)."""
    data = tmp_path_factory.mktemp("source")
    with _server(data / "data", base_models={"tiny-llama": str(tiny_base)}) as server:
        tuned = server.settings.storage_root / "models" / "ftjob-tuned"
        build_causal_lm(tuned, TEXTS, hidden_size=32, max_positions=32, seed=7)
        with session_scope(server.settings.sqlalchemy_url) as session:
            org = keys.get_or_create_organization(session, "acme")
            session.add(
                FineTunedModel(
                    id=TUNED, organization_id=org.id, task="causal-lm", base_model="tiny-llama",
                    job_id="ftjob-tuned", storage_path="models/ftjob-tuned",
                )
            )  # fmt: skip
        yield server


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A second installation, with no base model of its own."""
    with _server(tmp_path_factory.mktemp("target") / "data") as server:
        yield server


TUNED = "ft:tiny-llama:acme:tuned:00000007"


def _tar(entries: dict[str, bytes], links: dict[str, str] | None = None) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        for name, data in entries.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
        for name, to in (links or {}).items():
            info = tarfile.TarInfo(name)
            info.type, info.linkname = tarfile.SYMTYPE, to
            archive.addfile(info)
    return buffer.getvalue()


def _upload(server: Server, body: bytes, key: str, name: str | None = None) -> Any:
    return server.client.post(
        "/v1/models",
        headers=server.auth(key),
        files={"file": ("model.tar", body, "application/x-tar")},
        data={"model": name} if name else {},
    )


def test_a_model_downloaded_from_one_server_answers_the_same_on_another(
    source: Server, target: Server
) -> None:
    response = source.client.get(f"/v1/models/{TUNED}/content", headers=source.auth(source.member))
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/x-tar"
    with tarfile.open(fileobj=io.BytesIO(response.content)) as archive:
        names = set(archive.getnames())
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= names

    uploaded = _upload(target, response.content, target.admin, name="tuned")
    assert uploaded.status_code == 200, uploaded.text
    model = uploaded.json()
    assert model["id"] == "uploaded:acme/tuned" and model["task"] == "causal-lm"
    listed = target.client.get("/v1/models", headers=target.auth(target.member)).json()
    assert model["id"] in [m["id"] for m in listed["data"]]

    for prompt in PROMPTS:
        assert target.complete(model["id"], prompt) == source.complete(TUNED, prompt)
    # The same tar again: the name is taken.
    again = _upload(target, response.content, target.admin, name="tuned")
    assert again.status_code == 409, again.text
    # Another organization neither sees nor downloads it.
    denied = target.client.get(
        f"/v1/models/{model['id']}/content", headers=target.auth(target.other)
    )
    assert denied.status_code == 404 and denied.json()["error"]["code"] == "model_not_found"


def test_another_organizations_model_is_not_found(source: Server) -> None:
    response = source.client.get(f"/v1/models/{TUNED}/content", headers=source.auth(source.other))
    assert response.status_code == 404
    assert response.json()["error"]["param"] == "model"


def test_only_an_admin_key_uploads(source: Server, target: Server) -> None:
    body = source.client.get(f"/v1/models/{TUNED}/content", headers=source.auth(source.member))
    response = _upload(target, body.content, target.member, name="by-member")
    assert response.status_code == 403, response.text
    assert "error" in response.json()


def test_bad_archives_are_refused_and_nothing_is_stored(tiny_base: Path, target: Server) -> None:
    config = (tiny_base / "config.json").read_bytes()
    weights = (tiny_base / "model.safetensors").read_bytes()
    good = {"config.json": config, "model.safetensors": weights}
    bad = {  # what the archive holds -> a word of the refusal
        "pickle": _tar({**good, "pytorch_model.bin": b"\x80\x04K\x01."}),
        "link": _tar(good, links={"tokenizer.json": "../../../etc/passwd"}),
        "inside the model directory": _tar({**good, "../escape.json": b"{}"}),
        "not a path inside": _tar({**good, "/tmp/escape.json": b"{}"}),
        "config.json": _tar({"model.safetensors": weights}),
        "no safetensors": _tar({"config.json": config}),
        "not a valid safetensors": _tar({"config.json": config, "model.safetensors": b"nope"}),
        "not a readable tar": b"plain text, not an archive",
    }
    before = target.stored()
    for what, body in bad.items():
        response = _upload(target, body, target.admin, name="bad")
        assert response.status_code == 400, (what, response.text)
        assert what in response.json()["error"]["message"], response.text
    assert target.stored() == before
    assert not list(target.settings.storage_root.glob("tmp/*"))
    listed = target.client.get("/v1/models", headers=target.auth(target.admin)).json()
    assert "uploaded:acme/bad" not in [m["id"] for m in listed["data"]]


def test_an_upload_past_the_storage_quota_is_refused_unread(
    tmp_path: Path, tiny_base: Path
) -> None:
    body = _tar({n: (tiny_base / n).read_bytes() for n in ("config.json", "model.safetensors")})
    with _server(tmp_path / "data", storage_quota_bytes=len(body) // 2) as server:
        before = server.stored()
        response = _upload(server, body, server.admin, name="too-big")
        assert response.status_code == 413, response.text
        assert "quota" in response.json()["error"]["message"], response.text
        assert server.stored() == before


def test_openapi_states_the_routes(source: Server) -> None:
    paths = source.client.get("/openapi.json").json()["paths"]
    content = paths["/v1/models/{model}/content"]["get"]["responses"]["200"]["content"]
    assert "application/x-tar" in content
    upload = paths["/v1/models"]["post"]
    assert {"400", "403", "413"} <= set(upload["responses"])


def _training_file(server: Server, key: str) -> str:
    rows = [
        {"prompt": "once upon", "completion": " a time"},
        {"prompt": "the quick", "completion": " fox"},
    ]
    body = "".join(json.dumps(row) + "\n" for row in rows).encode()
    response = server.client.post(
        "/v1/files",
        headers=server.auth(key),
        files={"file": ("train.jsonl", body, "application/octet-stream")},
        data={"purpose": "fine-tune"},
    )
    assert response.status_code == 200, response.text
    return str(response.json()["id"])


def test_an_uploaded_model_is_a_base_for_its_organizations_jobs(
    tiny_base: Path, target: Server
) -> None:
    archive = io.BytesIO()
    with tarfile.open(fileobj=archive, mode="w:gz") as tar:
        tar.add(tiny_base, arcname="tiny-base")  # a top-level directory names the model
    uploaded = _upload(target, archive.getvalue(), target.admin)
    assert uploaded.status_code == 200, uploaded.text
    model = uploaded.json()["id"]
    assert model == "uploaded:acme/tiny-base"

    job = target.client.post(
        "/v1/fine_tuning/jobs",
        headers=target.auth(target.member),
        json={"model": model, "training_file": _training_file(target, target.member)},
    )
    assert job.status_code == 200, job.text
    assert job.json()["model"] == model
    refused = target.client.post(
        "/v1/fine_tuning/jobs",
        headers=target.auth(target.other),
        json={"model": model, "training_file": _training_file(target, target.other)},
    )
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "model"
