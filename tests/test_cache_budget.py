"""The model cache under its memory budget, driven directly with models of known size: a "blob"
kind whose servable is one torch module holding the tensor stored in its directory (safetensors,
checked and measured as any model is). Eviction by measured bytes with concurrent clients, a
cache full of models in use, a model bigger than the budget, pinned models, one load per model
however many wait, and memory given back to the operating system on eviction (RSS)."""

from __future__ import annotations

import multiprocessing
import os
import random
import threading
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import REGISTRY

from app.inference.protocols import Use
from app.inference.registry import ModelCache, factory
from app.inference.sampling import GenerationParams
from app.services.models import LoadableModel
from tests.support import wait_until

BLOB = "test-blob"
PREDICT: Use = "predict"  # typed as any use: the lease's servable is a Blob
GENERATE: Use = "generate"
FLOATS = 1000  # a small blob: 4,000 bytes of weights
SIZE = 4 * FLOATS
BUILDS: Counter[str] = Counter()
BUILD_DELAY = {"seconds": 0.0}


@factory("predict", BLOB)
class Blob:
    """A model of one float32 tensor; it records when the cache releases it."""

    def __init__(self, cache: ModelCache, model: LoadableModel):
        import torch
        from safetensors.torch import load_file

        BUILDS[model.id] += 1
        time.sleep(BUILD_DELAY["seconds"])
        self.module = torch.nn.Module()
        weight = load_file(model.path / "model.safetensors")["weight"].clone()
        self.module.register_buffer("weight", weight)
        self.model_id = model.id
        self.released = threading.Event()

    def predict(self, inputs: list[Any]) -> tuple[list[dict[str, Any]], int]:
        assert not self.released.is_set(), "a released model served a request"
        return [{"label": self.model_id}], 0

    def release(self) -> None:
        self.released.set()


def make_blob(root: Path, name: str, floats: int = FLOATS) -> LoadableModel:
    import torch
    from safetensors.torch import save_file

    path = root / name
    path.mkdir(parents=True)
    save_file({"weight": torch.rand(floats)}, str(path / "model.safetensors"))
    return LoadableModel(name, BLOB, path, None)


def evictions(reason: str) -> float:
    value = REGISTRY.get_sample_value("tunehouse_model_cache_evictions_total", {"reason": reason})
    return value or 0.0


@pytest.fixture(autouse=True)
def _reset() -> None:
    BUILDS.clear()
    BUILD_DELAY["seconds"] = 0.0


