"""Continuing from a fine-tuned model (app/services/lineage.py): a job's model may be one of
the organization's fine-tuned models or checkpoints, as OpenAI allows.

First through an in-process API with no worker, on models registered by hand: how the model
resolves (another organization's or an unknown one is a 404 and stores nothing), the adapter a
continued job trains, the stored lineage, a parent kept while a job continues from it. Then
through `tunehouse run` and the openai SDK: a classifier continued from a model and from a
checkpoint, and a LoRA model continued and served, still answering once its parent is gone."""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from openai import OpenAI

from app.core.db import session_scope
from app.core.migrate import upgrade
from app.main import create_app
from app.models import Checkpoint, FineTunedModel, Job
from app.services import keys
from tests.conftest import Api, make_settings
from tests.inference_support import make_adapter
from tests.stacks import embedded_stack
from tests.support import extra, jsonl, sentiment_rows, wait_until
from tests.test_bad_input import assert_error, changes_nothing
from tests.tiny_models import build_causal_lm

TINY = "tiny-llama"
CHAT = [
    {"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]}
    for i in range(12)
]
# The tiny model's tokenizer knows the words of the chat rows and of the sentiment rows.
TEXTS = [row["text"] for row in sentiment_rows(400, seed=5)] + ["q1 a1 q2 a2 hello world"]
FULL = "ft:tiny-llama:org-a:full:00000001"
LORA = "ft:tiny-llama:org-a:lora:00000002"
OTHER = "ft:tiny-llama:org-b:theirs:00000003"


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_causal_lm(tmp_path_factory.mktemp("bases") / "tiny", TEXTS)


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory, tiny_llama: Path) -> Iterator[Api]:
    """An API (no worker: jobs stay queued) where org-a has a full and a LoRA model of
    tiny-llama, and org-b a model of its own."""
    settings = make_settings(
        tmp_path_factory.mktemp("api") / "data", base_models={TINY: str(tiny_llama)}
    )
    upgrade(settings.sqlalchemy_url)
    models = settings.storage_root / "models"
    shutil.copytree(tiny_llama, models / "ftjob-full")
    make_adapter(tiny_llama, models / "ftjob-lora", seed=1, rank=4, alpha=8)
    shutil.copytree(tiny_llama, models / "ftjob-theirs")
    with session_scope(settings.sqlalchemy_url) as session:
        key_a = keys.create_key(session, "org-a").key
        key_b = keys.create_key(session, "org-b").key
        for model_id, org, job in ((FULL, "org-a", "full"), (LORA, "org-a", "lora"),
                                   (OTHER, "org-b", "theirs")):  # fmt: skip
            session.add(
                FineTunedModel(
                    id=model_id, task="causal-lm", base_model=TINY, job_id=f"ftjob-{job}",
                    organization_id=keys.get_or_create_organization(session, org).id,
                    storage_path=f"models/ftjob-{job}",
                )
            )  # fmt: skip
    with TestClient(create_app(settings)) as client:
        yield Api(client, settings, key_a, key_b)


