"""Conformance: the official `openai` SDK's documented fine-tuning examples, replayed against
`tunehouse run` with data files in OpenAI's formats. The client validates every response against
the SDK's types in strict mode (`_strict_response_validation=True`): a field of the wrong type,
or a missing required one, raises `APIResponseValidationError` instead of passing quietly.

The examples follow OpenAI's API reference for fine-tuning (jobs create, list with metadata,
retrieve, events, checkpoints, pause, resume, cancel), files and models, and chat completions
with the fine-tuned model."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
from openai import OpenAI
from openai.types import FileObject, Model, ModelDeleted
from openai.types.chat import ChatCompletion
from openai.types.fine_tuning import FineTuningJob, FineTuningJobEvent
from openai.types.fine_tuning.jobs import FineTuningJobCheckpoint

from tests.stacks import embedded_stack
from tests.support import (
    FACTS,
    HELD_OUT_QUESTIONS,
    TRAIN_QUESTIONS,
    as_dict,
    fact_chat_rows,
    fact_texts,
    jsonl,
    wait_until,
)
from tests.tiny_models import build_causal_lm

pytestmark = pytest.mark.slow

TERMINAL = ("succeeded", "failed", "cancelled")


class Sdk:
    """The SDK as a user makes it, strict."""

    def __init__(self, base_url: str, key: str):
        self.client = OpenAI(
            base_url=f"{base_url}/v1",
            api_key=key,
            max_retries=0,
            _strict_response_validation=True,
        )

    def upload(self, rows: list[dict[str, Any]], name: str) -> FileObject:
        return self.client.files.create(file=(name, jsonl(rows)), purpose="fine-tune")

    def wait(
        self, job_id: str, statuses: tuple[str, ...] = TERMINAL, timeout: float = 300
    ) -> FineTuningJob:
        job: FineTuningJob = wait_until(
            lambda: (j := self.client.fine_tuning.jobs.retrieve(job_id)).status in statuses and j,
            timeout,
            interval=0.5,
            what=f"job {job_id} to be one of {statuses}",
        )
        return job


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_causal_lm(tmp_path_factory.mktemp("bases") / "tiny-llama", fact_texts())


@pytest.fixture(scope="module")
def sdk(tmp_path_factory: pytest.TempPathFactory, tiny_llama: Path) -> Iterator[Sdk]:
    tmp = tmp_path_factory.mktemp("conformance")
    env = {"TUNEHOUSE_BASE_MODELS": json.dumps({"tiny-llama": str(tiny_llama)})}
    with embedded_stack(tmp, env) as (stack, key):
        yield Sdk(stack.base_url, key)


@pytest.fixture(scope="module")
def chat_files(sdk: Sdk) -> tuple[str, str]:
    train = sdk.upload(fact_chat_rows(TRAIN_QUESTIONS), "train.jsonl")
    valid = sdk.upload(fact_chat_rows(TRAIN_QUESTIONS[:1]), "valid.jsonl")
    assert isinstance(train, FileObject) and train.purpose == "fine-tune"
    assert sdk.client.files.retrieve(train.id).id == train.id
    assert train.id in {f.id for f in sdk.client.files.list(purpose="fine-tune")}
    return train.id, valid.id


def test_supervised_job_as_in_openais_reference(sdk: Sdk, chat_files: tuple[str, str]) -> None:
    client = sdk.client
    train, valid = chat_files
    created = client.fine_tuning.jobs.create(
        training_file=train,
        validation_file=valid,
        model="tiny-llama",
        suffix="conformance",
        seed=42,
        metadata={"team": "search", "run": "1"},
        method={
            "type": "supervised",
            "supervised": {
                "hyperparameters": {
                    "n_epochs": 2,
                    "batch_size": 8,
                    "learning_rate_multiplier": "auto",
                }
            },
        },
    )
    assert isinstance(created, FineTuningJob)
    assert created.object == "fine_tuning.job" and created.model == "tiny-llama"
    assert created.seed == 42 and created.metadata == {"team": "search", "run": "1"}
    assert created.method is not None and created.method.type == "supervised"

    job = sdk.wait(created.id)
    assert job.status == "succeeded", job.error
    assert job.fine_tuned_model is not None
    assert (
        job.fine_tuned_model.startswith("ft:tiny-llama:")
        and ":conformance:" in job.fine_tuned_model
    )
    assert job.trained_tokens is not None and job.trained_tokens > 0
    assert job.finished_at is not None and job.finished_at >= job.created_at
    assert job.method is not None and job.method.supervised is not None
    hyperparameters = job.method.supervised.hyperparameters
    assert hyperparameters is not None
    assert hyperparameters.n_epochs == 2 and hyperparameters.batch_size == 8
    assert isinstance(hyperparameters.learning_rate_multiplier, float)  # "auto", resolved

    # jobs.list, with and without a metadata filter.
    listed = client.fine_tuning.jobs.list(limit=10)
    assert created.id in [j.id for j in listed.data]
    assert [j.id for j in client.fine_tuning.jobs.list(metadata={"team": "search"})] == [created.id]
    assert list(client.fine_tuning.jobs.list(metadata={"team": "other"})) == []

    # Events, paged by the SDK (limit 2 forces several pages).
    events = list(client.fine_tuning.jobs.list_events(fine_tuning_job_id=created.id, limit=2))
    assert all(isinstance(e, FineTuningJobEvent) for e in events)
    assert len({e.id for e in events}) == len(events) > 2
    assert any(e.type == "metrics" for e in events)
    assert events[0].created_at >= events[-1].created_at  # newest first

    # Checkpoints, with OpenAI's metric keys.
    checkpoints = list(client.fine_tuning.jobs.checkpoints.list(created.id))
    assert checkpoints and all(isinstance(c, FineTuningJobCheckpoint) for c in checkpoints)
    last = checkpoints[0]
    assert last.fine_tuning_job_id == created.id
    assert last.fine_tuned_model_checkpoint.startswith(job.fine_tuned_model + ":ckpt-step-")
    assert last.metrics.train_loss is not None

    # The model, and a chat completion from it.
    model = client.models.retrieve(job.fine_tuned_model)
    assert isinstance(model, Model) and model.id == job.fine_tuned_model
    assert job.fine_tuned_model in {m.id for m in client.models.list()}
    completion = client.chat.completions.create(
        model=job.fine_tuned_model,
        messages=[
            {"role": "system", "content": "answer with the code word only"},
            {"role": "user", "content": TRAIN_QUESTIONS[0].format(kw="castle")},
        ],
        temperature=0,
        max_tokens=8,
    )
    assert isinstance(completion, ChatCompletion)
    assert completion.model == job.fine_tuned_model
    assert completion.choices[0].message.role == "assistant"
    assert completion.usage is not None and completion.usage.completion_tokens > 0

    deleted = client.models.delete(job.fine_tuned_model)
    assert (
        isinstance(deleted, ModelDeleted) and deleted.deleted and deleted.id == job.fine_tuned_model
    )
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve(job.fine_tuned_model)


def test_pause_resume_and_cancel(sdk: Sdk, chat_files: tuple[str, str]) -> None:
    client = sdk.client
    train, _ = chat_files
    job = client.fine_tuning.jobs.create(
        training_file=train,
        model="tiny-llama",
        hyperparameters={"n_epochs": 50, "batch_size": 1},
    )
    # The SDK's FineTuningJob.status Literal lacks "paused", though the API reference's pause
    # example answers with it: a strict client refuses a paused job. The pause and the paused job
    # are read with the SDK's default (lax) validation, everything else strictly.
    lax = sdk.client.with_options()
    lax._strict_response_validation = False
    # A job checks its files first; only a queued or running job can be paused (409 before).
    wait_until(
        lambda: client.fine_tuning.jobs.retrieve(job.id).status != "validating_files",
        120,
        what="the job's files to be checked",
    )
    paused = lax.fine_tuning.jobs.pause(job.id)
    assert isinstance(paused, FineTuningJob) and paused.id == job.id
    wait_until(
        lambda: lax.fine_tuning.jobs.retrieve(job.id).status == "paused",
        120,
        what="the job to be paused",
    )
    resumed = client.fine_tuning.jobs.resume(job.id)
    assert resumed.status in ("queued", "running")
    cancelled = client.fine_tuning.jobs.cancel(job.id)
    assert cancelled.id == job.id
    assert sdk.wait(job.id).status == "cancelled"
    with pytest.raises(openai.ConflictError):
        client.fine_tuning.jobs.resume(job.id)


def test_errors_are_the_sdks_exceptions(sdk: Sdk, chat_files: tuple[str, str]) -> None:
    client = sdk.client
    with pytest.raises(openai.NotFoundError) as missing:
        client.fine_tuning.jobs.retrieve("ftjob-doesnotexist")
    assert missing.value.status_code == 404
    with pytest.raises(openai.BadRequestError) as bad:
        client.files.create(file=("bad.jsonl", b'{"messages": "hello"}\n'), purpose="fine-tune")
    assert "line 1" in bad.value.message
    with pytest.raises(openai.BadRequestError) as no_model:
        client.fine_tuning.jobs.create(training_file=chat_files[0], model="no-such-model")
    assert no_model.value.param == "model"
    with pytest.raises(openai.AuthenticationError):
        OpenAI(base_url=str(client.base_url), api_key="sk-th-wrong", max_retries=0).models.list()


def preference_rows(questions: list[str]) -> list[dict[str, Any]]:
    """OpenAI's preference format: the code word preferred to a refusal."""
    return [
        {
            "input": {
                "messages": [
                    {"role": "system", "content": "answer with the code word only"},
                    {"role": "user", "content": question.format(kw=kw)},
                ]
            },
            "preferred_output": [{"role": "assistant", "content": answer}],
            "non_preferred_output": [{"role": "assistant", "content": "I am not sure."}],
        }
        for kw, answer in FACTS.items()
        for question in questions
    ]