def test_eviction_by_bytes_with_concurrent_clients(tmp_path: Path) -> None:
    """Six models leased at random by six threads under a budget that holds two: every request
    gets its own model, never a released one, and the cache ends within its budget."""
    models = [make_blob(tmp_path, f"m{i}") for i in range(6)]
    cache = ModelCache(64, max_bytes=2 * SIZE + SIZE // 2)
    before = evictions("bytes")

    def client(seed: int) -> int:
        rng = random.Random(seed)
        for _ in range(15):
            model = rng.choice(models)
            with cache.lease(model, PREDICT) as blob:
                assert blob.predict(["x"])[0] == [{"label": model.id}]
                assert cache.stats().bytes >= SIZE
        return seed

    with ThreadPoolExecutor(max_workers=6) as pool:
        assert sorted(pool.map(client, range(6))) == list(range(6))
    stats = cache.stats()
    assert stats.bytes <= cache.max_bytes and stats.models == 2
    assert evictions("bytes") > before


def test_a_full_cache_of_models_in_use_evicts_none_of_them(tmp_path: Path) -> None:
    """Three models in use under a budget of two: all three stay loaded (over the budget) until
    their requests end; then the cache comes back under it."""
    models = [make_blob(tmp_path, f"m{i}") for i in range(3)]
    cache = ModelCache(64, max_bytes=2 * SIZE)
    leases = [cache.lease(model, PREDICT) for model in models]
    assert cache.stats().bytes == 3 * SIZE > cache.max_bytes
    assert not any(lease.servable.released.is_set() for lease in leases)
    for lease in leases:
        assert lease.servable.predict(["x"])[0] == [{"label": lease.servable.model_id}]
        lease.close()
    assert cache.stats().bytes == 2 * SIZE
    assert leases[0].servable.released.is_set(), "the least recently used one went"
    assert [cache.loaded(m.id) for m in models] == [False, True, True]


def test_a_model_bigger_than_the_budget_is_served_alone(tmp_path: Path) -> None:
    small, big = make_blob(tmp_path, "small"), make_blob(tmp_path, "big", floats=10 * FLOATS)
    cache = ModelCache(64, max_bytes=5 * SIZE)
    with cache.lease(small, PREDICT):
        pass
    with cache.lease(big, PREDICT) as blob:
        assert blob.predict(["x"])[0] == [{"label": "big"}]
    assert cache.loaded("big") and not cache.loaded("small")
    with cache.lease(big, PREDICT):  # kept while it is the one in use last
        pass
    assert BUILDS["big"] == 1
    with cache.lease(small, PREDICT):
        pass
    assert cache.loaded("small") and not cache.loaded("big")


def test_pinned_models_are_never_evicted(tmp_path: Path) -> None:
    models = [make_blob(tmp_path, f"m{i}") for i in range(5)]
    cache = ModelCache(2, max_bytes=2 * SIZE, pinned=["m0"])
    assert cache.warm(models[0], "predict")
    for model in models[1:]:
        with cache.lease(model, PREDICT):
            pass
        assert cache.loaded("m0"), model.id
    assert BUILDS["m0"] == 1
    assert cache.loaded("m4") and not cache.loaded("m3")


def test_warming_skips_when_the_cache_is_full_of_models_in_use(tmp_path: Path) -> None:
    a, b, c = (make_blob(tmp_path, name) for name in "abc")
    cache = ModelCache(64, max_bytes=2 * SIZE)
    with cache.lease(a, PREDICT), cache.lease(b, PREDICT):
        assert not cache.warm(c, "predict")
    assert not cache.loaded("c")
    assert cache.warm(c, "predict") and cache.loaded("c")
    assert not cache.warm(c, "predict"), "already loaded"


def test_one_load_per_model_however_many_requests_wait(tmp_path: Path) -> None:
    model = make_blob(tmp_path, "m")
    cache = ModelCache(64, max_bytes=10 * SIZE)
    BUILD_DELAY["seconds"] = 0.3  # the eight requests arrive while the first one loads
    start = threading.Barrier(8)

    def client(_: int) -> Blob:
        start.wait()
        with cache.lease(model, PREDICT) as blob:
            return blob

    with ThreadPoolExecutor(max_workers=8) as pool:
        servables = list(pool.map(client, range(8)))
    assert BUILDS["m"] == 1
    assert len({id(blob) for blob in servables}) == 1


def test_unload_takes_a_model_out_and_releases_it_after_its_request(tmp_path: Path) -> None:
    model = make_blob(tmp_path, "m")
    cache = ModelCache(64)
    before = evictions("unload")
    lease = cache.lease(model, PREDICT)
    assert cache.unload("m") and not cache.loaded("m")
    assert not lease.servable.released.is_set(), "its request still runs"
    lease.close()
    assert lease.servable.released.is_set()
    assert not cache.unload("m")
    assert evictions("unload") == before + 1


def rss() -> int:
    """This process's resident memory (Linux)."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE")


def load_and_evict_a_big_blob(
    big: LoadableModel, small: LoadableModel, size: int
) -> tuple[int, int, int, bool]:
    """In a fresh process: RSS before ``big`` (``size`` bytes) is loaded, with it loaded, and
    the lowest within 10 s of its eviction; and whether the cache released it."""
    cache = ModelCache(64, max_bytes=size // 2)
    with cache.lease(small, PREDICT):
        pass
    before = rss()
    with cache.lease(big, PREDICT) as blob:
        released = blob.released
        del blob
    loaded = rss()
    with cache.lease(small, PREDICT):  # the big one goes: its budget is too small for both
        pass
    lowest, deadline = rss(), time.monotonic() + 10
    while loaded - lowest <= 0.7 * size and time.monotonic() < deadline:
        time.sleep(0.05)
        lowest = min(lowest, rss())
    return before, loaded, lowest, released.is_set()


def test_eviction_gives_the_memory_back(tmp_path: Path) -> None:
    """A 48 MB model loaded, then evicted: the process's resident memory falls by most of it.
    Measured in a fresh process: one that has freed memory before (a test session) can serve
    the model from its heap's free chunks, and its RSS would not grow at all."""
    size = 48 * 2**20
    big = make_blob(tmp_path, "big", floats=size // 4)
    small = make_blob(tmp_path, "small")
    spawn = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=1, mp_context=spawn) as pool:
        run = pool.submit(load_and_evict_a_big_blob, big, small, size)
        before, loaded, lowest, released = run.result(timeout=300)
    assert loaded - before > 0.8 * size
    assert released
    # Collected and trimmed in the background, at once.
    assert loaded - lowest > 0.7 * size, (before, loaded, lowest)


def test_evicting_a_causal_lm_gives_its_memory_back(tmp_path: Path) -> None:
    """The same with a real causal LM of about 35 MB. transformers maps safetensors weights and
    reads them on first use: a generation makes them resident (one token reads every weight,
    the tied embedding as the output layer), and evicting the model for a small one unmaps
    them."""
    from tests.inference_support import TEXTS
    from tests.tiny_models import build_causal_lm

    big_dir = build_causal_lm(tmp_path / "big", TEXTS, hidden_size=384, layers=6, heads=6)
    small_dir = build_causal_lm(tmp_path / "small", TEXTS, hidden_size=16, layers=1, heads=2)
    big, small = (LoadableModel(p.name, "causal-lm", p, None) for p in (big_dir, small_dir))
    cache = ModelCache(64, max_bytes=2**20)
    with cache.lease(big, GENERATE) as generator:
        generator.complete(generator.encode("once upon a time"), GenerationParams(max_tokens=2))
        size = cache.stats().bytes
        del generator
    loaded = rss()
    assert size > 30 * 2**20
    with cache.lease(small, GENERATE):
        pass
    assert not cache.loaded("big")
    wait_until(lambda: loaded - rss() > 0.7 * size, 10, interval=0.05, what="RSS to fall")