def upload(api: Api, rows: list[dict[str, Any]]) -> str:
    response = api.client.post(
        "/v1/files",
        headers=api.headers(),
        files={"file": ("train.jsonl", jsonl(rows), "application/octet-stream")},
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
    return dict(response.json())


def lora(**fields: Any) -> dict[str, Any]:
    return {"type": "supervised", "supervised": {"adapter": {"type": "lora", **fields}}}


def test_another_organizations_or_an_unknown_model_is_404_and_stores_nothing(api: Api) -> None:
    file_id = upload(api, CHAT)
    for model in (OTHER, f"{OTHER}:ckpt-step-1", "ft:tiny-llama:org-a:gone:0000000f",
                  f"{FULL}:ckpt-step-3"):  # fmt: skip
        with changes_nothing(api):
            error = assert_error(create(api, model, file_id), 404, param="model")
        assert error["code"] == "model_not_found"
        assert model in error["message"]
    # A name that is no model at all is still the 400 it always was.
    with changes_nothing(api):
        error = assert_error(create(api, "no-such-base", file_id), 400, param="model")
    assert error["code"] == "model_not_available"


def test_a_lora_model_continues_its_adapter_and_keeps_the_root_base(api: Api) -> None:
    job = created(api, LORA, upload(api, CHAT), suffix="more")
    assert job["model"] == LORA  # as the user gave it
    assert job["lineage"] == {
        "parent_model": LORA,
        "checkpoint_step": None,
        "base_model": TINY,
        "parent_adapter": "continue",
    }
    adapter = job["method"]["supervised"]["adapter"]
    # The parent's shape (make_adapter: r=4, alpha=8, q_proj and v_proj), stored as an adapter.
    assert adapter == {
        "type": "lora", "r": 4, "alpha": 8.0, "dropout": 0.0,
        "target_modules": ["q_proj", "v_proj"], "merge": False,
    }  # fmt: skip
    # Its shape cannot change while it continues.
    with changes_nothing(api):
        assert_error(create(api, LORA, job["training_file"], method=lora(r=16)), 400,
                     param="method.supervised.adapter.r", words="parent_adapter")  # fmt: skip


def test_merge_trains_a_new_adapter_stored_merged(api: Api) -> None:
    file_id = upload(api, CHAT)
    job = created(api, LORA, file_id, parent_adapter="merge", method=lora(r=16))
    assert job["lineage"]["parent_adapter"] == "merge"
    assert job["method"]["supervised"]["adapter"]["r"] == 16
    assert job["method"]["supervised"]["adapter"]["merge"] is True
    # Full fine-tuning of a LoRA model trains its merged weights.
    full = created(
        api, LORA, file_id, method={"type": "supervised", "supervised": {"adapter": "full"}}
    )
    assert full["method"]["supervised"]["adapter"] == "full"
    assert full["lineage"]["parent_adapter"] == "merge"
    with changes_nothing(api):
        assert_error(
            create(api, LORA, file_id, parent_adapter="continue",
                   method={"type": "supervised", "supervised": {"adapter": "full"}}),
            400, param="parent_adapter",
        )  # fmt: skip
        assert_error(
            create(api, LORA, file_id, parent_adapter="merge", method=lora(merge=False)),
            400, param="method.supervised.adapter.merge",
        )  # fmt: skip


def test_a_full_model_continues_and_a_lora_job_on_it_is_stored_merged(api: Api) -> None:
    file_id = upload(api, CHAT)
    full = created(api, FULL, file_id)
    assert full["lineage"] == {
        "parent_model": FULL, "checkpoint_step": None, "base_model": TINY, "parent_adapter": None,
    }  # fmt: skip
    assert full["method"]["supervised"]["adapter"] == "full"
    adapter = created(api, FULL, file_id, method=lora())["method"]["supervised"]["adapter"]
    assert adapter["merge"] is True
    with changes_nothing(api):
        # parent_adapter is about a LoRA parent; a base model or a full model has none.
        assert_error(create(api, FULL, file_id, parent_adapter="merge"), 400,
                     param="parent_adapter")  # fmt: skip
        assert_error(create(api, TINY, file_id, parent_adapter="continue"), 400,
                     param="parent_adapter")  # fmt: skip
    # A causal LM does not continue as a classifier.
    classifier_rows = upload(api, sentiment_rows(12, seed=1))
    with changes_nothing(api):
        assert_error(create(api, FULL, classifier_rows), 400, param="model", words="classification")


def test_a_parent_stays_while_a_job_continues_from_it(api: Api) -> None:
    settings = api.settings
    shutil.copytree(settings.storage_root / "models" / "ftjob-full",
                    settings.storage_root / "models" / "ftjob-kept")  # fmt: skip
    kept = "ft:tiny-llama:org-a:kept:00000004"
    with session_scope(settings.sqlalchemy_url) as session:
        org = keys.get_or_create_organization(session, "org-a")
        session.add(FineTunedModel(id=kept, organization_id=org.id, task="causal-lm",
                                   base_model=TINY, job_id="ftjob-kept",
                                   storage_path="models/ftjob-kept"))  # fmt: skip
    job = created(api, kept, upload(api, CHAT))
    refused = api.client.delete(f"/v1/models/{kept}", headers=api.headers())
    error = assert_error(refused, 409, param="model", words=job["id"])
    assert error["code"] == "model_in_use"
    assert refused.headers["x-should-retry"] == "false"
    cancel = api.client.post(f"/v1/fine_tuning/jobs/{job['id']}/cancel", headers=api.headers())
    assert cancel.status_code == 200, cancel.text
    deleted = api.client.delete(f"/v1/models/{kept}", headers=api.headers())
    assert deleted.status_code == 200, deleted.text
    assert_error(create(api, kept, job["training_file"]), 404, param="model")


def test_the_checkpoints_of_an_adapter_over_merged_weights_are_refused(api: Api) -> None:
    """Such a checkpoint holds an adapter whose base (its parent merged) is stored nowhere: it is
    neither served nor continued from, with a 400 saying to use the job's merged model."""
    settings, name = api.settings, "ft:tiny-llama:org-a:merged:00000005"
    shutil.copytree(settings.storage_root / "models" / "ftjob-lora",
                    settings.storage_root / "checkpoints" / "ftjob-merged" / "step-3")  # fmt: skip
    with session_scope(settings.sqlalchemy_url) as session:
        org = keys.get_or_create_organization(session, "org-a")
        lineage = {"parent_model": LORA, "checkpoint_step": None, "base_model": TINY,
                   "parent_adapter": "merge"}  # fmt: skip
        session.add(Job(id="ftjob-merged", organization_id=org.id, model=LORA, task="chat",
                        training_file="file-x", status="succeeded", hyperparameters={},
                        method={}, seed=0, lineage=lineage))  # fmt: skip
        session.flush()  # the job, before the rows that name it
        session.add(FineTunedModel(id=name, organization_id=org.id, task="causal-lm",
                                   base_model=TINY, job_id="ftjob-merged",
                                   storage_path="models/ftjob-full"))  # fmt: skip
        session.add(Checkpoint(id="ftckpt-merged", job_id="ftjob-merged", step_number=3, metrics={},
                               storage_path="checkpoints/ftjob-merged/step-3"))  # fmt: skip
    checkpoint, file_id = f"{name}:ckpt-step-3", upload(api, CHAT)
    with changes_nothing(api):
        error = assert_error(create(api, checkpoint, file_id), 400, param="model")
    assert name in error["message"]
    completion = {"model": checkpoint, "prompt": "q1", "max_tokens": 2}
    served = api.client.post("/v1/completions", headers=api.headers(), json=completion)
    assert_error(served, 400, param="model", words="merged")
    assert created(api, name, file_id)["lineage"]["parent_model"] == name


# ---- through the service ---------------------------------------------------------------------


class Service:
    def __init__(self, base_url: str, key: str):
        self.base_url, self.key = base_url, key
        self.client = OpenAI(base_url=f"{base_url}/v1", api_key=key, max_retries=0)
        self.http = httpx.Client(
            base_url=f"{base_url}/v1", headers={"Authorization": f"Bearer {key}"}, timeout=120
        )

    def upload(self, rows: list[dict[str, Any]]) -> str:
        return self.client.files.create(file=("train.jsonl", jsonl(rows)), purpose="fine-tune").id

    def train(self, **job: Any) -> Any:
        created = self.client.fine_tuning.jobs.create(**job)
        done = wait_until(
            lambda: (
                (j := self.client.fine_tuning.jobs.retrieve(created.id)).status
                in ("succeeded", "failed", "cancelled")
                and j
            ),
            300,
            interval=0.5,
            what=f"job {created.id}",
        )
        assert done.status == "succeeded", done.error
        return done

    def train_losses(self, job_id: str) -> list[float]:
        events = self.http.get(f"/fine_tuning/jobs/{job_id}/events", params={"limit": 100})
        metrics = [e["data"] for e in reversed(events.json()["data"]) if e["type"] == "metrics"]
        return [float(m["train_loss"]) for m in metrics]

    def predict(self, model: str, texts: list[str]) -> list[dict[str, Any]]:
        response = self.http.post("/predictions", json={"model": model, "input": texts})
        assert response.status_code == 200, response.text
        return list(response.json()["data"])

    def accuracy(self, model: str, rows: list[dict[str, str]]) -> float:
        predicted = self.predict(model, [row["text"] for row in rows])
        return sum(
            p["label"] == row["label"] for p, row in zip(predicted, rows, strict=True)
        ) / len(rows)

    def adapter(self, model: str) -> dict[str, Any]:
        """The LoRA weights of ``model``, from the tar GET /v1/models/{model}/content sends."""
        from safetensors.numpy import load

        response = self.http.get(f"/models/{model}/content")
        assert response.status_code == 200, response.text
        with tarfile.open(fileobj=io.BytesIO(response.content)) as archive:
            member = archive.extractfile("adapter_model.safetensors")
            assert member is not None
            return dict(load(member.read()))

    def complete(self, model: str) -> str:
        reply = self.client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "q3"}], temperature=0, max_tokens=6
        )
        return reply.choices[0].message.content or ""


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory, tiny_llama: Path) -> Iterator[Service]:
    tmp = tmp_path_factory.mktemp("continue")
    env = {"TUNEHOUSE_BASE_MODELS": json.dumps({TINY: str(tiny_llama)})}
    with embedded_stack(tmp, env) as (stack, key):
        yield Service(stack.base_url, key)


