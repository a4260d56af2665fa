"""DPO through the API: OpenAI's preference files and `method: {"type": "dpo", ...}` jobs.

In-process (no worker): bad preference rows are refused at upload with their line number and
nothing is stored; a DPO job needs a preference file, and a preference file needs a DPO job;
beta "auto" and the Tunehouse extensions resolve into the stored method.

Through `tunehouse run` with the official openai SDK: a DPO job on a tiny causal LM built here
succeeds, its events carry the DPO metrics, its checkpoints their validation figures, and its
model answers chat completions.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from openai import OpenAI

from app.core.db import session_scope
from app.core.migrate import upgrade
from app.main import create_app
from app.services import keys
from tests.conftest import Api, make_settings
from tests.stacks import embedded_stack
from tests.support import as_dict, extra, jsonl, wait_until
from tests.test_bad_input import assert_error, changes_nothing
from tests.tiny_models import build_causal_lm
from tests.training.test_dpo import (
    HELD_OUT_TOPICS,
    TRAIN_TOPICS,
    plain_chat_rows,
    preference_rows,
    prompt,
    style_texts,
)

TINY = "tiny-llama"
DPO_METRICS = (
    "reward_accuracy",
    "reward_margin",
    "rewards_chosen",
    "rewards_rejected",
    "logps_chosen",
    "logps_rejected",
)


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_causal_lm(tmp_path_factory.mktemp("bases") / "tiny", style_texts())


@pytest.fixture
def dpo_api(tmp_path: Path, tiny_llama: Path) -> Iterator[Api]:
    """The `api` fixture, with a tiny causal LM registered as base model 'tiny-llama'."""
    settings = make_settings(tmp_path / "data", base_models={TINY: str(tiny_llama)})
    upgrade(settings.sqlalchemy_url)
    with session_scope(settings.sqlalchemy_url) as session:
        key_a = keys.create_key(session, "org-a").key
        key_b = keys.create_key(session, "org-b").key
    with TestClient(create_app(settings)) as client:
        yield Api(client, settings, key_a, key_b)


def post_file(api: Api, content: bytes) -> Any:
    return api.client.post(
        "/v1/files",
        headers=api.headers(),
        files={"file": ("prefs.jsonl", content, "application/octet-stream")},
        data={"purpose": "fine-tune"},
    )


def uploaded(api: Api, rows: list[dict[str, Any]]) -> dict[str, Any]:
    response = post_file(api, jsonl(rows))
    assert response.status_code == 200, response.text
    return dict(response.json())


def create(api: Api, training_file: str, method: dict[str, Any], **body: Any) -> Any:
    payload = {"model": TINY, "training_file": training_file, "method": method, **body}
    return api.client.post("/v1/fine_tuning/jobs", headers=api.headers(), json=payload)


def dpo(hyperparameters: dict[str, Any] | None = None, **settings: Any) -> dict[str, Any]:
    return {"type": "dpo", "dpo": {"hyperparameters": hyperparameters or {}, **settings}}


# --- files --------------------------------------------------------------------------------------


def test_a_preference_file_is_stored_with_its_format_and_stats(dpo_api: Api) -> None:
    file = uploaded(dpo_api, preference_rows(TRAIN_TOPICS))
    assert file["format"] == "preference"
    assert file["stats"]["rows"] == len(TRAIN_TOPICS)
    assert file["stats"]["input_messages_per_row"] == {"min": 2, "mean": 2.0, "max": 2}


def bad_rows(broken: dict[str, Any]) -> bytes:
    """Three good rows with ``broken`` on line 3."""
    rows = preference_rows(TRAIN_TOPICS[:3])
    rows[2] = broken
    return jsonl(rows)


GOOD = preference_rows(["apples"])[0]


@pytest.mark.parametrize(
    ("row", "words"),
    [
        (
            {k: v for k, v in GOOD.items() if k != "preferred_output"},
            "missing required field 'preferred_output'",
        ),
        (
            {**GOOD, "non_preferred_output": GOOD["preferred_output"]},
            "preferred_output and non_preferred_output are the same",
        ),
        (
            {**GOOD, "preferred_output": GOOD["preferred_output"] * 2},
            "'preferred_output' must hold exactly one assistant message",
        ),
        (
            {**GOOD, "non_preferred_output": [{"role": "user", "content": "hi"}]},
            "non_preferred_output[0]: role must be 'assistant'",
        ),
        (
            {**GOOD, "preferred_output": {"role": "assistant", "content": "hi"}},
            "'preferred_output' must be an array",
        ),
        (
            {**GOOD, "input": {"messages": []}},
            "'input.messages' is empty",
        ),
        (
            {**GOOD, "input": {"messages": [{"role": "user", "content": 7}]}},
            "input.messages[0]: field 'content' must be a string",
        ),
    ],
    ids=[
        "no-preferred-output",
        "identical-outputs",
        "two-messages",
        "not-assistant",
        "not-an-array",
        "empty-input",
        "bad-input-message",
    ],
)
def test_bad_preference_rows_are_refused_with_their_line(
    dpo_api: Api, row: dict[str, Any], words: str
) -> None:
    with changes_nothing(dpo_api):
        error = assert_error(post_file(dpo_api, bad_rows(row)), 400, words=words)
    assert "'prefs.jsonl': line 3: " in error["message"], error["message"]


# --- jobs ---------------------------------------------------------------------------------------


def test_a_dpo_job_resolves_beta_and_stores_its_method(dpo_api: Api) -> None:
    file = uploaded(dpo_api, preference_rows(TRAIN_TOPICS))
    response = create(dpo_api, file["id"], dpo({"beta": "auto", "n_epochs": 2}))
    assert response.status_code == 200, response.text
    job = response.json()
    stored = job["method"]["dpo"]["hyperparameters"]
    assert job["method"]["type"] == "dpo" and job["method"]["dpo"]["adapter"] == "full"
    assert (stored["beta"], stored["loss"], stored["rpo_alpha"]) == (0.1, "sigmoid", None)
    assert (stored["n_epochs"], stored["batch_size"], stored["learning_rate"]) == (2, 8, 1e-6)
    assert job["hyperparameters"]["beta"] == 0.1 and "simpo_gamma" not in stored

    lora = {"type": "lora", "r": 4, "alpha": 8, "dropout": 0.0}
    method = dpo({"beta": 0.5, "loss": "simpo", "rpo_alpha": 0.2}, adapter=lora)
    job = create(dpo_api, file["id"], method).json()
    stored = job["method"]["dpo"]["hyperparameters"]
    assert (stored["beta"], stored["loss"], stored["rpo_alpha"]) == (0.5, "simpo", 0.2)
    assert stored["simpo_gamma"] == 0.5 and stored["learning_rate"] == 1e-5
    assert job["method"]["dpo"]["adapter"]["r"] == 4


def test_dpo_and_its_files_must_match(dpo_api: Api) -> None:
    chat = uploaded(dpo_api, plain_chat_rows(TRAIN_TOPICS))
    preferences = uploaded(dpo_api, preference_rows(TRAIN_TOPICS))
    with changes_nothing(dpo_api):
        # A dpo job with a supervised file, and a supervised job with a preference file.
        assert_error(
            create(dpo_api, chat["id"], dpo()), 400, param="training_file", words="preference"
        )
        assert_error(
            create(dpo_api, preferences["id"], {"type": "supervised"}),
            400,
            param="training_file",
            words="dpo",
        )
        assert_error(
            create(dpo_api, preferences["id"], dpo(), validation_file=chat["id"]),
            400,
            param="validation_file",
        )
        # Settings of the other method, an option of another loss, out-of-bounds values.
        assert_error(
            create(dpo_api, preferences["id"], {"type": "dpo", "supervised": {}}),
            400,
            param="method",
        )
        assert_error(
            create(dpo_api, preferences["id"], dpo({"simpo_gamma": 1.0})),
            400,
            param="simpo_gamma",
        )
        for bad in ({"beta": 0}, {"beta": "high"}, {"loss": "hinge"}, {"rpo_alpha": -1}):
            assert_error(create(dpo_api, preferences["id"], dpo(bad)), 400, param="dpo")
        assert_error(
            create(dpo_api, preferences["id"], dpo({"packing": True})), 400, param="packing"
        )


def test_dpo_needs_a_causal_language_model(dpo_api: Api) -> None:
    preferences = uploaded(dpo_api, preference_rows(TRAIN_TOPICS))
    with changes_nothing(dpo_api):
        response = dpo_api.client.post(
            "/v1/fine_tuning/jobs",
            headers=dpo_api.headers(),
            json={
                "model": "sentence-transformers/all-MiniLM-L6-v2",
                "training_file": preferences["id"],
                "method": dpo(),
            },
        )
        assert_error(response, 400, param="model", words="causal language model")


# --- end to end ---------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_dpo_job_through_the_sdk(tiny_llama: Path, tmp_path: Path) -> None:
    env = {"TUNEHOUSE_BASE_MODELS": json.dumps({TINY: str(tiny_llama)})}
    with embedded_stack(tmp_path, env) as (stack, key):
        client = OpenAI(base_url=f"{stack.base_url}/v1", api_key=key, max_retries=0)
        train = client.files.create(
            file=("prefs.jsonl", jsonl(preference_rows(TRAIN_TOPICS))), purpose="fine-tune"
        )
        valid = client.files.create(
            file=("prefs-valid.jsonl", jsonl(preference_rows(HELD_OUT_TOPICS))),
            purpose="fine-tune",
        )
        created = client.fine_tuning.jobs.create(
            model=TINY,
            training_file=train.id,
            validation_file=valid.id,
            seed=0,
            method={
                "type": "dpo",
                "dpo": {
                    "hyperparameters": {
                        "beta": "auto",
                        "n_epochs": 2,
                        "batch_size": 8,
                        "learning_rate_multiplier": 100,
                    }
                },
            },
        )
        assert created.method is not None and created.method.type == "dpo"
        assert created.method.dpo is not None and created.method.dpo.hyperparameters is not None
        assert created.method.dpo.hyperparameters.beta == 0.1
        job = wait_until(
            lambda: (
                (j := client.fine_tuning.jobs.retrieve(created.id)).status
                in ("succeeded", "failed", "cancelled")
                and j
            ),
            300,
            interval=1,
            what=f"job {created.id}",
        )
        assert job.status == "succeeded", job.error
        assert job.trained_tokens and job.fine_tuned_model.startswith(f"ft:{TINY}:")

        events = list(client.fine_tuning.jobs.list_events(job.id, limit=100))
        metrics = [as_dict(e.data) for e in events if e.type == "metrics"]
        last = max(metrics, key=lambda d: d["step"])
        assert last["step"] == 4
        for name in DPO_METRICS:
            assert f"train_{name}" in last and f"valid_{name}" in last, name
        assert "train_loss" in last and "valid_loss" in last

        checkpoints = list(client.fine_tuning.jobs.checkpoints.list(job.id))
        assert checkpoints and 0 <= extra(checkpoints[0].metrics, "valid_reward_accuracy") <= 1

        reply = client.chat.completions.create(
            model=job.fine_tuned_model,
            messages=prompt(HELD_OUT_TOPICS[0]),  # type: ignore[arg-type]
            temperature=0,
            max_tokens=8,
        )
        assert reply.choices[0].finish_reason in ("stop", "length")
        assert isinstance(reply.choices[0].message.content, str)
