"""Batched generation (app/inference/engine.py): concurrent generations on one model, and on the
LoRA adapters of one base, decode together, and each answer is what it would be alone.

The Throttle holds the model's forward passes so a test can line requests up in the engine
before they run; the engine's counters (prefills, largest batch, sequences submitted) and the
forward calls show what ran together."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client import REGISTRY

from app.inference.engine import DecodeEngine
from app.inference.generation import Generator, load_causal_lm, load_tokenizer
from app.inference.registry import ModelCache
from app.inference.sampling import Generation, GenerationParams
from app.services.models import LoadableModel
from tests.conftest import make_settings
from tests.inference_support import (
    TEXTS,
    Live,
    Throttle,
    live_server,
    make_adapter,
    register_copy,
)
from tests.support import wait_until
from tests.tiny_models import build_causal_lm

PROMPTS = ["once upon", "the quick brown fox jumps over the", "a", "hello world, a tiny model"]
GREEDY = GenerationParams(max_tokens=12, temperature=0)
ADAPTERS = (None, "a0", "a1")  # None: the base itself, "__base__" in a mixed batch


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_causal_lm(
        tmp_path_factory.mktemp("tiny") / "tiny-llama", TEXTS, hidden_size=32, max_positions=64
    )


@pytest.fixture(scope="module")
def adapter_dirs(tmp_path_factory: pytest.TempPathFactory, tiny_base: Path) -> list[Path]:
    tmp = tmp_path_factory.mktemp("adapters")
    return [make_adapter(tiny_base, tmp / f"a{i}", seed=i) for i in range(2)]


@dataclass
class Lm:
    """A base with two LoRA adapters, its engine, and a generator for each adapter and the
    base."""

    engine: DecodeEngine
    generators: dict[str | None, Generator]

    def complete(self, adapter: str | None, prompt: str, params: GenerationParams) -> Generation:
        generator = self.generators[adapter]
        return generator.complete(generator.encode(prompt), params)

    def stream(self, adapter: str | None, prompt: str, params: GenerationParams) -> Generation:
        """A streamed generation, its pieces put together."""
        generator = self.generators[adapter]
        result = Generation()
        for piece in generator.stream(generator.encode(prompt), params):
            result.text += piece.text
            if piece.finish_reason:
                result.finish_reason = piece.finish_reason
                result.completion_tokens = piece.completion_tokens
        return result


@pytest.fixture
def lm(tiny_base: Path, adapter_dirs: list[Path]) -> Iterator[Lm]:
    from peft import PeftModel

    model = PeftModel.from_pretrained(
        load_causal_lm(tiny_base), adapter_dirs[0], adapter_name="a0"
    ).eval()
    model.load_adapter(adapter_dirs[1], adapter_name="a1")
    engine = DecodeEngine(model, threading.Lock(), adapters=True)
    tokenizer = load_tokenizer(tiny_base)
    generators = {name: Generator(model, tokenizer, engine, adapter=name) for name in ADAPTERS}
    yield Lm(engine, generators)
    engine.close()
    assert not engine.running


def _at_once(calls: list[Callable[[], Any]]) -> list[Any]:
    """Run ``calls`` in threads at once; their results in order (a failure fails the test)."""
    results: list[Any] = [None] * len(calls)
    failures: list[BaseException] = []

    def run(index: int) -> None:
        try:
            results[index] = calls[index]()
        except BaseException as exc:
            failures.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not failures, failures
    return results


def _held(throttle: Throttle, engine: DecodeEngine, sequences: int) -> Callable[[], None]:
    """Once ``sequences`` more sequences have been submitted, let the model run again (call the
    result after starting them)."""
    start = engine.submitted
    throttle.gate.clear()

    def release() -> None:
        wait_until(lambda: engine.submitted >= start + sequences, 30, interval=0.01,
                   what="the sequences to be submitted")  # fmt: skip
        throttle.gate.set()

    return release


def test_concurrent_greedy_generations_equal_each_served_alone(
    lm: Lm, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Different prompt lengths, two adapters and the base, plain and streamed: one batch."""
    cases = [(adapter, prompt) for adapter in ADAPTERS for prompt in PROMPTS]
    alone = {case: lm.complete(*case, GREEDY) for case in cases}
    assert len({alone[(a, PROMPTS[1])].text for a in ADAPTERS}) == 3, "adapters differ"

    throttle = Throttle().install(monkeypatch)
    release = _held(throttle, lm.engine, 2 * len(cases))
    calls: list[Callable[[], Generation]] = []
    for adapter, prompt in cases:
        calls.append(partial(lm.complete, adapter, prompt, GREEDY))
        calls.append(partial(lm.stream, adapter, prompt, GREEDY))
    releasing = threading.Thread(target=release)
    releasing.start()
    together = _at_once(calls)
    releasing.join()

    for index, case in enumerate(cases):
        assert together[2 * index] == alone[case], case
        assert together[2 * index + 1] == alone[case], case
    assert lm.engine.largest_batch > len(cases), "they decoded together"