CLASSIFIER_HP = {"batch_size": 16, "max_seq_length": 32, "warmup_ratio": 0.0}


def classifier(n_epochs: int, learning_rate: float) -> dict[str, Any]:
    hp = {**CLASSIFIER_HP, "n_epochs": n_epochs, "learning_rate": learning_rate}
    return {"type": "supervised", "supervised": {"hyperparameters": hp}}


def test_a_classifier_continues_from_its_weights_and_from_a_checkpoint(service: Service) -> None:
    train, held_out = sentiment_rows(160, seed=11), sentiment_rows(100, seed=12)
    file_id, valid_id = service.upload(train), service.upload(held_out)
    # A sequence classifier on the tiny Llama: 2 epochs, then 2 more from its weights, at a
    # lower learning rate (its schedule starts again).
    first = service.train(model=TINY, training_file=file_id, validation_file=valid_id,
                          method=classifier(2, 3e-3), seed=1)  # fmt: skip
    parent = first.fine_tuned_model
    second = service.train(model=parent, training_file=file_id, validation_file=valid_id,
                           method=classifier(2, 1e-3), seed=1, suffix="again")  # fmt: skip
    assert second.model == parent
    assert second.fine_tuned_model.startswith(f"ft:{TINY}:")  # the root base, not ft:ft:...
    assert ":again:" in second.fine_tuned_model
    # It starts where the parent ended, not where the base started.
    parent_losses, child_losses = service.train_losses(first.id), service.train_losses(second.id)
    assert abs(child_losses[0] - parent_losses[-1]) < abs(child_losses[0] - parent_losses[0])
    assert child_losses[0] < parent_losses[0]
    parent_accuracy = service.accuracy(parent, held_out)
    assert parent_accuracy > 0.7
    child_accuracy = service.accuracy(second.fine_tuned_model, held_out)
    assert child_accuracy >= parent_accuracy, (child_accuracy, parent_accuracy)
    model = service.http.get(f"/models/{second.fine_tuned_model}").json()
    assert model["base_model"] == TINY
    assert model["labels"] == ["negative", "positive"]

    # From a checkpoint: with a learning rate too small to move them, the new model holds the
    # checkpoint's weights.
    step = min(c.step_number for c in service.client.fine_tuning.jobs.checkpoints.list(first.id))
    checkpoint = f"{parent}:ckpt-step-{step}"
    few = service.upload(train[:16])
    third = service.train(model=checkpoint, training_file=few, method=classifier(1, 1e-12), seed=3)
    assert third.model == checkpoint
    assert extra(third, "lineage") == {
        "parent_model": parent, "checkpoint_step": step, "base_model": TINY,
        "parent_adapter": None,
    }  # fmt: skip
    texts = [row["text"] for row in held_out[:8]]
    for got, want in zip(service.predict(third.fine_tuned_model, texts),
                         service.predict(checkpoint, texts), strict=True):  # fmt: skip
        assert got["label"] == want["label"]
        assert got["scores"] == pytest.approx(want["scores"], abs=1e-4)


