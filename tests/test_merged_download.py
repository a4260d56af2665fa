"""A LoRA model downloaded with ``merged=true``: its adapter merged into its base (in a child
process: the API never imports torch), a full model that transformers loads alone and that
answers the same greedy tokens as the served adapter. The merge is made once, kept, counted in
the model's bytes, and left out of a plain download; a failed or slow merge leaves nothing."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from typer.testing import CliRunner

from app.cli import cli as cli_app
from app.core.db import session_scope
from app.inference.templates import DEFAULT_CHAT_TEMPLATE
from app.models import FineTunedModel
from app.services import merged_models
from tests.conftest import make_settings
from tests.inference_support import TEXTS, Live, live_server, make_adapter, register_copy
from tests.support import ROOT, jsonl, wait_until
from tests.tiny_models import build_causal_lm
from worker import supervisor

PROMPTS = ["once upon a time", "the quick brown fox", "a tiny model says"]


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_causal_lm(
        tmp_path_factory.mktemp("tiny") / "tiny-llama", TEXTS, hidden_size=32, max_positions=64
    )


@pytest.fixture(scope="module")
def adapters(tmp_path_factory: pytest.TempPathFactory, tiny_base: Path) -> list[Path]:
    tmp = tmp_path_factory.mktemp("adapters")
    return [make_adapter(tiny_base, tmp / f"a{i}", seed=i) for i in range(3)]


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory, tiny_base: Path) -> Iterator[Live]:
    data = tmp_path_factory.mktemp("server") / "data"
    settings = make_settings(data, base_models={"tiny-llama": str(tiny_base)})
    with live_server(settings) as served, pytest.MonkeyPatch.context() as env:
        # A training process (started by the supervisor) reads its settings from here.
        env.setenv("TUNEHOUSE_DATA_DIR", str(data))
        env.setenv("TUNEHOUSE_BASE_MODELS", json.dumps({"tiny-llama": str(tiny_base)}))
        yield served


def download(live: Live, model: str, merged: bool = True, key: str | None = None) -> Any:
    headers = {"Authorization": f"Bearer {key or live.key}"}
    with httpx.Client(base_url=live.base_url, headers=headers, timeout=300) as http:
        return http.get(f"/v1/models/{model}/content", params={"merged": merged} if merged else {})


def unpack(body: bytes, target: Path) -> Path:
    with tarfile.open(fileobj=io.BytesIO(body)) as archive:
        archive.extractall(target, filter="data")
    return target


def greedy_chat(live: Live, model: str, prompt: str) -> str:
    with live.client(timeout=60) as http:
        response = http.post(
            "/v1/chat/completions",
            json={"model": model, "messages": [{"role": "user", "content": prompt}],
                  "max_tokens": 8, "temperature": 0},
        )  # fmt: skip
    assert response.status_code == 200, response.text
    return str(response.json()["choices"][0]["message"]["content"])


def transformers_chat(directory: Path, prompts: list[str]) -> list[str]:
    """Greedy replies of the directory's model, loaded by transformers alone (the merged
    download's tokenizer carries its chat template)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(directory)
    if not tokenizer.chat_template:  # the base: served with Tunehouse's default template
        tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE
    model = AutoModelForCausalLM.from_pretrained(directory).eval()
    replies = []
    for prompt in prompts:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
        ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=8, do_sample=False)
        replies.append(str(tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)))
    return replies


def model_bytes(live: Live, model: str) -> int:
    with session_scope(live.settings.sqlalchemy_url) as session:
        row = session.get(FineTunedModel, model)
        assert row is not None
        return int(row.bytes or 0)


@pytest.fixture(scope="module")
def lora_model(live: Live, adapters: list[Path]) -> str:
    """A LoRA model of acme's whose adapter has random, non-zero weights."""
    return register_copy(live, adapters[0], "lora", seed=0)


