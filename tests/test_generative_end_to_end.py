"""Generative and from-scratch fine-tuning through the whole service (`tunehouse run`), driven
by the official openai SDK: a chat fine-tune (full and LoRA) of a tiny causal LM built here
learns a task the untrained model cannot do; an MLP designed from scratch learns scikit-learn's
handwritten digits; continued pre-training on tiny Shakespeare lowers validation loss."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from openai import OpenAI
from openai.types.chat import ChatCompletionSystemMessageParam

from tests.stacks import embedded_stack
from tests.support import (
    FACTS,
    HELD_OUT_QUESTIONS,
    TRAIN_QUESTIONS,
    as_dict,
    extra,
    fact_chat_rows,
    fact_texts,
    jsonl,
    wait_until,
)
from tests.tiny_models import build_causal_lm
from tests.training.support import pretrain_on_other_facts

SYSTEM: ChatCompletionSystemMessageParam = {
    "role": "system",
    "content": "answer with the code word only",
}
# No warmup or decay of weights: the tiny task learns in a few steps.
pytestmark = pytest.mark.slow

SCHEDULE = {"warmup_ratio": 0.0, "weight_decay": 0.0, "max_seq_length": 128}


class Service:
    def __init__(self, base_url: str, key: str):
        self.base_url, self.key = base_url, key
        # Strict: every response is validated against the SDK's types.
        self.client = OpenAI(
            base_url=f"{base_url}/v1",
            api_key=key,
            max_retries=0,
            _strict_response_validation=True,
        )

    def upload(self, rows: list[dict[str, Any]] | bytes, name: str) -> str:
        content = rows if isinstance(rows, bytes) else jsonl(rows)
        return self.client.files.create(file=(name, content), purpose="fine-tune").id

    def train(self, timeout: float = 600, **job: Any) -> Any:
        created = self.client.fine_tuning.jobs.create(**job)
        done = wait_until(
            lambda: (
                (j := self.client.fine_tuning.jobs.retrieve(created.id)).status
                in ("succeeded", "failed", "cancelled")
                and j
            ),
            timeout,
            interval=1,
            what=f"job {created.id}",
        )
        assert done.status == "succeeded", done.error
        return done

    def predict(self, model: str, inputs: list[Any]) -> list[dict[str, Any]]:
        response = httpx.post(
            f"{self.base_url}/v1/predictions",
            headers={"Authorization": f"Bearer {self.key}"},
            json={"model": model, "input": inputs},
            timeout=120,
        )
        assert response.status_code == 200, response.text
        return list(response.json()["data"])


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama briefly pre-trained on the same questions with other answers: it speaks the
    task's language but does not know these facts (a randomly initialised model is too weak a
    base for LoRA to learn anything)."""
    tmp = tmp_path_factory.mktemp("bases")
    return pretrain_on_other_facts(build_causal_lm(tmp / "random-llama", fact_texts()), tmp)


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory, tiny_llama: Path) -> Iterator[Service]:
    tmp = tmp_path_factory.mktemp("generative")
    env = {"TUNEHOUSE_BASE_MODELS": json.dumps({"tiny-llama": str(tiny_llama)})}
    with embedded_stack(tmp, env) as (stack, key):
        yield Service(stack.base_url, key)


def ask(service: Service, model: str, question: str) -> str:
    reply = service.client.chat.completions.create(
        model=model,
        messages=[SYSTEM, {"role": "user", "content": question}],
        temperature=0,
        max_tokens=8,
    )
    return (reply.choices[0].message.content or "").strip()


def held_out_accuracy(service: Service, model: str) -> float:
    asked = [(q.format(kw=kw), a) for kw, a in FACTS.items() for q in HELD_OUT_QUESTIONS]
    return sum(ask(service, model, q) == a for q, a in asked) / len(asked)