def test_a_lora_model_continues_is_served_and_outlives_its_parent(service: Service) -> None:
    file_id = service.upload(CHAT)
    hp = {"n_epochs": 5, "batch_size": 4, "learning_rate": 1e-2, "warmup_ratio": 0.0,
          "max_seq_length": 64}  # fmt: skip
    adapter = {"type": "lora", "r": 4, "alpha": 8}
    method = {"type": "supervised", "supervised": {"hyperparameters": hp, "adapter": adapter}}
    first = service.train(model=TINY, training_file=file_id, method=method, seed=1)
    parent = first.fine_tuned_model
    again = {**hp, "n_epochs": 1, "learning_rate": 1e-3}
    method_again = {"type": "supervised", "supervised": {"hyperparameters": again}}
    second = service.train(model=parent, training_file=file_id, method=method_again, seed=2)
    child = second.fine_tuned_model
    assert child.startswith(f"ft:{TINY}:")
    assert extra(second, "lineage")["parent_adapter"] == "continue"
    assert second.method.supervised.model_dump()["adapter"]["r"] == 4
    # The child's adapter is the parent's, trained a little further: nearer to it than to a
    # fresh adapter (whose B matrices are zeros).
    parent_weights, child_weights = service.adapter(parent), service.adapter(child)
    assert child_weights.keys() == parent_weights.keys()
    moved = sum(float(np.sum((child_weights[k] - parent_weights[k]) ** 2)) for k in child_weights)
    learnt = sum(float(np.sum(parent_weights[k] ** 2)) for k in parent_weights if "lora_B" in k)
    assert 0 < moved < learnt / 4
    listed = service.http.get(f"/models/{child}").json()
    assert listed["base_model"] == TINY  # an adapter of the root base, served over it
    answer = service.complete(child)
    assert answer
    # Deleting the parent leaves the child whole: its adapter needs only the root base.
    assert service.http.delete(f"/models/{parent}").status_code == 200
    assert service.complete(child) == answer


