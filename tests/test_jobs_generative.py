"""Job creation for every task kind (app/services/jobs.py): which base model may learn which
training file, the LoRA adapter and the from-scratch architecture stored in the job's method,
and the per-task defaults; /v1/models lists each base model's kind. No worker runs here."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from app.core.db import session_scope
from app.core.migrate import upgrade
from app.main import create_app
from app.services import keys
from app.services.models import base_model_kind
from tests.conftest import Api, make_settings
from tests.support import BASE_MODEL, jsonl, sentiment_rows
from tests.test_bad_input import assert_error, changes_nothing

TINY = "tiny-llama"
MLP = "tunehouse/mlp"
CHAT = [
    {"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]}
    for i in range(12)
]
TABULAR = [{"features": [i, i % 3, 0.5], "label": str(i % 2)} for i in range(40)]


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.tiny_models import build_causal_lm

    texts = ["the quick brown fox jumps over the lazy dog", "q1 a1 q2 a2 hello world"]
    return build_causal_lm(tmp_path_factory.mktemp("bases") / "tiny", texts)


@pytest.fixture
def gen_api(tmp_path: Path, tiny_llama: Path) -> Iterator[Api]:
    """The `api` fixture, with a tiny causal LM registered as base model 'tiny-llama'."""
    settings = make_settings(tmp_path / "data", base_models={TINY: str(tiny_llama)})
    upgrade(settings.sqlalchemy_url)
    with session_scope(settings.sqlalchemy_url) as session:
        key_a = keys.create_key(session, "org-a").key
        key_b = keys.create_key(session, "org-b").key
    with TestClient(create_app(settings)) as client:
        yield Api(client, settings, key_a, key_b)


def upload(api: Api, content: bytes | list[dict[str, Any]], name: str = "train.jsonl") -> str:
    data = content if isinstance(content, bytes) else jsonl(content)
    response = api.client.post(
        "/v1/files",
        headers=api.headers(),
        files={"file": (name, data, "application/octet-stream")},
        data={"purpose": "fine-tune"},
    )
    assert response.status_code == 200, response.text
    return str(response.json()["id"])


def create(api: Api, model: str, file_id: str, **body: Any) -> Any:
    payload = {"model": model, "training_file": file_id, **body}
    return api.client.post("/v1/fine_tuning/jobs", headers=api.headers(), json=payload)


def created(api: Api, model: str, file_id: str, **body: Any) -> dict[str, Any]:
    response = create(api, model, file_id, **body)
    assert response.status_code == 200, response.text
    return response.json()


def supervised(**fields: Any) -> dict[str, Any]:
    return {"type": "supervised", "supervised": fields}


def status(api: Api, job_id: str) -> dict[str, Any]:
    response = api.client.get(f"/v1/fine_tuning/jobs/{job_id}", headers=api.headers())
    return response.json()


# ---- models ------------------------------------------------------------------------------------


def test_models_list_each_base_with_its_kind(gen_api: Api) -> None:
    listed = gen_api.client.get("/v1/models", headers=gen_api.headers()).json()["data"]
    tasks = {m["id"]: m["task"] for m in listed if m["owned_by"] == "system"}
    assert tasks == {BASE_MODEL: "encoder", TINY: "causal-lm", MLP: "tabular"}
    mlp = gen_api.client.get(f"/v1/models/{MLP}", headers=gen_api.headers())
    assert mlp.status_code == 200, mlp.text
    assert mlp.json()["owned_by"] == "system"
    assert mlp.json()["task"] == "tabular"
    encoded = gen_api.client.get("/v1/models/tunehouse%2Fmlp", headers=gen_api.headers())
    assert encoded.json()["id"] == MLP
    with changes_nothing(gen_api):
        deleted = gen_api.client.delete(f"/v1/models/{MLP}", headers=gen_api.headers())
        assert_error(deleted, 400, param="model")
        deleted = gen_api.client.delete(f"/v1/models/{TINY}", headers=gen_api.headers())
        assert_error(deleted, 400, param="model")


def test_base_model_kind_reads_config_json(tiny_llama: Path, tmp_path: Path) -> None:
    from app.core.settings import Settings

    assert base_model_kind(tiny_llama) == "causal-lm"
    assert base_model_kind(Settings(_env_file=None).registered_base_models()[BASE_MODEL]) == (
        "encoder"
    )
    for architectures, kind in (
        (["GPT2LMHeadModel"], "causal-lm"),
        (["BertForSequenceClassification"], "encoder"),
        (None, "encoder"),
    ):
        (tmp_path / "config.json").write_text(json.dumps({"architectures": architectures}))
        assert base_model_kind(tmp_path) == kind


def test_an_unreadable_base_is_listed_but_not_trainable(tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    settings = make_settings(tmp_path / "data", base_models={"broken": str(broken)})
    upgrade(settings.sqlalchemy_url)
    with session_scope(settings.sqlalchemy_url) as session:
        key = keys.create_key(session, "org-a").key
    with TestClient(create_app(settings)) as client:
        api = Api(client, settings, key, key)
        listed = client.get("/v1/models", headers=api.headers()).json()["data"]
        assert {m["id"]: m["task"] for m in listed}["broken"] is None
        file_id = upload(api, CHAT)
        with changes_nothing(api):
            error = assert_error(create(api, "broken", file_id), 400, param="model")
            assert error["code"] == "model_not_available"


# ---- which base learns which file --------------------------------------------------------------


def test_chat_job_on_a_causal_lm_with_causal_defaults(gen_api: Api) -> None:
    file_id = upload(gen_api, CHAT)
    job = created(gen_api, TINY, file_id)
    hp = job["hyperparameters"]
    assert hp["learning_rate"] == 5e-5
    assert hp["max_seq_length"] == 1024
    assert hp["warmup_ratio"] == 0.03
    assert job["method"] == {
        "type": "supervised",
        "supervised": {"hyperparameters": hp, "adapter": "full", "architecture": None},
    }
    # The background validation re-read the file with its stored format: queued.
    assert status(gen_api, job["id"])["status"] == "queued"


def test_chat_job_on_minilm_is_refused(gen_api: Api) -> None:
    file_id = upload(gen_api, CHAT)
    with changes_nothing(gen_api):
        error = assert_error(create(gen_api, BASE_MODEL, file_id), 400, param="model")
    assert "causal language model" in error["message"]
    assert "encoder" in error["message"]


@pytest.mark.parametrize(
    "rows",
    [
        [{"prompt": f"p{i}", "completion": f"c{i}"} for i in range(5)],
        [{"text": f"some text {i}"} for i in range(5)],
    ],
    ids=["completion", "text"],
)
def test_completion_and_text_need_a_causal_lm(gen_api: Api, rows: list[dict[str, Any]]) -> None:
    file_id = upload(gen_api, rows)
    with changes_nothing(gen_api):
        assert_error(create(gen_api, BASE_MODEL, file_id), 400, param="model")
    assert status(gen_api, created(gen_api, TINY, file_id)["id"])["status"] == "queued"


def test_text_job_from_a_plain_text_file_is_queued(gen_api: Api) -> None:
    # As CSV this would fail (a 2-column header, then 1-column rows): the job's validation must
    # read it back as the plain text it was stored as.
    content = b"Hello, world\nsecond line\n\nA third, fourth, para\n"
    file_id = upload(gen_api, content, name="corpus.txt")
    job = created(gen_api, TINY, file_id)
    assert status(gen_api, job["id"])["status"] == "queued"


def test_classification_on_a_causal_lm_base_is_accepted(gen_api: Api) -> None:
    file_id = upload(gen_api, sentiment_rows(20, seed=3))
    job = created(gen_api, TINY, file_id)
    assert job["hyperparameters"]["learning_rate"] == 1e-4
    assert job["method"]["supervised"]["adapter"] == "full"


def test_tabular_job_on_mlp_stores_the_architecture(gen_api: Api) -> None:
    file_id = upload(gen_api, TABULAR)
    architecture = {"hidden_sizes": [32, 16, 8], "activation": "gelu", "dropout": 0.2}
    job = created(gen_api, MLP, file_id, method=supervised(architecture=architecture))
    assert job["model"] == MLP
    assert job["method"]["supervised"]["architecture"] == architecture
    assert job["method"]["supervised"]["adapter"] == "full"
    hp = job["hyperparameters"]
    assert (hp["learning_rate"], hp["batch_size"], hp["weight_decay"]) == (1e-3, 64, 1e-4)
    assert 5 <= hp["n_epochs"] <= 50
    assert status(gen_api, job["id"])["status"] == "queued"

    default = created(gen_api, MLP, file_id, hyperparameters={"batch_size": "auto"})
    assert default["method"]["supervised"]["architecture"] == {
        "hidden_sizes": [256, 128],
        "activation": "relu",
        "dropout": 0.1,
    }
    assert default["hyperparameters"]["batch_size"] == 64


def test_tabular_needs_mlp_and_mlp_needs_tabular(gen_api: Api) -> None:
    tabular = upload(gen_api, TABULAR)
    chat = upload(gen_api, CHAT)
    with changes_nothing(gen_api):
        for model in (BASE_MODEL, TINY):
            error = assert_error(create(gen_api, model, tabular), 400, param="model")
            assert MLP in error["message"]
        error = assert_error(create(gen_api, MLP, chat), 400, param="training_file")
        assert "tabular" in error["message"]


def test_tabular_validation_file_must_match_the_training_file(gen_api: Api) -> None:
    training = upload(gen_api, TABULAR)
    wider = upload(gen_api, [{"features": [1, 2, 3, 4], "label": str(i % 2)} for i in range(4)])
    job = created(gen_api, MLP, training, validation_file=wider)
    failed = status(gen_api, job["id"])
    assert failed["status"] == "failed"
    assert failed["error"]["code"] == "invalid_validation_file"
    assert "4 features" in failed["error"]["message"]

    unseen = upload(gen_api, [{"features": [1, 2, 3], "label": label} for label in "0129"])
    failed = status(gen_api, created(gen_api, MLP, training, validation_file=unseen)["id"])
    assert failed["error"]["param"] == "validation_file"
    assert "'2'" in failed["error"]["message"]


# ---- LoRA --------------------------------------------------------------------------------------


def test_lora_spec_is_completed_and_stored(gen_api: Api) -> None:
    file_id = upload(gen_api, CHAT)
    job = created(gen_api, TINY, file_id, method=supervised(adapter={"type": "lora"}))
    assert job["method"]["supervised"]["adapter"] == {
        "type": "lora",
        "r": 8,
        "alpha": 16.0,
        "dropout": 0.05,
        "target_modules": None,
        "merge": False,
    }
    assert job["hyperparameters"]["learning_rate"] == 2e-4

    spec = {
        "type": "lora",
        "r": 4,
        "alpha": 8,
        "dropout": 0,
        "target_modules": ["q_proj", "v_proj"],
        "merge": True,
    }
    hyperparameters = {"learning_rate_multiplier": 0.5}
    job = created(
        gen_api, TINY, file_id, method=supervised(adapter=spec, hyperparameters=hyperparameters)
    )
    stored = job["method"]["supervised"]
    assert stored["adapter"] == {**spec, "alpha": 8.0, "dropout": 0.0}
    assert stored["architecture"] is None
    assert job["hyperparameters"]["learning_rate"] == 1e-4
    explicit = supervised(adapter=spec, hyperparameters={"learning_rate": 3e-3})
    assert created(gen_api, TINY, file_id, method=explicit)["hyperparameters"]["learning_rate"] == (
        3e-3
    )
    full = created(gen_api, TINY, file_id, method=supervised(adapter="full"))
    assert full["method"]["supervised"]["adapter"] == "full"


@pytest.mark.parametrize(
    "adapter",
    [
        "lora",
        "partial",
        {"r": 8},
        {"type": "qlora"},
        {"type": "lora", "r": 0},
        {"type": "lora", "r": 257},
        {"type": "lora", "alpha": 0},
        {"type": "lora", "dropout": 1.5},
        {"type": "lora", "target_modules": []},
        {"type": "lora", "target_modules": "q_proj"},
        {"type": "lora", "merge": "sometimes"},
        {"type": "lora", "rank": 8},
    ],
)
def test_invalid_lora_spec(gen_api: Api, adapter: Any) -> None:
    file_id = upload(gen_api, CHAT)
    with changes_nothing(gen_api):
        response = create(gen_api, TINY, file_id, method=supervised(adapter=adapter))
        assert_error(response, 400, param="method.supervised.adapter")


def test_lora_only_for_causal_lm_tasks(gen_api: Api) -> None:
    lora = supervised(adapter={"type": "lora"})
    classification = upload(gen_api, sentiment_rows(20, seed=4))
    tabular = upload(gen_api, TABULAR)
    with changes_nothing(gen_api):
        for model, file_id in (
            (BASE_MODEL, classification),
            (TINY, classification),
            (MLP, tabular),
        ):
            response = create(gen_api, model, file_id, method=lora)
            error = assert_error(response, 400, param="method.supervised.adapter")
            assert error["param"] == "method.supervised.adapter"


# ---- architecture ------------------------------------------------------------------------------


def test_architecture_only_with_mlp(gen_api: Api) -> None:
    chat = upload(gen_api, CHAT)
    classification = upload(gen_api, sentiment_rows(20, seed=5))
    architecture = supervised(architecture={"hidden_sizes": [8]})
    with changes_nothing(gen_api):
        for model, file_id in ((TINY, chat), (BASE_MODEL, classification)):
            response = create(gen_api, model, file_id, method=architecture)
            error = assert_error(response, 400, param="method.supervised.architecture")
            assert error["param"] == "method.supervised.architecture"


@pytest.mark.parametrize(
    "architecture",
    [
        {"hidden_sizes": []},
        {"hidden_sizes": [8] * 9},
        {"hidden_sizes": [0]},
        {"hidden_sizes": [4097]},
        {"hidden_sizes": [8.5]},
        {"activation": "swish"},
        {"dropout": 1},
        {"dropout": -0.1},
        {"layers": 3},
    ],
)
def test_invalid_architecture(gen_api: Api, architecture: dict[str, Any]) -> None:
    file_id = upload(gen_api, TABULAR)
    with changes_nothing(gen_api):
        response = create(gen_api, MLP, file_id, method=supervised(architecture=architecture))
        assert_error(response, 400, param="method.supervised.architecture")


def test_largest_architecture_is_accepted(gen_api: Api) -> None:
    file_id = upload(gen_api, TABULAR)
    architecture = {"hidden_sizes": [4096] * 8, "activation": "tanh", "dropout": 0.0}
    job = created(gen_api, MLP, file_id, method=supervised(architecture=architecture))
    assert job["method"]["supervised"]["architecture"] == architecture


# ---- what inference loads ----------------------------------------------------------------------


def _register_model(api: Api, job_id: str, task: str, *, adapter: bool) -> tuple[str, Path]:
    from app.core.ids import new_id
    from app.core.storage import Storage
    from app.models import Checkpoint, FineTunedModel, Job

    storage = Storage(api.settings.storage_root)
    model_dir = storage.model_dir(job_id)
    model_dir.mkdir(parents=True)
    if adapter:
        (model_dir / "adapter_config.json").write_text("{}")
    name = f"ft:{TINY}:org-a::{job_id[-8:]}"
    with session_scope(api.settings.sqlalchemy_url) as session:
        job = session.get(Job, job_id)
        assert job is not None
        org_id = job.organization_id
        session.add(
            FineTunedModel(
                id=name,
                organization_id=org_id,
                task=task,
                base_model=TINY,
                job_id=job_id,
                storage_path=storage.relative(model_dir),
                labels=None,
            )
        )
        session.add(
            Checkpoint(
                id=new_id("ftckpt"),
                job_id=job_id,
                step_number=5,
                metrics={},
                storage_path=storage.relative(model_dir),
            )
        )
    return name, model_dir


def _loadable(api: Api, model_id: str):
    from app.core.storage import Storage
    from app.services import models
    from app.services.keys import get_or_create_organization

    with session_scope(api.settings.sqlalchemy_url) as session:
        org = get_or_create_organization(session, "org-a")
        storage = Storage(api.settings.storage_root)
        return models.resolve_loadable(session, api.settings, storage, org, model_id)


def test_loadable_models_carry_their_kind_and_lora_base(gen_api: Api, tiny_llama: Path) -> None:
    from app.core.errors import InvalidRequest

    job = created(gen_api, TINY, upload(gen_api, CHAT), method=supervised(adapter={"type": "lora"}))
    name, model_dir = _register_model(gen_api, job["id"], "chat", adapter=True)
    loadable = _loadable(gen_api, name)
    assert (loadable.id, loadable.task, loadable.kind) == (name, "causal-lm", "causal-lm")
    assert (loadable.path, loadable.base_path) == (model_dir, tiny_llama.resolve())
    checkpoint = _loadable(gen_api, f"{name}:ckpt-step-5")
    assert (checkpoint.task, checkpoint.base_path) == ("causal-lm", tiny_llama.resolve())
    listed = gen_api.client.get("/v1/models", headers=gen_api.headers()).json()["data"]
    assert {m["id"]: m["task"] for m in listed}[name] == "causal-lm"

    full = created(gen_api, TINY, upload(gen_api, CHAT))
    standalone, _ = _register_model(gen_api, full["id"], "causal-lm", adapter=False)
    assert _loadable(gen_api, standalone).base_path is None

    base = _loadable(gen_api, TINY)
    assert (base.task, base.path, base.base_path) == ("causal-lm", tiny_llama.resolve(), None)
    assert _loadable(gen_api, BASE_MODEL).task == "encoder"
    with pytest.raises(InvalidRequest):
        _loadable(gen_api, MLP)
