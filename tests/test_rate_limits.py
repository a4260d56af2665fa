"""Per-key rate limits (TUNEHOUSE_RATE_LIMIT_PER_MINUTE): a 429 in OpenAI's envelope with
Retry-After, counted per key, in the process or shared through Redis. Plain httpx (through the
TestClient): the openai SDK would retry the 429s away."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from app.core.db import session_scope
from app.core.migrate import upgrade
from app.core.settings import Settings
from app.main import create_app
from app.services import keys
from tests.conftest import make_settings
from tests.support import Response
from tests.test_bad_input import assert_error

LIMIT = 3


def fresh(tmp_path: Path, **overrides: object) -> tuple[Settings, str, str]:
    """Settings with the limit at LIMIT (unless overridden) and two keys of one organization."""
    settings = make_settings(tmp_path / "data", **{"rate_limit_per_minute": LIMIT, **overrides})
    upgrade(settings.sqlalchemy_url)
    with session_scope(settings.sqlalchemy_url) as session:
        first, second = keys.create_key(session, "org-a").key, keys.create_key(session, "org-a").key
    return settings, first, second


def get_files(client: TestClient, key: str) -> Response:
    return client.get("/v1/files", headers={"Authorization": f"Bearer {key}"})


def assert_limited(response: Response) -> None:
    error = assert_error(response, 429, words="rate limit")
    assert error["code"] == "rate_limit_exceeded" and error["type"] == "rate_limit_error"
    retry_after = int(response.headers["Retry-After"])
    assert 1 <= retry_after <= 60


@pytest.fixture
def clients(tmp_path: Path) -> Iterator[tuple[TestClient, str, str]]:
    settings, first, second = fresh(tmp_path)
    with TestClient(create_app(settings)) as client:
        yield client, first, second


def test_over_the_limit_is_a_429_with_retry_after(clients) -> None:
    client, key, _ = clients
    for _ in range(LIMIT):
        assert get_files(client, key).status_code == 200
    assert_limited(get_files(client, key))
    # Every authenticated route is covered, not only the one that used up the limit.
    assert_limited(client.get("/v1/models", headers={"Authorization": f"Bearer {key}"}))


def test_each_key_has_its_own_count(clients) -> None:
    client, first, second = clients
    for _ in range(LIMIT):
        get_files(client, first)
    assert_limited(get_files(client, first))
    assert get_files(client, second).status_code == 200


def test_health_and_metrics_are_not_limited(clients) -> None:
    client, key, _ = clients
    for _ in range(LIMIT):
        get_files(client, key)
    for _ in range(LIMIT * 3):
        assert client.get("/healthz").status_code == 200
        assert client.get("/metrics").status_code == 200


def test_no_limit_by_default(tmp_path: Path) -> None:
    settings, key, _ = fresh(tmp_path)
    settings = make_settings(tmp_path / "data")  # the defaults, on the same database
    with TestClient(create_app(settings)) as client:
        assert all(get_files(client, key).status_code == 200 for _ in range(LIMIT * 4))


def test_redis_shares_the_count_between_api_processes(tmp_path: Path, redis_url: str) -> None:
    settings, key, other = fresh(tmp_path, broker_url=redis_url)
    with ExitStack() as stack:
        # Two apps stand for two API processes: only Redis holds their common count.
        one, two = (stack.enter_context(TestClient(create_app(settings))) for _ in range(2))
        assert get_files(one, key).status_code == 200
        assert get_files(two, key).status_code == 200
        assert get_files(one, key).status_code == 200
        assert_limited(get_files(two, key))
        assert_limited(get_files(one, key))
        assert get_files(two, other).status_code == 200


def test_an_unreachable_limit_store_does_not_refuse_requests(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Nothing listens on port 1: the store is down, and requests are served (and logged).
    settings, key, _ = fresh(tmp_path, broker_url="redis://127.0.0.1:1/0")
    with TestClient(create_app(settings)) as client:
        assert all(get_files(client, key).status_code == 200 for _ in range(LIMIT + 1))
    assert "rate limit store unavailable" in caplog.text
    assert key not in caplog.text