def test_a_merged_download_answers_as_the_served_adapter(
    live: Live, lora_model: str, tiny_base: Path, tmp_path: Path
) -> None:
    model = lora_model
    response = download(live, model)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/x-tar"
    assert "merged.tar" in response.headers["content-disposition"]
    merged = unpack(response.content, tmp_path / "merged")
    names = {p.name for p in merged.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= names
    assert "adapter_config.json" not in names and not any(n.endswith(".bin") for n in names)

    served = [greedy_chat(live, model, prompt) for prompt in PROMPTS]
    assert transformers_chat(merged, PROMPTS) == served
    # The adapter changes the answers: the base alone says something else.
    assert transformers_chat(tiny_base, PROMPTS) != served

    # The plain download is still the adapter, without the merged copy.
    plain = download(live, model, merged=False)
    with tarfile.open(fileobj=io.BytesIO(plain.content)) as archive:
        plain_names = archive.getnames()
    assert "adapter_config.json" in plain_names
    assert not [n for n in plain_names if n.startswith(".merged")]


def train_lora(live: Live) -> str:
    """A LoRA fine-tune of tiny-llama by a real training process (started by the supervisor, as
    a worker starts it); its model's id."""
    rows = [{"messages": [{"role": "user", "content": p}, {"role": "assistant", "content": a}]}
            for p, a in zip(PROMPTS, ["a little language model", "jumps over", "hello"],
                            strict=True)] * 3  # fmt: skip
    with live.client() as http:
        upload = http.post(
            "/v1/files",
            files={"file": ("chat.jsonl", jsonl(rows), "application/octet-stream")},
            data={"purpose": "fine-tune"},
        )
        assert upload.status_code == 200, upload.text
        adapter = {"type": "lora", "r": 8, "alpha": 32, "dropout": 0.0}
        body = {
            "model": "tiny-llama",
            "training_file": upload.json()["id"],
            "method": {"type": "supervised", "supervised": {
                "adapter": adapter, "hyperparameters": {"n_epochs": 3, "batch_size": 3}}},
        }  # fmt: skip
        created = http.post("/v1/fine_tuning/jobs", json=body)
        assert created.status_code == 200, created.text
        job_id = created.json()["id"]
        wait_until(
            lambda: http.get(f"/v1/fine_tuning/jobs/{job_id}").json()["status"] == "queued",
            30, what="the job to be queued",
        )  # fmt: skip
        supervisor.supervise_job(live.settings, job_id)
        job = http.get(f"/v1/fine_tuning/jobs/{job_id}").json()
    assert job["status"] == "succeeded", job["error"]
    return str(job["fine_tuned_model"])


def tar_contents(body: bytes) -> dict[str, bytes]:
    with tarfile.open(fileobj=io.BytesIO(body)) as archive:
        return {m.name: archive.extractfile(m).read() for m in archive if m.isfile()}  # type: ignore[union-attr]


def test_a_lora_fine_tune_merges_once_for_concurrent_downloads_and_answers_the_same(
    live: Live, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A LoRA model trained by a job (its tokenizer saved with the chat template it trained
    with). Two first downloads at once: both get it, merged once. Through transformers, the
    same greedy tokens as through the server."""
    model = train_lora(live)
    assert "adapter_config.json" in tar_contents(download(live, model, merged=False).content)
    before = model_bytes(live, model)
    merges: list[str] = []
    real = merged_models._run_merge

    def counted(source: Any, *args: Any) -> None:
        merges.append(source.model_id)
        real(source, *args)

    monkeypatch.setattr(merged_models, "_run_merge", counted)
    bodies: list[Any] = [None, None]

    def fetch(i: int) -> None:
        bodies[i] = download(live, model)

    threads = [threading.Thread(target=fetch, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert [b.status_code for b in bodies] == [200, 200], [b.text for b in bodies]
    assert merges == [model]
    assert tar_contents(bodies[0].content) == tar_contents(bodies[1].content)
    # A later download reuses it; its bytes were counted once, in the model's.
    assert download(live, model).status_code == 200
    assert merges == [model]
    merged_bytes = sum(len(data) for data in tar_contents(bodies[0].content).values())
    assert model_bytes(live, model) == before + merged_bytes

    merged = unpack(bodies[0].content, tmp_path / "merged")
    served = [greedy_chat(live, model, prompt) for prompt in PROMPTS]
    assert transformers_chat(merged, PROMPTS) == served


def test_the_api_process_merges_without_importing_torch(
    live: Live, adapters: list[Path], tmp_path: Path
) -> None:
    model = register_copy(live, adapters[1], "lora", seed=1)
    script = (
        "import io, json, sys, tarfile\n"
        "from fastapi.testclient import TestClient\n"
        "from app.core.settings import Settings\n"
        "from app.main import create_app\n"
        "settings = Settings(_env_file=None, **json.loads(sys.argv[1]))\n"
        "with TestClient(create_app(settings)) as client:\n"
        "    r = client.get(sys.argv[2] + '/content', params={'merged': 'true'},\n"
        "                   headers={'Authorization': 'Bearer ' + sys.argv[3]})\n"
        "assert r.status_code == 200, r.text\n"
        "names = tarfile.open(fileobj=io.BytesIO(r.content)).getnames()\n"
        "assert 'model.safetensors' in names, names\n"
        "heavy = sorted(m for m in ('torch', 'transformers', 'peft') if m in sys.modules)\n"
        "assert not heavy, heavy\n"
    )
    overrides = {
        "data_dir": str(live.settings.data_dir),
        "base_models": {"tiny-llama": str(live.settings.registered_base_models()["tiny-llama"])},
        "role": "control",
    }
    done = subprocess.run(
        [sys.executable, "-c", script, json.dumps(overrides), f"/v1/models/{model}", live.key],
        cwd=ROOT, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]


def test_merged_is_refused_for_a_model_that_is_not_an_adapter(live: Live, tiny_base: Path) -> None:
    full = register_copy(live, tiny_base, "full", seed=9)
    response = download(live, full)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == "merged" and error["code"] == "not_a_lora_adapter"
    assert "without merged=true" in error["message"]
    unknown = download(live, "ft:tiny-llama:acme:nope:00000001")
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "model_not_found"


def test_a_failed_merge_is_a_clear_error_and_leaves_nothing(
    live: Live, adapters: list[Path], tmp_path: Path
) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    for path in adapters[2].iterdir():
        (broken / path.name).write_bytes(path.read_bytes())
    config = json.loads((broken / "adapter_config.json").read_text())
    (broken / "adapter_config.json").write_text(
        json.dumps({**config, "target_modules": ["no_such_module"]})
    )
    model = register_copy(live, broken, "broken", seed=3)
    before = model_bytes(live, model)
    response = download(live, model)
    assert response.status_code == 500, response.text
    error = response.json()["error"]
    assert error["code"] == "merge_failed" and error["type"] == "server_error"
    assert "Merging the adapter" in error["message"]
    assert str(live.settings.storage_root) not in error["message"]
    stored = live.settings.storage_root / "models" / f"ftjob-broken{3:010d}"
    assert not [p.name for p in stored.iterdir() if p.name.startswith(".merged") and p.is_dir()]
    assert model_bytes(live, model) == before


def test_a_merge_past_its_timeout_is_stopped_and_leaves_nothing(
    live: Live, adapters: list[Path]
) -> None:
    model = register_copy(live, adapters[2], "slow", seed=3)
    settings = make_settings(
        live.settings.data_dir,
        base_models={"tiny-llama": str(live.settings.registered_base_models()["tiny-llama"])},
        merge_timeout_seconds=0.2,
    )
    with live_server(settings) as short:
        headers = {"Authorization": f"Bearer {live.key}"}
        with httpx.Client(base_url=short.base_url, headers=headers, timeout=60) as http:
            response = http.get(f"/v1/models/{model}/content", params={"merged": True})
    assert response.status_code == 500, response.text
    assert response.json()["error"]["code"] == "merge_timeout"
    assert "merge_timeout_seconds" in response.json()["error"]["message"]
    stored = live.settings.storage_root / "models" / f"ftjob-slow{3:010d}"
    assert not [p.name for p in stored.iterdir() if p.is_dir()]


def test_the_cli_downloads_merged_weights(live: Live, lora_model: str, tmp_path: Path) -> None:
    target = tmp_path / "m.tar"
    result = CliRunner().invoke(
        cli_app,
        ["models", "download", lora_model, "--merged", "-o", str(target), "--extract",
         str(tmp_path / "m"), "--base-url", f"{live.base_url}/v1", "--api-key", live.key],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert (tmp_path / "m" / "model.safetensors").is_file()
    assert not (tmp_path / "m" / "adapter_config.json").exists()