@pytest.mark.parametrize(
    ("adapter", "hyperparameters"),
    [
        ("full", {"n_epochs": 15, "batch_size": 8, "learning_rate": 1e-3, **SCHEDULE}),
        (
            {"type": "lora", "r": 16, "alpha": 32, "dropout": 0.0},
            {"n_epochs": 15, "batch_size": 8, "learning_rate": 1e-2, **SCHEDULE},
        ),
    ],
    ids=["full", "lora"],
)
def test_chat_fine_tune_learns_the_facts(
    service: Service, adapter: Any, hyperparameters: dict[str, Any]
) -> None:
    assert held_out_accuracy(service, "tiny-llama") < 0.2, "the untrained model cannot do it"
    train = service.upload(fact_chat_rows(TRAIN_QUESTIONS), "facts.jsonl")
    valid = service.upload(fact_chat_rows(TRAIN_QUESTIONS[:1]), "facts-valid.jsonl")
    job = service.train(
        model="tiny-llama",
        training_file=train,
        validation_file=valid,
        seed=0,
        method={
            "type": "supervised",
            "supervised": {"hyperparameters": hyperparameters, "adapter": adapter},
        },
    )
    events = list(service.client.fine_tuning.jobs.list_events(job.id, limit=100))
    metrics = [as_dict(e.data) for e in events if e.type == "metrics"]
    evaluated = [d for d in metrics if "valid_loss" in d]
    assert evaluated and all("valid_mean_token_accuracy" in d for d in evaluated)

    model = service.client.models.retrieve(job.fine_tuned_model)
    assert (extra(model, "task"), extra(model, "base_model")) == ("causal-lm", "tiny-llama")
    assert held_out_accuracy(service, job.fine_tuned_model) >= 0.9

    # Streaming yields the same text as the non-streamed call.
    question = HELD_OUT_QUESTIONS[0].format(kw="castle")
    stream = service.client.chat.completions.create(
        model=job.fine_tuned_model,
        messages=[SYSTEM, {"role": "user", "content": question}],
        temperature=0,
        max_tokens=8,
        stream=True,
    )
    streamed = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert streamed.strip() == ask(service, job.fine_tuned_model, question)

    # /v1/predictions answers with text for a generative model.
    (prediction,) = service.predict(job.fine_tuned_model, ["what is the code for apple?"])
    assert isinstance(prediction["text"], str)


def test_mlp_from_scratch_learns_handwritten_digits(service: Service) -> None:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x_train, x_test, y_train, y_test = train_test_split(
        digits.data, digits.target, test_size=0.2, random_state=0, stratify=digits.target
    )
    rows = [
        {"features": x.tolist(), "label": int(y)} for x, y in zip(x_train, y_train, strict=True)
    ]
    training_file = service.upload(rows, "digits.jsonl")
    job = service.train(
        model="tunehouse/mlp",
        training_file=training_file,
        seed=0,
        method={
            "type": "supervised",
            "supervised": {
                "hyperparameters": {"n_epochs": 40, "batch_size": 64, "learning_rate": 1e-3},
                "architecture": {"hidden_sizes": [128, 64], "activation": "relu", "dropout": 0.1},
            },
        },
    )
    assert extra(service.client.models.retrieve(job.fine_tuned_model), "task") == "tabular"
    predicted = []
    rows_test = x_test.tolist()
    for start in range(0, len(rows_test), 200):
        predicted += service.predict(job.fine_tuned_model, rows_test[start : start + 200])
    accuracy = sum(p["label"] == str(int(y)) for p, y in zip(predicted, y_test, strict=True)) / len(
        y_test
    )
    assert all(abs(sum(p["scores"].values()) - 1) < 1e-3 for p in predicted)
    assert accuracy >= 0.95, accuracy


@pytest.mark.realdata
def test_continued_pretraining_on_tiny_shakespeare_lowers_validation_loss(
    service: Service, shared_data: Path
) -> None:
    text = (shared_data / "tinyshakespeare" / "input.txt").read_text()
    # Paragraphs (speeches) are rows; the first ~40 kB train, the next ~8 kB validate.
    train_text, valid_text = text[:40_000], text[40_000:48_000]
    cut = lambda s: s[: s.rfind("\n\n")]  # noqa: E731 - whole speeches only
    train = service.upload(cut(train_text).encode(), "shakespeare-train.txt")
    valid = service.upload(cut(valid_text).encode(), "shakespeare-valid.txt")
    assert extra(service.client.files.retrieve(train), "format") == "text"
    started = time.monotonic()
    job = service.train(
        model="tiny-llama",
        training_file=train,
        validation_file=valid,
        seed=0,
        hyperparameters={
            "n_epochs": 2, "batch_size": 8, "learning_rate": 3e-3,
            "max_seq_length": 128, "eval_every_steps": 5,
        },
    )  # fmt: skip
    events = list(service.client.fine_tuning.jobs.list_events(job.id, limit=100))
    metrics = [as_dict(e.data) for e in events if e.type == "metrics"]
    losses = [(d["step"], d["valid_loss"]) for d in metrics if "valid_loss" in d]
    losses.sort()
    first, last = losses[0][1], losses[-1][1]
    print(f"tiny Shakespeare: valid_loss {first:.3f} at step {losses[0][0]} -> {last:.3f} "
          f"at step {losses[-1][0]} in {time.monotonic() - started:.0f}s")  # fmt: skip
    assert last < first * 0.9
