"""Inference routes through the official SDK, in process: chat and text completions (and their
streams), embeddings, LoRA adapters sharing one base, and the wrong kind of model refused."""

from __future__ import annotations

import base64
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from openai import BadRequestError, OpenAI

from app.core.db import session_scope
from app.core.migrate import upgrade
from app.core.settings import Settings
from app.main import create_app
from app.models import FineTunedModel
from app.services import keys
from tests.conftest import make_settings
from tests.inference_support import TEXTS, make_adapter
from tests.support import BASE_MODEL, as_dict
from tests.tiny_models import build_causal_lm


@dataclass
class Served:
    client: OpenAI
    http: TestClient
    settings: Settings
    org_id: str
    org_name: str


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_causal_lm(tmp_path_factory.mktemp("tiny") / "tiny-llama", TEXTS)


@pytest.fixture
def served(tmp_path: Path, tiny_base: Path) -> Iterator[Served]:
    settings = make_settings(tmp_path / "data", base_models={"tiny-llama": str(tiny_base)})
    upgrade(settings.sqlalchemy_url)
    with session_scope(settings.sqlalchemy_url) as session:
        new = keys.create_key(session, "acme")
        org_id, org_name = new.organization.id, new.organization.name
    with TestClient(create_app(settings)) as http:
        client = OpenAI(base_url="http://testserver/v1", api_key=new.key, http_client=http)
        yield Served(client, http, settings, org_id, org_name)


def test_chat_completion_shape_usage_and_length(served: Served) -> None:
    reply = served.client.chat.completions.create(
        model="tiny-llama",
        messages=[{"role": "user", "content": "say hello"}],
        max_tokens=5,
        temperature=0,
    )
    assert reply.object == "chat.completion" and reply.id.startswith("chatcmpl-")
    (choice,) = reply.choices
    assert choice.message.role == "assistant" and isinstance(choice.message.content, str)
    assert choice.finish_reason in ("stop", "length")
    assert reply.usage is not None and reply.usage.prompt_tokens > 0
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
    if choice.finish_reason == "length":
        assert reply.usage.completion_tokens == 5