def test_sft_then_dpo_from_the_sft_model(sdk: Sdk, chat_files: tuple[str, str]) -> None:
    """OpenAI's flow: a supervised LoRA job, then a DPO job whose model is the SFT model; then a
    job continued from one of the DPO job's checkpoints."""
    client = sdk.client
    lora = {"type": "lora", "r": 8, "alpha": 16, "dropout": 0.0}
    # The adapter is Tunehouse's extension of the method, outside the SDK's TypedDict.
    supervised: Any = {"hyperparameters": {"n_epochs": 1}, "adapter": lora}
    sft = client.fine_tuning.jobs.create(
        training_file=chat_files[0],
        model="tiny-llama",
        suffix="sft",
        method={"type": "supervised", "supervised": supervised},
    )
    sft = sdk.wait(sft.id)
    assert sft.status == "succeeded", sft.error
    assert sft.fine_tuned_model is not None

    preferences = sdk.upload(preference_rows(TRAIN_QUESTIONS[:2]), "preferences.jsonl")
    held_out = sdk.upload(preference_rows(HELD_OUT_QUESTIONS[:1]), "preferences-valid.jsonl")
    dpo = client.fine_tuning.jobs.create(
        training_file=preferences.id,
        validation_file=held_out.id,
        model=sft.fine_tuned_model,
        suffix="dpo",
        method={"type": "dpo", "dpo": {"hyperparameters": {"beta": "auto", "n_epochs": 2}}},
    )
    assert dpo.model == sft.fine_tuned_model
    dpo = sdk.wait(dpo.id)
    assert dpo.status == "succeeded", dpo.error
    assert dpo.method is not None and dpo.method.type == "dpo" and dpo.method.dpo is not None
    assert dpo.method.dpo.hyperparameters is not None
    assert dpo.method.dpo.hyperparameters.beta == 0.1  # "auto", resolved
    # The name keeps the root base; the job's lineage names its parent.
    assert dpo.fine_tuned_model is not None
    assert dpo.fine_tuned_model.startswith("ft:tiny-llama:") and ":dpo:" in dpo.fine_tuned_model
    assert (dpo.model_extra or {})["lineage"]["parent_model"] == sft.fine_tuned_model
    assert (dpo.model_extra or {})["lineage"]["parent_adapter"] == "continue"

    events = list(client.fine_tuning.jobs.list_events(dpo.id, limit=100))
    metrics = [as_dict(e.data) for e in events if e.type == "metrics"]
    assert metrics and all("train_reward_accuracy" in m for m in metrics)
    assert any("valid_reward_margin" in m for m in metrics)
    checkpoints = list(client.fine_tuning.jobs.checkpoints.list(dpo.id))
    assert checkpoints and all(isinstance(c, FineTuningJobCheckpoint) for c in checkpoints)

    reply = client.chat.completions.create(
        model=dpo.fine_tuned_model,
        messages=[{"role": "user", "content": TRAIN_QUESTIONS[0].format(kw="apple")}],
        max_tokens=4,
        temperature=0,
    )
    assert isinstance(reply, ChatCompletion) and reply.choices[0].message.role == "assistant"

    # Continued again, from the DPO job's first checkpoint.
    checkpoint = checkpoints[-1].fine_tuned_model_checkpoint
    assert ":ckpt-step-" in checkpoint
    more = sdk.wait(
        client.fine_tuning.jobs.create(
            training_file=chat_files[0],
            model=checkpoint,
            suffix="more",
            hyperparameters={"n_epochs": 1},
        ).id
    )
    assert more.status == "succeeded", more.error
    assert more.model == checkpoint and more.fine_tuned_model is not None
    assert more.fine_tuned_model.startswith("ft:tiny-llama:")