# ---- the trainer: a continued model's head follows the new labels ----------------------------


def _train(work: Path, name: str, task: str, rows: list[dict[str, Any]], **spec: Any) -> Path:
    from tests.training.support import Reporter, write_jsonl
    from worker.training.loop import train
    from worker.training.spec import TrainingSpec

    hp = {"n_epochs": 1, "batch_size": 8, "learning_rate": 1e-12, "max_seq_length": 32,
          **spec.pop("hyperparameters", {})}  # fmt: skip
    run = TrainingSpec(
        job_id=f"ftjob-{name}", task=task, training_file=write_jsonl(work / f"{name}.jsonl", rows),
        validation_file=None, output_dir=work / name, checkpoints_dir=work / f"{name}-ckpt",
        hyperparameters=hp, seed=0, **spec,
    )  # fmt: skip
    train(run, Reporter())
    return run.output_dir


def _start(path: Path, labels: list[str]) -> Any:
    from app.services.lineage import Start

    return Start(path=path, adapter=False, labels=labels, merge_adapter=False, base=TINY)


def test_a_classifier_keeps_the_rows_of_the_labels_it_shares(
    tiny_llama: Path, tmp_path: Path
) -> None:
    from safetensors.torch import load_file

    rows = sentiment_rows(16, seed=4)
    parent = _train(tmp_path, "parent", "classification", rows, base_model_dir=tiny_llama,
                    hyperparameters={"learning_rate": 1e-2})  # fmt: skip
    labelled = [{**row, "label": "neutral"} for row in rows[:4]] + rows[4:]
    child = _train(tmp_path, "child", "classification", labelled, base_model_dir=parent,
                   parent=_start(parent, ["negative", "positive"]))  # fmt: skip
    old, new = load_file(parent / "model.safetensors"), load_file(child / "model.safetensors")
    assert new["score.weight"].shape[0] == 3  # negative, neutral, positive
    assert json.loads((child / "config.json").read_text())["id2label"] == {
        "0": "negative", "1": "neutral", "2": "positive"
    }  # fmt: skip
    assert new["score.weight"][0].allclose(old["score.weight"][0])
    assert new["score.weight"][2].allclose(old["score.weight"][1])
    assert not new["score.weight"][1].allclose(old["score.weight"][0])
    assert not new["score.weight"][1].allclose(old["score.weight"][1])
    backbone = [k for k in old if not k.startswith("score.")]
    assert all(new[k].allclose(old[k]) for k in backbone)