def test_a_request_joins_a_running_batch_between_steps(
    lm: Lm, monkeypatch: pytest.MonkeyPatch
) -> None:
    params = GenerationParams(max_tokens=20, temperature=0)
    first, second = ("a0", PROMPTS[1]), ("a1", PROMPTS[0])
    alone = [lm.complete(*first, params), lm.complete(*second, params)]
    assert [r.completion_tokens for r in alone] == [20, 20]

    throttle = Throttle().install(monkeypatch)
    throttle.gate.clear()  # the first request stops in its prefill
    result: list[Generation] = []
    running = threading.Thread(target=lambda: result.append(lm.complete(*first, params)))
    running.start()
    wait_until(lambda: throttle.calls > 0, 30, interval=0.01, what="the first to start")
    release = _held(throttle, lm.engine, 1)
    threading.Thread(target=release).start()
    joined = lm.complete(*second, params)
    running.join(30)

    assert [result[0], joined] == alone
    assert lm.engine.largest_batch == 2
    # Alone they take 20 forward passes each (a prefill and 19 decode steps); together the
    # second one's tokens come out of the first one's decode steps.
    assert throttle.calls <= 23, throttle.calls


def test_finished_and_cancelled_sequences_leave_and_the_others_go_on(
    lm: Lm, monkeypatch: pytest.MonkeyPatch
) -> None:
    long = GenerationParams(max_tokens=20, temperature=0)
    # 3 tokens: it is still in the batch when the last to join decodes, however the three
    # sequences happen to be split between the first two steps.
    short = GenerationParams(max_tokens=3, temperature=0)
    alone = lm.complete("a0", PROMPTS[0], long)

    throttle = Throttle().install(monkeypatch)
    release = _held(throttle, lm.engine, 3)
    threading.Thread(target=release).start()
    cancel = threading.Event()
    generator = lm.generators["a1"]
    calls: list[Callable[[], Any]] = [
        lambda: lm.complete("a0", PROMPTS[0], long),
        lambda: lm.complete(None, PROMPTS[1], short),
        lambda: generator.complete(generator.encode(PROMPTS[2]), long, cancel),
    ]

    def cancel_soon() -> None:
        wait_until(lambda: throttle.calls >= 6, 30, interval=0.005, what="a few steps")
        cancel.set()

    canceller = threading.Thread(target=cancel_soon)
    canceller.start()
    kept, finished, cancelled = _at_once(calls)
    canceller.join()

    assert kept == alone
    assert (finished.finish_reason, finished.completion_tokens) == ("length", 3)
    assert cancelled.completion_tokens < 20, "the cancelled sequence stopped early"
    assert lm.engine.largest_batch == 3


