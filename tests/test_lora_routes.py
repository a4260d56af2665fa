"""LoRA adapters on demand: vLLM's /v1/load_lora_adapter and /v1/unload_lora_adapter, scoped to
the caller's organization, and the LRU of adapters on each base."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client import REGISTRY

from app.core.db import session_scope
from app.inference.registry import ModelCache
from app.models import FineTunedModel
from app.services import keys
from tests.conftest import make_settings
from tests.inference_support import TEXTS, Live, live_server, make_adapter, register_copy
from tests.tiny_models import build_causal_lm

PROMPT = "once upon a time"


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_causal_lm(
        tmp_path_factory.mktemp("tiny") / "tiny-llama", TEXTS, hidden_size=32, max_positions=32
    )


@pytest.fixture(scope="module")
def adapter_dirs(tmp_path_factory: pytest.TempPathFactory, tiny_base: Path) -> list[Path]:
    tmp = tmp_path_factory.mktemp("adapters")
    return [make_adapter(tiny_base, tmp / f"a{i}", seed=i) for i in range(3)]


@pytest.fixture
def live(tmp_path: Path, tiny_base: Path) -> Iterator[Live]:
    settings = make_settings(
        tmp_path / "data", base_models={"tiny-llama": str(tiny_base)},
        max_lora_adapters_per_base=2,
    )  # fmt: skip
    with live_server(settings) as served:
        yield served


def cache_of(live: Live) -> ModelCache:
    cache: ModelCache = live.app.state.model_cache
    return cache


def loads() -> float:
    return REGISTRY.get_sample_value("tunehouse_model_cache_load_seconds_count") or 0.0


def post(live: Live, route: str, body: dict[str, Any], key: str | None = None) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key or live.key}"}
    with httpx.Client(base_url=live.base_url, headers=headers, timeout=30) as http:
        return http.post(route, json=body)


def test_load_then_unload_an_adapter(live: Live, adapter_dirs: list[Path]) -> None:
    adapter = register_copy(live, adapter_dirs[0], "a0", seed=0)
    loaded = post(live, "/v1/load_lora_adapter", {"lora_name": adapter, "lora_path": adapter})
    assert loaded.status_code == 200, loaded.text
    assert loaded.json() == {
        "object": "lora_adapter", "lora_name": adapter, "base_model": "tiny-llama",
        "status": "loaded",
    }  # fmt: skip
    assert cache_of(live).loaded(adapter)
    before = loads()
    text = live.complete(adapter, PROMPT)
    assert loads() == before, "the completion found its adapter loaded"

    unloaded = post(live, "/v1/unload_lora_adapter", {"lora_name": adapter, "lora_int_id": 7})
    assert unloaded.status_code == 200, unloaded.text
    assert unloaded.json()["status"] == "unloaded"
    assert not cache_of(live).loaded(adapter)
    assert cache_of(live).stats().bases == 0, "its base went with its last adapter"

    again = post(live, "/v1/unload_lora_adapter", {"lora_name": adapter})
    assert again.status_code == 404
    assert again.json()["error"]["code"] == "lora_adapter_not_loaded"
    assert live.complete(adapter, PROMPT) == text, "it loads again on demand"


def test_another_organizations_adapter_is_not_found(live: Live, adapter_dirs: list[Path]) -> None:
    adapter = register_copy(live, adapter_dirs[0], "a0", seed=0)
    with session_scope(live.settings.sqlalchemy_url) as session:
        other = keys.create_key(session, "other").key
    for route in ("/v1/load_lora_adapter", "/v1/unload_lora_adapter"):
        response = post(live, route, {"lora_name": adapter}, key=other)
        assert response.status_code == 404, response.text
        assert response.json()["error"]["code"] == "model_not_found"
    assert not cache_of(live).loaded(adapter)


def test_what_is_not_an_adapter_is_refused(live: Live, tiny_base: Path) -> None:
    job_id = "ftjob-classifier"
    shutil.copytree(tiny_base, live.settings.storage_root / "models" / job_id)
    classifier = f"ft:tiny-llama:{live.org_name}:cls:00000001"
    with session_scope(live.settings.sqlalchemy_url) as session:
        session.add(
            FineTunedModel(
                id=classifier, organization_id=live.org_id, task="classification",
                base_model="tiny-llama", job_id=job_id, storage_path=f"models/{job_id}",
                labels=["a", "b"],
            )
        )  # fmt: skip
    cases = [
        ({"lora_name": classifier}, "wrong_model_kind"),
        ({"lora_name": "tiny-llama"}, "not_a_lora_adapter"),  # a base model: not an adapter
    ]
    for body, code in cases:
        for route in ("/v1/load_lora_adapter", "/v1/unload_lora_adapter"):
            response = post(live, route, body)
            assert response.status_code == 400, response.text
            assert response.json()["error"]["code"] == code
    assert len(cache_of(live)) == 0


def test_a_path_is_never_read_from_a_request(live: Live, adapter_dirs: list[Path]) -> None:
    adapter = register_copy(live, adapter_dirs[0], "a0", seed=0)
    body = {"lora_name": adapter, "lora_path": str(adapter_dirs[1])}
    response = post(live, "/v1/load_lora_adapter", body)
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "lora_path"
    assert post(live, "/v1/load_lora_adapter", {}).status_code == 400
    assert not cache_of(live).loaded(adapter)


def test_the_oldest_idle_adapter_of_a_base_goes_past_the_limit(
    live: Live, adapter_dirs: list[Path]
) -> None:
    """Two adapters a base: loading a third drops the least recently used."""
    before = REGISTRY.get_sample_value(
        "tunehouse_model_cache_evictions_total", {"reason": "adapter-lru"}
    )
    a0, a1, a2 = (register_copy(live, d, f"a{i}", seed=i) for i, d in enumerate(adapter_dirs))
    for adapter in (a0, a1):
        assert post(live, "/v1/load_lora_adapter", {"lora_name": adapter}).status_code == 200
    live.complete(a0, PROMPT)  # a0 is now the most recently used
    assert post(live, "/v1/load_lora_adapter", {"lora_name": a2}).status_code == 200
    cache = cache_of(live)
    assert [cache.loaded(a) for a in (a0, a1, a2)] == [True, False, True]
    stats = cache.stats()
    assert (stats.adapters, stats.bases) == (2, 1)
    shared = next(iter(cache._bases.values()))
    assert set(shared.adapters) == {a0, a2}, "a1 left the shared base"
    after = REGISTRY.get_sample_value(
        "tunehouse_model_cache_evictions_total", {"reason": "adapter-lru"}
    )
    assert (after or 0) - (before or 0) == 1
    with httpx.Client(base_url=live.base_url) as http:
        metrics = http.get("/metrics").text
    assert "tunehouse_model_cache_adapters 2.0" in metrics


def test_the_routes_state_their_constraints(live: Live) -> None:
    with httpx.Client(base_url=live.base_url) as http:
        schemas = http.get("/openapi.json").json()["components"]["schemas"]
    name = schemas["LoadLoraAdapterRequest"]["properties"]["lora_name"]
    assert (name["minLength"], name["maxLength"]) == (1, 320)
    assert "lora_path" in schemas["LoadLoraAdapterRequest"]["properties"]
    assert "lora_int_id" in schemas["UnloadLoraAdapterRequest"]["properties"]