def test_a_model_of_another_organization_is_not_found(
    sdk: Sdk, chat_files: tuple[str, str]
) -> None:
    with pytest.raises(openai.NotFoundError) as missing:
        sdk.client.fine_tuning.jobs.create(
            training_file=chat_files[0], model="ft:tiny-llama:someone-else:x:12345678"
        )
    assert missing.value.code == "model_not_found" and missing.value.param == "model"


WEATHER: Any = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}


def test_tool_calling_files_and_a_dpo_job_on_tool_calls(sdk: Sdk) -> None:
    """OpenAI's tool-calling formats: a chat file with tools, tool_calls and tool messages, and a
    preference file whose preferred reply is a call; a DPO job trains on the latter, and a chat
    completion with tools answers in the SDK's shape."""
    client = sdk.client

    def asked(city: str) -> Any:
        return {"role": "user", "content": f"weather in {city}?"}

    def called(city: str) -> dict[str, Any]:
        arguments = json.dumps({"city": city})
        function = {"name": "get_weather", "arguments": arguments}
        return {
            "role": "assistant",
            "tool_calls": [{"id": "call_1", "type": "function", "function": function}],
        }

    cities = ["Paris", "London", "Berlin", "Madrid"]
    chat = [
        {
            "messages": [
                asked(city),
                called(city),
                {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
                {"role": "assistant", "content": f"It is sunny in {city}."},
            ],
            "tools": [WEATHER],
            "parallel_tool_calls": False,
        }
        for city in cities
    ]
    chat_file = sdk.upload(chat, "tools.jsonl")
    assert chat_file.status == "processed"
    broken = called("Rome")
    broken["tool_calls"][0]["function"]["arguments"] = "{not json"
    bad = [{"messages": [asked("Rome"), broken], "tools": [WEATHER]}]
    with pytest.raises(openai.BadRequestError) as refused:
        sdk.upload(bad, "bad-tools.jsonl")
    assert "line 1" in refused.value.message

    preferences = [
        {
            "input": {"messages": [asked(city)], "tools": [WEATHER]},
            "preferred_output": [called(city)],
            "non_preferred_output": [{"role": "assistant", "content": "I cannot tell."}],
        }
        for city in cities
    ]
    job = client.fine_tuning.jobs.create(
        training_file=sdk.upload(preferences, "tool-preferences.jsonl").id,
        model="tiny-llama",
        method={"type": "dpo", "dpo": {"hyperparameters": {"n_epochs": 1, "batch_size": 2}}},
    )
    done = sdk.wait(job.id)
    assert done.status == "succeeded", done.error
    assert done.fine_tuned_model is not None

    completion = client.chat.completions.create(
        model=done.fine_tuned_model,
        messages=[asked("Rome")],
        tools=[WEATHER],
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        max_tokens=24,
        temperature=0,
    )
    assert isinstance(completion, ChatCompletion)
    choice = completion.choices[0]
    # A call when the model wrote a well-formed one, else its text: either way the SDK's shape.
    if choice.finish_reason == "tool_calls":
        assert choice.message.tool_calls and choice.message.tool_calls[0].type == "function"
    else:
        assert choice.message.tool_calls is None and isinstance(choice.message.content, str)