def test_streamed_chat_equals_the_non_streamed_answer(served: Served) -> None:
    request: dict[str, Any] = {
        "model": "tiny-llama",
        "messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}],
        "max_completion_tokens": 20,
        "temperature": 0,
    }
    whole = served.client.chat.completions.create(**request)
    chunks = list(
        served.client.chat.completions.create(
            **request, stream=True, stream_options={"include_usage": True}
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == whole.choices[0].finish_reason and set(finishes[:-1]) == {None}
    assert chunks[-1].usage is not None and whole.usage is not None
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == whole.usage.total_tokens


def test_completions_n_seed_and_stop(served: Served) -> None:
    greedy = served.client.completions.create(
        model="tiny-llama", prompt="the quick", max_tokens=12, temperature=0
    )
    text = greedy.choices[0].text
    assert greedy.usage is not None
    assert greedy.object == "text_completion" and greedy.usage.completion_tokens > 0

    streamed = served.client.completions.create(
        model="tiny-llama", prompt="the quick", max_tokens=12, temperature=0, stream=True
    )
    assert "".join(c.choices[0].text for c in streamed) == text

    if len(text.strip()) > 2:  # a stop sequence cuts the answer before it
        stop = text.strip()[1:3]
        cut = served.client.completions.create(
            model="tiny-llama", prompt="the quick", max_tokens=12, temperature=0, stop=[stop]
        )
        assert cut.choices[0].finish_reason == "stop"
        assert cut.choices[0].text == text[: text.index(stop)]

    sampled = [
        served.client.completions.create(
            model="tiny-llama", prompt="once upon", max_tokens=8, n=2, seed=3, temperature=1.0
        )
        for _ in range(2)
    ]
    assert [c.index for c in sampled[0].choices] == [0, 1]
    assert [c.text for c in sampled[0].choices] == [c.text for c in sampled[1].choices]


def test_streamed_completions_hold_every_choice_and_prompt(served: Served) -> None:
    """Each sample used to end the whole stream when it finished (its generation's stop event
    was the request's cancel event): only choice 0 was sent."""
    request: dict[str, Any] = {"model": "tiny-llama", "max_tokens": 6, "temperature": 0, "n": 2}
    whole = served.client.completions.create(prompt=["the quick", "once upon"], **request)
    chunks = list(
        served.client.completions.create(
            prompt=["the quick", "once upon"], stream=True,
            stream_options={"include_usage": True}, **request,
        )
    )  # fmt: skip
    texts: dict[int, str] = {}
    for chunk in chunks:
        for choice in chunk.choices:
            texts[choice.index] = texts.get(choice.index, "") + choice.text
    assert texts == {choice.index: choice.text for choice in whole.choices}
    assert sorted(texts) == [0, 1, 2, 3]
    assert chunks[-1].usage.total_tokens == whole.usage.total_tokens


def test_embeddings_base64_decodes_to_the_float_vectors(served: Served) -> None:
    texts = ["a lovely meal", "a terrible meal"]
    floats = served.client.embeddings.create(model=BASE_MODEL, input=texts, encoding_format="float")
    default = served.client.embeddings.create(model=BASE_MODEL, input=texts)  # base64 on the wire
    raw = served.http.post(
        "/v1/embeddings",
        headers={"Authorization": f"Bearer {served.client.api_key}"},
        json={"model": BASE_MODEL, "input": texts, "encoding_format": "base64"},
    ).json()
    decoded = np.frombuffer(base64.b64decode(raw["data"][0]["embedding"]), dtype="<f4")
    assert np.allclose(decoded, floats.data[0].embedding, atol=1e-6)
    for f, d in zip(floats.data, default.data, strict=True):
        assert len(f.embedding) == 384
        assert np.allclose(f.embedding, d.embedding, atol=1e-6)
        assert abs(np.linalg.norm(f.embedding) - 1) < 1e-4
    assert floats.usage.prompt_tokens > 0


def test_wrong_kind_of_model_is_a_400(served: Served) -> None:
    with pytest.raises(BadRequestError) as chat_on_encoder:
        served.client.chat.completions.create(
            model=BASE_MODEL, messages=[{"role": "user", "content": "hi"}]
        )
    assert as_dict(chat_on_encoder.value.body)["code"] == "wrong_model_kind"
    with pytest.raises(BadRequestError) as embed_generative:
        served.client.embeddings.create(model="tiny-llama", input="hi")
    assert as_dict(embed_generative.value.body)["param"] == "model"


def _register_adapter(served: Served, base: Path, name: str, seed: int) -> str:
    """A LoRA adapter with random (non-zero) weights, registered as a fine-tuned model."""
    job_id = f"ftjob-adapter{seed:011d}"
    make_adapter(base, served.settings.storage_root / "models" / job_id, seed)
    model_id = f"ft:tiny-llama:{served.org_name}:{name}:{seed:08d}"
    with session_scope(served.settings.sqlalchemy_url) as session:
        session.add(
            FineTunedModel(
                id=model_id, organization_id=served.org_id, task="causal-lm",
                base_model="tiny-llama", job_id=job_id, storage_path=f"models/{job_id}",
            )
        )  # fmt: skip
    return model_id


def test_lora_adapters_share_their_base_and_answer_concurrently(
    served: Served, tiny_base: Path
) -> None:
    adapters = [_register_adapter(served, tiny_base, f"a{i}", seed=i) for i in range(3)]
    prompt = "once upon a time"

    def answer(model: str) -> str:
        return (
            served.client.completions.create(
                model=model, prompt=prompt, max_tokens=10, temperature=0
            )
            .choices[0]
            .text
        )

    sequential = {model: answer(model) for model in [*adapters, "tiny-llama"]}
    assert len(set(sequential.values())) > 1, "adapters change the answers"

    app = served.http.app
    assert isinstance(app, FastAPI)
    cache = app.state.model_cache
    assert len(cache._bases) == 1, "all adapters sit on one shared base"
    shared = next(iter(cache._bases.values()))
    assert set(shared.model.peft_config) == set(adapters)
    assert shared.adapters == {adapter: 1 for adapter in adapters}

    results: dict[str, list[str]] = {model: [] for model in sequential}

    def worker(model: str) -> None:
        for _ in range(3):
            results[model].append(answer(model))

    threads = [threading.Thread(target=worker, args=(m,)) for m in sequential for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for model, answers in results.items():
        assert answers == [sequential[model]] * 6, model