def test_a_stream_closed_early_leaves_the_batch_at_once(lm: Lm) -> None:
    generator = lm.generators["a0"]
    pieces = generator.stream(generator.encode(PROMPTS[0]), GenerationParams(max_tokens=40))
    next(pieces)
    pieces.close()  # returns once the sequence has left the engine
    wait_until(lambda: not lm.engine._rows, 5, interval=0.01, what="the batch to empty")
    assert lm.complete("a0", PROMPTS[0], GREEDY).completion_tokens == 12


def test_n_choices_share_one_prefill_and_seeded_samples_repeat(lm: Lm) -> None:
    generator = lm.generators["a1"]
    prompt, other = generator.encode(PROMPTS[1]), generator.encode(PROMPTS[3])
    alone = generator.complete(prompt, GREEDY)
    before = lm.engine.prefills
    results = generator.complete_all([(prompt, GREEDY)] * 3 + [(other, GREEDY)])
    assert lm.engine.prefills - before == 2
    assert results[:3] == [alone] * 3

    samples = [GenerationParams(max_tokens=10, temperature=1.0, seed=seed) for seed in (1, 2)]
    together = generator.complete_all([(prompt, sample) for sample in samples])
    assert together == [generator.complete(prompt, sample) for sample in samples]
    assert together[0] != together[1]


