"""Helpers for the inference tests: an app served by a real uvicorn in a thread (so a test can
time a request out, or hang up on one), fine-tuned models registered straight into the database
(LoRA adapters made with peft, full copies of a tiny base), and a throttle that holds a model's
forward passes until the test lets them go."""

from __future__ import annotations

import json
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import httpx
import uvicorn
from fastapi import FastAPI

from app.core.db import session_scope
from app.core.migrate import upgrade
from app.core.settings import Settings
from app.main import create_app
from app.models import FineTunedModel
from app.services import keys
from tests.support import free_port

TEXTS = [
    "the quick brown fox jumps over the lazy dog",
    "a tiny model says hello to the world",
    "once upon a time there was a little language model",
] * 5


@dataclass
class Live:
    """An app served over real HTTP, with one organization and its key."""

    app: FastAPI
    settings: Settings
    base_url: str
    key: str
    org_id: str
    org_name: str

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"}

    def client(self, timeout: float = 30) -> httpx.Client:
        return httpx.Client(base_url=self.base_url, headers=self.headers, timeout=timeout)

    def complete(self, model: str, prompt: str = "once upon a time", **extra: Any) -> str:
        """A greedy completion's text; fails if it takes more than 30 s (a hang)."""
        with self.client() as http:
            response = http.post(
                "/v1/completions",
                json={"model": model, "prompt": prompt, "max_tokens": 8, "temperature": 0, **extra},
            )
        assert response.status_code == 200, response.text
        return str(response.json()["choices"][0]["text"])

    def predict(self, model: str, text: str = "once upon a time") -> str:
        with self.client() as http:
            response = http.post("/v1/predictions", json={"model": model, "input": [text]})
        assert response.status_code == 200, response.text
        return str(response.json()["data"][0]["text"])


@contextmanager
def live_server(settings: Settings, lifespan: Literal["on", "off"] = "off") -> Iterator[Live]:
    """``create_app(settings)`` behind uvicorn on a free port, in a daemon thread: a request that
    hangs fails its client's timeout instead of the whole test session. ``lifespan="on"`` runs
    the app's start-up and shut-down (the inference role's model warmer)."""
    upgrade(settings.sqlalchemy_url)
    with session_scope(settings.sqlalchemy_url) as session:
        new = keys.create_key(session, "acme")
        key, org_id, org_name = new.key, new.organization.id, new.organization.name
    app = create_app(settings)
    port = free_port()
    config = uvicorn.Config(
        app, host="127.0.0.1", port=port, log_level="warning", lifespan=lifespan,
        timeout_graceful_shutdown=1,
    )  # fmt: skip
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.02)
    try:
        yield Live(app, settings, f"http://127.0.0.1:{port}", key, org_id, org_name)
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def _register(live: Live, model_id: str, job_id: str, base: str = "tiny-llama") -> None:
    with session_scope(live.settings.sqlalchemy_url) as session:
        session.add(
            FineTunedModel(
                id=model_id, organization_id=live.org_id, task="causal-lm",
                base_model=base, job_id=job_id, storage_path=f"models/{job_id}",
            )
        )  # fmt: skip


def make_adapter(base: Path, path: Path, seed: int, rank: int = 8, alpha: int = 64) -> Path:
    """Save a LoRA adapter of ``base`` with random (non-zero) weights to ``path``, as a
    training job saves one (safetensors), with the base's tokenizer."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base)
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=["q_proj", "v_proj"],
                        init_lora_weights=False)  # fmt: skip
    get_peft_model(model, config).save_pretrained(str(path))
    AutoTokenizer.from_pretrained(base).save_pretrained(path)
    return path


def register_copy(live: Live, source: Path, name: str, seed: int) -> str:
    """A fine-tuned model of tiny-llama whose directory is a copy of ``source`` (a LoRA adapter
    when it holds adapter_config.json, else a full model)."""
    job_id = f"ftjob-{name}{seed:010d}"
    shutil.copytree(source, live.settings.storage_root / "models" / job_id)
    model_id = f"ft:tiny-llama:{live.org_name}:{name}:{seed:08d}"
    _register(live, model_id, job_id)
    return model_id


@dataclass
class Throttle:
    """Wraps a causal LM's forward pass: counts calls, and while ``gate`` is clear each call
    waits for it (up to 30 s), so a test can hold a generation in the middle."""

    gate: threading.Event = field(default_factory=threading.Event)
    delay: float = 0.0
    calls: int = 0

    def install(self, monkeypatch: Any) -> Throttle:
        """Wrap every Llama's forward pass for the rest of the test (the gate starts open)."""
        from transformers.models.llama import modeling_llama

        self.gate.set()

        original = modeling_llama.LlamaForCausalLM.forward
        throttle = self

        def forward(model: Any, *args: Any, **kwargs: Any) -> Any:
            throttle.calls += 1
            throttle.gate.wait(30)
            if throttle.delay:
                time.sleep(throttle.delay)
            return original(model, *args, **kwargs)

        monkeypatch.setattr(modeling_llama.LlamaForCausalLM, "forward", forward)
        return self


class raw_request:  # noqa: N801 - used as a context manager, like open()
    """A request sent on a raw socket, which is closed (the client hangs up) on exit."""

    def __init__(self, live: Live, route: str, body: dict[str, Any]):
        host, port = live.base_url.removeprefix("http://").split(":")
        payload = json.dumps(body).encode()
        self.sock = socket.create_connection((host, int(port)), timeout=30)
        head = (
            f"POST {route} HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {live.key}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n"
        )
        self.sock.sendall(head.encode() + payload)

    def __enter__(self) -> socket.socket:
        return self.sock

    def __exit__(self, *exc: object) -> None:
        self.sock.close()