def test_a_tabular_model_keeps_its_layers_and_scaling(tmp_path: Path) -> None:
    from app.inference.architectures import load_mlp

    rows = [{"features": [i, i % 3, 0.5], "label": str(i % 2)} for i in range(40)]
    method = {"supervised": {"architecture": {"hidden_sizes": [8], "activation": "tanh",
                                              "dropout": 0.0}}}  # fmt: skip
    parent = _train(tmp_path, "parent", "tabular", rows, base_model_dir=None, method=method,
                    hyperparameters={"learning_rate": 1e-2})  # fmt: skip
    # Other features' scale and a third class: the parent's scaling and layers stay.
    more = [{"features": [10 * i, i % 5, 2.0], "label": str(i % 3)} for i in range(30)]
    child = _train(tmp_path, "child", "tabular", more, base_model_dir=None,
                   parent=_start(parent, ["0", "1"]))  # fmt: skip
    (old, old_config), (new, new_config) = load_mlp(parent), load_mlp(child)
    assert new_config == {**old_config, "labels": ["0", "1", "2"]}
    old_state, new_state = old.state_dict(), new.state_dict()
    assert new_state["layers.0.weight"].allclose(old_state["layers.0.weight"])
    assert new_state["layers.3.weight"][:2].allclose(old_state["layers.3.weight"])
    assert new_state["layers.3.bias"][:2].allclose(old_state["layers.3.bias"])


def _logits(model: Any) -> Any:
    import torch

    ids = torch.tensor([[3, 14, 15, 92, 65, 35]])
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("mode", ["continue", "merge"])
def test_a_lora_parent_continues_or_is_merged_under_a_new_adapter(
    tiny_llama: Path, tmp_path: Path, mode: str
) -> None:
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from app.services.lineage import Start

    parent = make_adapter(tiny_llama, tmp_path / "parent", seed=5, rank=4, alpha=8)
    adapter = {"type": "lora", "r": 4, "alpha": 8.0, "dropout": 0.0,
               "target_modules": ["q_proj", "v_proj"], "merge": mode == "merge"}  # fmt: skip
    start = Start(path=parent, adapter=True, labels=None, merge_adapter=mode == "merge", base=TINY)
    # A learning rate too small to move anything: the stored model is where training started.
    child = _train(tmp_path, "child", "chat", CHAT, base_model_dir=tiny_llama, parent=start,
                   method={"supervised": {"adapter": adapter}})  # fmt: skip
    if mode == "continue":  # the parent's adapter, stored as an adapter of the root base
        old, new = (
            load_file(parent / "adapter_model.safetensors"),
            load_file(child / "adapter_model.safetensors"),
        )
        assert old.keys() == new.keys()
        assert all(new[k].allclose(old[k]) for k in old)
        return
    # merge: the parent folded into the base, a new adapter (zero at the start) over it, all
    # stored merged: the same function as the parent over its base.
    assert not (child / "adapter_config.json").exists()
    root = AutoModelForCausalLM.from_pretrained(tiny_llama)
    expected = _logits(PeftModel.from_pretrained(root, parent).merge_and_unload())
    got = _logits(AutoModelForCausalLM.from_pretrained(child))
    assert got.allclose(expected, atol=1e-4)
    assert not got.allclose(_logits(AutoModelForCausalLM.from_pretrained(tiny_llama)), atol=1e-3)
