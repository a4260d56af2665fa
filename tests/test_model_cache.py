"""The model cache under load, over real HTTP: more LoRA adapters of one base than the cache
holds, used at once from several threads, never hang and always answer with the right adapter;
a deleted model stays served to the requests already on it, and its files go after them; loads
are bounded and a shared base is loaded once."""

from __future__ import annotations

import itertools
import random
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import make_settings
from tests.inference_support import (
    TEXTS,
    Live,
    Throttle,
    live_server,
    make_adapter,
    raw_request,
    register_copy,
)
from tests.support import wait_until
from tests.tiny_models import build_causal_lm

ADAPTERS = 4
CACHE_SIZE = 2
CLIENTS = 4
KINDS = ("generate", "predict")
PROMPT = "once upon a time"


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # A short context keeps each prediction (a greedy continuation to the context's end) cheap.
    return build_causal_lm(
        tmp_path_factory.mktemp("tiny") / "tiny-llama", TEXTS, hidden_size=32, max_positions=32
    )


@pytest.fixture
def live(tmp_path: Path, tiny_base: Path) -> Iterator[Live]:
    """A server whose cache holds fewer models than the tests use."""
    settings = make_settings(
        tmp_path / "data", base_models={"tiny-llama": str(tiny_base)},
        model_cache_size=CACHE_SIZE, inference_concurrency=8,
    )  # fmt: skip
    with live_server(settings) as served:
        yield served


@pytest.fixture(scope="module")
def adapter_dirs(tmp_path_factory: pytest.TempPathFactory, tiny_base: Path) -> list[Path]:
    tmp = tmp_path_factory.mktemp("adapters")
    return [make_adapter(tiny_base, tmp / f"a{i}", seed=i) for i in range(ADAPTERS)]


@pytest.fixture(scope="module")
def reference(
    tmp_path_factory: pytest.TempPathFactory, tiny_base: Path, adapter_dirs: list[Path]
) -> dict[str, str]:
    """Each model's greedy answers from a server whose cache holds them all (no eviction); the
    adapters are made with fixed seeds, so every server registers the same ones."""
    tmp = tmp_path_factory.mktemp("reference")
    settings = make_settings(
        tmp / "data", base_models={"tiny-llama": str(tiny_base)},
        model_cache_size=2 * ADAPTERS + 2,
    )  # fmt: skip
    with live_server(settings) as live:
        models = [*_adapters(live, adapter_dirs), "tiny-llama"]
        answers = {f"{m}|{kind}": _answer(live, m, kind) for m in models for kind in KINDS}
    assert len({answers[f"{m}|generate"] for m in models}) > 1, "adapters change the answers"
    return answers


def _adapters(live: Live, adapter_dirs: list[Path]) -> list[str]:
    return [register_copy(live, path, f"a{i}", seed=i) for i, path in enumerate(adapter_dirs)]


def _answer(live: Live, model: str, kind: str) -> str:
    if kind == "generate":
        return live.complete(model, PROMPT)
    return live.predict(model, PROMPT)


def test_more_lora_adapters_than_the_cache_holds_used_at_once(
    live: Live, adapter_dirs: list[Path], reference: dict[str, str]
) -> None:
    """Evicting a LoRA servable used to take the cache's lock a second time: the next load, and
    every inference request after it, hung for good."""
    calls = list(itertools.product([*_adapters(live, adapter_dirs), "tiny-llama"], KINDS))

    def client(seed: int) -> list[tuple[str, str]]:
        order = random.Random(seed).sample(calls, len(calls))
        return [(f"{model}|{kind}", _answer(live, model, kind)) for model, kind in order]

    with ThreadPoolExecutor(max_workers=CLIENTS) as pool:
        # Each call has a 30 s timeout: a deadlock fails the test instead of hanging it.
        results = [answer for batch in pool.map(client, range(CLIENTS)) for answer in batch]
    assert len(results) == CLIENTS * len(calls)
    for call, answer in results:
        assert answer == reference[call], call


def test_predictions_of_an_adapter_after_its_generate_servable_was_evicted(
    live: Live, adapter_dirs: list[Path], reference: dict[str, str]
) -> None:
    """/v1/predictions of a LoRA model wraps its generate servable; evicting that servable used
    to delete the adapter from the shared base under the cached predictor."""
    a, b, c = _adapters(live, adapter_dirs)[:3]
    assert live.predict(a, PROMPT) == reference[f"{a}|predict"]
    # Adapter b's generate servable pushes a's (the least recently used) out of the cache,
    # while a's predictor stays.
    assert live.complete(b, PROMPT) == reference[f"{b}|generate"]
    assert live.predict(a, PROMPT) == reference[f"{a}|predict"]
    assert live.complete(c, PROMPT) == reference[f"{c}|generate"]
    assert live.complete(a, PROMPT) == reference[f"{a}|generate"]
    assert live.predict(b, PROMPT) == reference[f"{b}|predict"]
    assert live.predict(a, PROMPT) == reference[f"{a}|predict"]


