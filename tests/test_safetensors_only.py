"""Models load from safetensors only (design rule 4). A pickle payload disguised as weights causes
no side effect and is refused: as a registered base model (listing, job creation, predictions,
completions) and as a fine-tuned model (predictions). trust_remote_code is never set, torch.load
only runs with weights_only=True, and a base model outside the registry is refused."""

from __future__ import annotations

import ast
import json
import pickle
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from app.core.db import session_scope
from app.core.migrate import upgrade
from app.main import create_app
from app.models import FineTunedModel, Job, Organization
from app.services import keys
from tests.conftest import Api, make_settings
from tests.support import ROOT, jsonl
from tests.tiny_models import build_causal_lm

TEXTS = ["the capital of france is paris", "two plus two is four", "hello there"]
CHAT = [
    {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
    for q, a in [("capital of france?", "Paris."), ("two plus two?", "Four.")] * 5
]


class CreatesMarker:
    """Unpickling this opens (creates) ``marker``: what a hostile weights file could do."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def payload(marker: Path) -> bytes:
    return pickle.dumps(CreatesMarker(marker))


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_causal_lm(tmp_path_factory.mktemp("tiny") / "model", TEXTS, layers=1)


def disguised(tiny_model: Path, target: Path, marker: Path, how: str) -> Path:
    """A copy of the tiny model whose weights are the payload, in one of three disguises."""
    shutil.copytree(tiny_model, target)
    if how == "pytorch_model.bin":  # pickle weights instead of safetensors
        (target / "model.safetensors").unlink()
        (target / "pytorch_model.bin").write_bytes(payload(marker))
    elif how == "fake model.safetensors":  # a pickle under the safetensors name
        (target / "model.safetensors").write_bytes(payload(marker))
    elif how == "beside real safetensors":  # the real weights, and a pickle a loader may prefer
        (target / "pytorch_model.bin").write_bytes(payload(marker))
    elif how == "remote code":
        config = json.loads((target / "config.json").read_text())
        config["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}
        (target / "config.json").write_text(json.dumps(config))
    return target


DISGUISES = {
    "pytorch_model.bin": "pickle weights (pytorch_model.bin)",
    "fake model.safetensors": "model.safetensors is not a valid safetensors file",
    "beside real safetensors": "pickle weights (pytorch_model.bin)",
    "remote code": "custom code (auto_map)",
}


@pytest.fixture
def marker(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "marker"
    yield path
    assert not path.exists(), "a pickle in a model directory was unpickled"


@pytest.fixture
def evil_api(tmp_path: Path, tiny_model: Path, marker: Path) -> Iterator[Api]:
    """An in-process API whose registry holds the tiny model as 'tiny/good' and each disguise
    as 'evil/<disguise>'."""
    bases = {"tiny/good": tiny_model}
    for i, how in enumerate(DISGUISES):
        bases[f"evil/{how}"] = disguised(tiny_model, tmp_path / "bases" / str(i), marker, how)
    settings = make_settings(tmp_path / "data", base_models=bases)
    upgrade(settings.sqlalchemy_url)
    with session_scope(settings.sqlalchemy_url) as session:
        key = keys.create_key(session, "org-a").key
    with TestClient(create_app(settings)) as client:
        yield Api(client, settings, key, key)


def test_the_payload_is_live(tmp_path: Path) -> None:
    """The check that the tests below mean something: plain unpickling does create the marker."""
    proof = tmp_path / "proof"
    pickle.loads(payload(proof)).close()
    assert proof.exists()


def assert_refused(response, words: str) -> None:
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == "model"
    assert error["type"] == "invalid_request_error"
    assert words in error["message"], error["message"]


def job_count(api: Api) -> int:
    with session_scope(api.settings.sqlalchemy_url) as session:
        return int(session.scalar(select(func.count()).select_from(Job)) or 0)


@pytest.mark.parametrize("how", list(DISGUISES))
def test_a_disguised_base_model_is_refused(evil_api: Api, marker: Path, how: str) -> None:
    api, model = evil_api, f"evil/{how}"
    listed = api.client.get("/v1/models", headers=api.headers()).json()["data"]
    tasks = {m["id"]: m["task"] for m in listed}
    assert tasks["tiny/good"] == "causal-lm"
    assert tasks[model] is None  # listed, but not usable

    upload = api.client.post(
        "/v1/files",
        headers=api.headers(),
        files={"file": ("chat.jsonl", jsonl(CHAT), "application/octet-stream")},
        data={"purpose": "fine-tune"},
    )
    assert upload.status_code == 200, upload.text
    body = {"model": model, "training_file": upload.json()["id"]}
    response = api.client.post("/v1/fine_tuning/jobs", headers=api.headers(), json=body)
    assert_refused(response, DISGUISES[how])
    assert job_count(api) == 0
    response = api.client.post(
        "/v1/predictions", headers=api.headers(), json={"model": model, "input": "hello"}
    )
    assert_refused(response, DISGUISES[how])
    chat = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    response = api.client.post("/v1/chat/completions", headers=api.headers(), json=chat)
    assert_refused(response, DISGUISES[how])
    # The same job with the real tiny model is accepted.
    body["model"] = "tiny/good"
    response = api.client.post("/v1/fine_tuning/jobs", headers=api.headers(), json=body)
    assert response.status_code == 200, response.text


@pytest.mark.parametrize("how", list(DISGUISES))
def test_a_disguised_fine_tuned_model_is_refused(
    evil_api: Api, tiny_model: Path, marker: Path, how: str
) -> None:
    api = evil_api
    root = api.settings.storage_root
    model_dir = disguised(tiny_model, root / "models" / "ftjob-evil", marker, how)
    model_id = "ft:tiny/good:org-a::evil"
    with session_scope(api.settings.sqlalchemy_url) as session:
        org = session.scalar(select(Organization).where(Organization.name == "org-a"))
        assert org is not None
        session.add(
            FineTunedModel(
                id=model_id,
                organization_id=org.id,
                task="chat",
                base_model="tiny/good",
                job_id="ftjob-evil",
                storage_path=str(model_dir.relative_to(root)),
            )
        )
    retrieved = api.client.get(f"/v1/models/{model_id}", headers=api.headers())
    assert retrieved.status_code == 200, retrieved.text
    response = api.client.post(
        "/v1/predictions", headers=api.headers(), json={"model": model_id, "input": "hello"}
    )
    assert_refused(response, DISGUISES[how])
    chat = {"model": model_id, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    response = api.client.post("/v1/chat/completions", headers=api.headers(), json=chat)
    assert_refused(response, DISGUISES[how])


def test_the_training_process_refuses_a_disguised_base(
    tmp_path: Path, tiny_model: Path, marker: Path
) -> None:
    """A base that became unsafe after its job was accepted fails the job in words."""
    from worker.training.spec import TrainingSpec

    base = disguised(tiny_model, tmp_path / "base", marker, "pytorch_model.bin")
    spec = TrainingSpec(
        job_id="ftjob-x",
        task="chat",
        base_model_dir=base,
        training_file=tmp_path / "train.jsonl",
        validation_file=None,
        output_dir=tmp_path / "out",
        checkpoints_dir=tmp_path / "ckpt",
        hyperparameters={},
        seed=0,
    )
    with pytest.raises(ValueError, match=r"pickle weights \(pytorch_model.bin\)"):
        spec.require_base_model_dir()


def test_a_base_model_outside_the_registry_is_refused(evil_api: Api) -> None:
    api = evil_api
    upload = api.client.post(
        "/v1/files",
        headers=api.headers(),
        files={"file": ("chat.jsonl", jsonl(CHAT), "application/octet-stream")},
        data={"purpose": "fine-tune"},
    )
    for model in ("gpt2", "evil/not-registered", str(ROOT)):
        body = {"model": model, "training_file": upload.json()["id"]}
        response = api.client.post("/v1/fine_tuning/jobs", headers=api.headers(), json=body)
        assert_refused(response, "not available for fine-tuning")
    assert job_count(api) == 0


def _python_sources() -> list[Path]:
    return sorted([*(ROOT / "app").rglob("*.py"), *(ROOT / "worker").rglob("*.py")])


def test_no_code_sets_trust_remote_code() -> None:
    for path in _python_sources():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.keyword):
                assert node.arg != "trust_remote_code", f"{path}:{node.value.lineno}"


def test_torch_load_only_with_weights_only() -> None:
    calls = 0
    for path in _python_sources():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(node, ast.Call):
                continue
            func = node.func
            if isinstance(func, ast.Attribute) and func.attr == "load":
                owner = func.value
                if isinstance(owner, ast.Name) and owner.id == "torch":
                    calls += 1
                    weights_only = {k.arg: k.value for k in node.keywords}.get("weights_only")
                    assert isinstance(weights_only, ast.Constant), f"{path}:{node.lineno}"
                    assert weights_only.value is True, f"{path}:{node.lineno}"
    assert calls >= 1  # the checkpoint loader
