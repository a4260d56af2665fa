"""Inference work is bounded: each request by the server's settings (a 400 naming the parameter
over a bound), and all of them by the inference concurrency limit (a 503 with Retry-After when
saturated, while the control routes answer as usual); a completion whose client has gone stops
generating."""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import make_settings
from tests.inference_support import TEXTS, Live, Throttle, live_server, raw_request
from tests.support import wait_until
from tests.tiny_models import build_causal_lm


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_causal_lm(tmp_path_factory.mktemp("tiny") / "tiny-llama", TEXTS, hidden_size=32)


@contextmanager
def _live(tmp_path: Path, tiny_base: Path, **settings: Any) -> Iterator[Live]:
    options = {"base_models": {"tiny-llama": str(tiny_base)}, **settings}
    with live_server(make_settings(tmp_path / "data", **options)) as live:
        yield live


@pytest.fixture
def live(tmp_path: Path, tiny_base: Path) -> Iterator[Live]:
    with _live(tmp_path, tiny_base, max_tokens_per_request=100, max_choices_per_request=8) as app:
        yield app


COMPLETION = {"model": "tiny-llama", "prompt": "once upon a time", "max_tokens": 2}
CHAT = {"model": "tiny-llama", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


@pytest.mark.parametrize(
    ("route", "body", "param"),
    [
        ("/v1/completions", {**COMPLETION, "n": 17}, "n"),
        ("/v1/completions", {**COMPLETION, "prompt": ["a"] * 65}, "prompt"),
        ("/v1/completions", {**COMPLETION, "prompt": ["a"] * 9}, "prompt"),
        ("/v1/completions", {**COMPLETION, "prompt": ["a", "b", "c"], "n": 3}, "n"),
        ("/v1/completions", {**COMPLETION, "max_tokens": 2049}, "max_tokens"),
        ("/v1/completions", {**COMPLETION, "n": 4, "max_tokens": 26}, "max_tokens"),
        ("/v1/chat/completions", {**CHAT, "n": 9}, "n"),
        ("/v1/chat/completions", {**CHAT, "n": 2, "max_tokens": 51}, "max_tokens"),
        (
            "/v1/chat/completions",
            {**CHAT, "n": 2, "max_completion_tokens": 51},
            "max_completion_tokens",
        ),
        ("/v1/predictions", {"model": "tiny-llama", "input": ["a"] * 9}, "input"),
        # Each prediction of a generative model may generate 128 tokens.
        ("/v1/predictions", {"model": "tiny-llama", "input": ["a"]}, "input"),
    ],
)
def test_a_request_over_a_bound_is_a_400_naming_the_parameter(
    live: Live, route: str, body: dict[str, Any], param: str
) -> None:
    with live.client() as http:
        response = http.post(route, json=body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error"


def test_within_the_bounds_a_completion_without_max_tokens_gets_a_default_that_fits(
    live: Live,
) -> None:
    with live.client() as http:
        response = http.post(
            "/v1/completions", json={**COMPLETION, "max_tokens": None, "n": 4, "temperature": 0}
        )
    assert response.status_code == 200, response.text
    reply = response.json()
    assert [choice["index"] for choice in reply["choices"]] == [0, 1, 2, 3]
    assert reply["usage"]["completion_tokens"] <= 100


def test_the_openapi_document_states_the_static_bounds(live: Live) -> None:
    with live.client() as http:
        schemas = http.get("/openapi.json").json()["components"]["schemas"]
    completion = schemas["CompletionRequest"]["properties"]
    assert completion["n"]["maximum"] == 16
    (listed,) = [s for s in completion["prompt"]["anyOf"] if s.get("type") == "array"]
    assert (listed["minItems"], listed["maxItems"]) == (1, 64)
    assert schemas["ChatCompletionRequest"]["properties"]["n"]["maximum"] == 16


def _hold_a_slot(live: Live, throttle: Throttle) -> Any:
    """A completion that holds the one inference slot (inside its first forward pass)."""
    throttle.gate.clear()
    pool = ThreadPoolExecutor(max_workers=1)
    running = pool.submit(_post, live, "/v1/completions", {**COMPLETION, "temperature": 0})
    wait_until(lambda: throttle.calls > 0, 30, interval=0.02, what="the generation to start")
    pool.shutdown(wait=False)
    return running


def _post(live: Live, route: str, body: dict[str, Any]) -> Any:
    with live.client() as http:
        return http.post(route, json=body)


@pytest.mark.parametrize(
    ("queue_size", "why"), [(0, "the queue is full"), (64, "no inference slot came free")]
)
def test_saturated_inference_answers_503_with_retry_after(
    tmp_path: Path,
    tiny_base: Path,
    monkeypatch: pytest.MonkeyPatch,
    queue_size: int,
    why: str,
) -> None:
    """A request waiting for a busy model used to wait as long as the model was busy."""
    with _live(
        tmp_path, tiny_base, inference_concurrency=1, inference_queue_size=queue_size,
        inference_queue_timeout_seconds=1,
    ) as live:  # fmt: skip
        throttle = Throttle().install(monkeypatch)
        running = _hold_a_slot(live, throttle)
        started = time.monotonic()
        for route, body in [("/v1/completions", COMPLETION), ("/v1/chat/completions", CHAT)]:
            waiting = _post(live, route, {**body, "stream": route.endswith("chat/completions")})
            assert waiting.status_code == 503, waiting.text
            assert waiting.headers["Retry-After"] == "1"
            error = waiting.json()["error"]
            assert error["code"] == "inference_busy" and why in error["message"]
        assert time.monotonic() - started < 20
        throttle.gate.set()
        assert running.result(timeout=30).status_code == 200
        assert _post(live, "/v1/completions", COMPLETION).status_code == 200  # the slot is back


def test_control_routes_stay_fast_while_inference_is_saturated(
    tmp_path: Path, tiny_base: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every waiting inference request used to hold one of the 40 threads that authentication
    needs too: 50 of them stalled every other route."""
    waiting = 50
    with _live(tmp_path, tiny_base, inference_concurrency=1) as live:
        throttle = Throttle().install(monkeypatch)
        running = _hold_a_slot(live, throttle)
        with ThreadPoolExecutor(max_workers=waiting) as pool:
            queued = [
                pool.submit(_post, live, "/v1/completions", COMPLETION) for _ in range(waiting)
            ]
            time.sleep(1)  # let them all reach the server and wait there
            with live.client(timeout=10) as http:
                for route in ("/v1/files", "/v1/fine_tuning/jobs", "/v1/models"):
                    assert http.get(route).status_code == 200, route
            assert not any(future.done() for future in queued), "inference is still saturated"
            throttle.gate.set()
            assert [f.result(timeout=60).status_code for f in queued] == [200] * waiting
        assert running.result(timeout=30).status_code == 200


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_a_completion_whose_client_hangs_up_stops_generating(
    tmp_path: Path, tiny_base: Path, monkeypatch: pytest.MonkeyPatch, stream: bool
) -> None:
    """A non-streamed completion whose client had gone used to generate to the end, holding
    its model and its slot."""
    with _live(tmp_path, tiny_base, inference_concurrency=1) as live:
        throttle = Throttle(delay=0.02).install(monkeypatch)
        body = {**COMPLETION, "max_tokens": 400, "temperature": 0, "stream": stream}
        with raw_request(live, "/v1/completions", body):
            wait_until(
                lambda: throttle.calls >= 3, 30, interval=0.02, what="the generation to start"
            )
        hung_up_at = throttle.calls
        # The one slot comes back once the abandoned generation has stopped.
        assert _post(live, "/v1/completions", COMPLETION).status_code == 200
        assert throttle.calls - hung_up_at < 50, "the abandoned generation ran on"