@pytest.mark.parametrize("kind", ["lora", "full"])
def test_a_deleted_model_serves_its_running_request_then_its_files_go(
    live: Live,
    adapter_dirs: list[Path],
    tiny_base: Path,
    reference: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
    kind: str,
) -> None:
    """DELETE /v1/models/... used to remove the files at once under a running request (and, for
    a LoRA adapter, to hang: forget() released it under the cache's lock)."""
    other = _adapters(live, adapter_dirs)[1]  # the base is shared with another adapter
    assert live.complete(other, PROMPT) == reference[f"{other}|generate"]
    source, expected = (
        (adapter_dirs[0], reference[f"{_adapters_ids(live)[0]}|generate"])
        if kind == "lora"
        else (tiny_base, reference["tiny-llama|generate"])
    )
    doomed = register_copy(live, source, "doomed", seed=7)
    directory = live.settings.storage_root / "models" / f"ftjob-doomed{7:010d}"
    assert live.complete(doomed, PROMPT) == expected  # loaded and cached

    throttle = Throttle().install(monkeypatch)
    throttle.gate.clear()  # the next generation stops inside its first forward pass
    with ThreadPoolExecutor(max_workers=1) as pool:
        running = pool.submit(live.complete, doomed, PROMPT)
        wait_until(lambda: throttle.calls > 0, 30, interval=0.02, what="the generation to start")
        with live.client() as http:
            deleted = http.delete(f"/v1/models/{doomed}")
            assert deleted.status_code == 200, deleted.text
            assert http.get(f"/v1/models/{doomed}").status_code == 404
            again = http.post("/v1/completions", json={"model": doomed, "prompt": PROMPT})
            assert again.status_code == 404 and again.json()["error"]["param"] == "model"
        assert directory.is_dir(), "the files stay while a request uses the model"
        throttle.gate.set()
        assert running.result(timeout=30) == expected
    wait_until(
        lambda: not directory.exists(), 30, interval=0.02, what="the deleted model's files to go"
    )
    assert live.complete(other, PROMPT) == reference[f"{other}|generate"]