def test_an_adapter_attaches_between_steps_of_a_running_batch(
    tiny_base: Path, adapter_dirs: list[Path], lm: Lm, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An adapter change waits for the running step only, not for the generation; the base and
    its engine go when the last adapter does."""
    params = GenerationParams(max_tokens=30, temperature=0)
    expected = [lm.complete("a0", PROMPTS[1], params), lm.complete("a1", PROMPTS[1], params)]
    cache = ModelCache(4)
    shared = cache.attach_adapter(tiny_base, adapter_dirs[0], "a0")
    tokenizer = load_tokenizer(tiny_base)
    a0 = Generator(shared.model, tokenizer, shared.engine, adapter="a0")

    throttle = Throttle(delay=0.01).install(monkeypatch)
    throttle.gate.clear()
    result: list[Generation] = []
    running = threading.Thread(
        target=lambda: result.append(a0.complete(a0.encode(PROMPTS[1]), params))
    )
    running.start()
    wait_until(lambda: throttle.calls > 0, 30, interval=0.01, what="the generation to start")
    attached_at: list[int] = []

    def attach() -> None:
        cache.attach_adapter(tiny_base, adapter_dirs[1], "a1")
        attached_at.append(throttle.calls)

    attaching = threading.Thread(target=attach)
    attaching.start()
    wait_until(lambda: shared.engine.pausing, 30, interval=0.01, what="the attach to wait")
    throttle.gate.set()
    attaching.join(30)
    running.join(30)

    # The generation's 30 tokens take 29 forward passes after the prefill; the attach ran
    # after the first step (the prefill and one decode pass).
    assert attached_at[0] < 10, attached_at
    assert result == expected[:1]
    a1 = Generator(shared.model, tokenizer, shared.engine, adapter="a1")
    assert a1.complete(a1.encode(PROMPTS[1]), params) == expected[1]

    cache.detach_adapter(tiny_base, "a0")
    assert shared.engine.running
    cache.detach_adapter(tiny_base, "a1")
    assert not shared.engine.running


def _decode_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "tunehouse-decode" and t.is_alive()]


def test_the_engine_thread_stops_when_its_model_is_released(tiny_base: Path) -> None:
    before = len(_decode_threads())
    cache = ModelCache(1)
    models = [
        LoadableModel(id=name, task="causal-lm", path=tiny_base, labels=None)
        for name in ("first", "second")
    ]
    with cache.lease(models[0], "generate") as generator:
        assert generator.complete(generator.encode("once upon"), GREEDY).completion_tokens
    assert len(_decode_threads()) == before + 1
    with cache.lease(models[1], "generate") as generator:  # evicts the first one
        generator.complete(generator.encode("once upon"), GREEDY)
    assert len(_decode_threads()) == before + 1
    cache.forget("second")
    assert len(_decode_threads()) == before


# -- over HTTP -----------------------------------------------------------------------------------


@pytest.fixture
def live(tmp_path: Path, tiny_base: Path) -> Iterator[Live]:
    settings = make_settings(
        tmp_path / "data", base_models={"tiny-llama": str(tiny_base)}, inference_concurrency=16
    )
    with live_server(settings) as served:
        yield served


def _ask(live: Live, model: str, kind: str) -> list[str]:
    """One request's choices' texts (a chat, a completion with n=2; streamed or not)."""
    stream = kind.endswith("stream")
    body: dict[str, Any]
    if kind.startswith("chat"):
        route, body = "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}
    else:
        route, body = "/v1/completions", {"prompt": ["once upon", "the quick brown"], "n": 2}
    body = {**body, "model": model, "max_tokens": 10, "temperature": 0, "stream": stream}
    with live.client() as http:
        if not stream:
            response = http.post(route, json=body)
            assert response.status_code == 200, response.text
            choices = response.json()["choices"]
            return [c["message"]["content"] if "message" in c else c["text"] for c in choices]
        return _streamed(http, route, body)


def _streamed(http: httpx.Client, route: str, body: dict[str, Any]) -> list[str]:
    import json

    texts: dict[int, str] = {}
    opened: set[int] = set()
    with http.stream("POST", route, json=body) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            for choice in json.loads(line[6:])["choices"]:
                index = choice["index"]
                if "delta" in choice:
                    if choice["delta"].get("role"):
                        opened.add(index)
                        continue
                    assert index in opened, "a choice's opening chunk comes first"
                    text = choice["delta"].get("content", "")
                else:
                    text = choice["text"]
                texts[index] = texts.get(index, "") + text
    return [texts[index] for index in sorted(texts)]


def _sample(name: str, labels: dict[str, str] | None = None) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_concurrent_requests_over_http_equal_each_served_alone(
    live: Live, adapter_dirs: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    adapters = [register_copy(live, path, f"a{i}", seed=i) for i, path in enumerate(adapter_dirs)]
    cases = [
        (model, kind)
        for model in ["tiny-llama", *adapters]
        for kind in ("chat", "chat-stream", "text", "text-stream")
    ]
    alone = [_ask(live, *case) for case in cases]
    assert len({tuple(alone[i]) for i in (0, 4, 8)}) == 3, "the models answer differently"

    throttle = Throttle().install(monkeypatch)
    throttle.gate.clear()
    sequences = sum(len(answer) for answer in alone)
    active = _sample("tunehouse_generation_active_sequences")
    single_steps = _sample("tunehouse_generation_batch_size_bucket", {"le": "1.0"})
    steps = _sample("tunehouse_generation_batch_size_count")

    def release() -> None:
        wait_until(
            lambda: _sample("tunehouse_generation_active_sequences") >= active + sequences,
            30, interval=0.01, what="every request to reach its engine",
        )  # fmt: skip
        throttle.gate.set()

    releasing = threading.Thread(target=release)
    releasing.start()
    together = _at_once([partial(_ask, live, *case) for case in cases])
    releasing.join()

    assert together == alone
    batched = (_sample("tunehouse_generation_batch_size_count") - steps) - (
        _sample("tunehouse_generation_batch_size_bucket", {"le": "1.0"}) - single_steps
    )
    assert batched > 0, "some decode steps ran several sequences"
    metrics = httpx.get(f"{live.base_url}/metrics").text
    for name in (
        "tunehouse_generation_batch_size_bucket",
        "tunehouse_generation_tokens_total",
        "tunehouse_generation_step_seconds_bucket",
        "tunehouse_generation_time_to_first_token_seconds_bucket",
        "tunehouse_generation_active_sequences",
    ):
        assert name in metrics