def test_a_stream_whose_client_hangs_up_gives_its_model_back(
    live: Live, adapter_dirs: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A streamed completion holds its model until it ends, however it ends: the files of a
    model deleted under it go once its client has hung up."""
    doomed = register_copy(live, adapter_dirs[0], "doomed", seed=8)
    directory = live.settings.storage_root / "models" / f"ftjob-doomed{8:010d}"
    throttle = Throttle().install(monkeypatch)
    throttle.gate.clear()
    body = {"model": doomed, "prompt": PROMPT, "max_tokens": 8, "stream": True}
    with raw_request(live, "/v1/completions", body):
        wait_until(lambda: throttle.calls > 0, 30, interval=0.02, what="the generation to start")
        with live.client() as http:
            assert http.delete(f"/v1/models/{doomed}").status_code == 200
        assert directory.is_dir(), "the files stay while the stream runs"
    throttle.gate.set()  # the abandoned generation stops at its next token
    wait_until(
        lambda: not directory.exists(), 30, interval=0.02, what="the deleted model's files to go"
    )


def _adapters_ids(live: Live) -> list[str]:
    return [f"ft:tiny-llama:{live.org_name}:a{i}:{i:08d}" for i in range(ADAPTERS)]


class LoadCounter:
    """Wraps load_causal_lm: counts loads per directory and the most running at once; each
    load waits a moment first, so loads that may overlap do."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch):
        from app.inference import generation

        self.per_path: Counter[str] = Counter()
        self.running = self.most_at_once = 0
        self._lock = threading.Lock()
        original = generation.load_causal_lm

        def load(path: Path) -> object:
            with self._lock:
                self.per_path[str(path)] += 1
                self.running += 1
                self.most_at_once = max(self.most_at_once, self.running)
            try:
                time.sleep(0.5)
                return original(path)
            finally:
                with self._lock:
                    self.running -= 1

        monkeypatch.setattr(generation, "load_causal_lm", load)


def test_concurrent_loads_of_different_models_are_bounded_by_the_cache_size(
    tmp_path: Path, tiny_base: Path, reference: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every distinct model used to load at once, however many (memory)."""
    names = [f"tiny-{i}" for i in range(3 * CACHE_SIZE)]
    settings = make_settings(
        tmp_path / "data", base_models={name: str(tiny_base) for name in names},
        model_cache_size=CACHE_SIZE, inference_concurrency=len(names),
    )  # fmt: skip
    loads = LoadCounter(monkeypatch)
    with live_server(settings) as live, ThreadPoolExecutor(max_workers=len(names)) as pool:
        answers = list(pool.map(lambda name: live.complete(name, PROMPT), names))
    assert sum(loads.per_path.values()) == len(names)
    assert loads.most_at_once <= CACHE_SIZE
    assert answers == [reference["tiny-llama|generate"]] * len(names)


def test_adapters_of_one_base_requested_at_once_load_the_base_once(
    tmp_path: Path,
    tiny_base: Path,
    adapter_dirs: list[Path],
    reference: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Two adapters of one base requested at once both used to load the base."""
    settings = make_settings(
        tmp_path / "data", base_models={"tiny-llama": str(tiny_base)},
        model_cache_size=2 * ADAPTERS, inference_concurrency=ADAPTERS,
    )  # fmt: skip
    loads = LoadCounter(monkeypatch)
    with live_server(settings) as live, ThreadPoolExecutor(max_workers=ADAPTERS) as pool:
        adapters = _adapters(live, adapter_dirs)
        replies = list(pool.map(lambda model: _completion(live, model), adapters))
    assert loads.per_path == {str(tiny_base): 1}
    assert replies == [(200, reference[f"{model}|generate"]) for model in adapters]


def _completion(live: Live, model: str) -> tuple[int, str | None]:
    """The status and the text of a greedy completion (None when it failed)."""
    body = {"model": model, "prompt": PROMPT, "max_tokens": 8, "temperature": 0}
    with live.client() as http:
        response = http.post("/v1/completions", json=body)
    if response.status_code != 200:
        return response.status_code, None
    return 200, str(response.json()["choices"][0]["text"])


def test_a_byte_budget_counts_a_shared_base_once(
    tmp_path: Path, tiny_base: Path, adapter_dirs: list[Path], reference: dict[str, str]
) -> None:
    """A budget that holds the base and two and a half adapters keeps two adapters on it: the
    base is counted once, not once per adapter, and the least recently used adapter goes."""
    from app.inference.generation import load_causal_lm
    from app.inference.memory import adapter_bytes, module_bytes

    base, adapter = module_bytes(load_causal_lm(tiny_base)), adapter_bytes(adapter_dirs[0])
    budget = base + 5 * adapter // 2
    settings = make_settings(
        tmp_path / "data", base_models={"tiny-llama": str(tiny_base)}, model_cache_bytes=budget,
    )  # fmt: skip
    with live_server(settings) as live:
        cache = live.app.state.model_cache
        adapters = _adapters(live, adapter_dirs)[:3]
        for model in adapters:
            assert live.complete(model, PROMPT) == reference[f"{model}|generate"]
        assert [cache.loaded(model) for model in adapters] == [False, True, True]
        stats = cache.stats()
        assert (stats.bytes, stats.adapters, stats.bases) == (base + 2 * adapter, 2, 1)
        assert live.complete(adapters[0], PROMPT) == reference[f"{adapters[0]}|generate"]
        assert [cache.loaded(model) for model in adapters] == [True, False, True]


def test_adapters_of_one_base_share_a_tokenizer_when_its_files_are_the_same(
    tmp_path: Path, tiny_base: Path, adapter_dirs: list[Path]
) -> None:
    """Each adapter used to load its own copy of the tokenizer saved beside it (more memory
    than a small adapter's weights); adapters whose tokenizer files are the same share one."""
    import json
    import shutil

    from app.inference.registry import ModelCache
    from app.services.models import LoadableModel

    other = shutil.copytree(adapter_dirs[2], tmp_path / "other-template")
    config_file = other / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config["chat_template"] = "{% for m in messages %}{{ m['content'] }}\n{% endfor %}"
    config_file.write_text(json.dumps(config))
    paths = [adapter_dirs[0], adapter_dirs[1], other]
    models = [
        LoadableModel(f"ft:tiny-llama:acme:t{i}:0", "causal-lm", path, None, tiny_base)
        for i, path in enumerate(paths)
    ]
    cache = ModelCache(8)
    leases: list[Any] = [cache.lease(model, "generate") for model in models]  # a Generator each
    try:
        first, second, third = (lease.servable.tokenizer for lease in leases)
        assert first is second
        assert third is not first
        assert third.chat_template == config["chat_template"]
    finally:
        for lease in leases:
            lease.close()
