"""Fixtures for real services. PostgreSQL and Redis tests skip on a laptop without them, but
fail when CI is set: CI must never pass by silently skipping them. The same holds for the
public datasets in ../shared/data."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from app.core.db import dispose_engine, engine_urls, session_scope
from app.core.migrate import upgrade
from app.core.settings import Settings
from app.main import create_app
from app.services import keys
from tests.support import SHARED_DATA, fresh_postgres_database

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

PG_ADMIN_URL = os.environ.get("TUNEHOUSE_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS_URL = os.environ.get("TUNEHOUSE_TEST_REDIS", "redis://127.0.0.1:6379/9")


def _redis_url_of_this_process() -> str:
    """REDIS_URL's database, or under pytest-xdist one database per worker process (gw0 the
    given one, gw1 the next, ...): the brokers of tests running at once must not share queues,
    and each session empties its own database."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    if not worker.startswith("gw"):
        return REDIS_URL
    base, _, db = REDIS_URL.rpartition("/")
    return f"{base}/{int(db or 0) + int(worker[2:])}"


def _missing(what: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"{what} is required in CI but is not available", pytrace=False)
    pytest.skip(f"{what} is not available")


@pytest.fixture(autouse=True)
def _close_the_databases_a_test_opened() -> Iterator[None]:
    """Each test's SQLite database gets an engine in this process; closing the ones a test
    opened keeps the run's open files bounded (three per database: db, -wal, -shm)."""
    before = engine_urls()
    yield
    for url in engine_urls() - before:
        dispose_engine(url)


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A fresh PostgreSQL database for this test session, dropped afterwards."""
    import psycopg

    try:
        psycopg.connect(PG_ADMIN_URL, connect_timeout=3).close()
    except psycopg.OperationalError:
        _missing("PostgreSQL at 127.0.0.1:5432")
    with fresh_postgres_database(PG_ADMIN_URL) as url:
        yield url


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A new, migrated database for one test: SQLite, then a PostgreSQL database of its own."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'test.db'}"
        upgrade(url)
        yield url
    else:
        with fresh_postgres_database(request.getfixturevalue("postgres_url")) as url:
            upgrade(url)
            yield url


@pytest.fixture(scope="session")
def redis_url() -> str:
    import redis

    url = _redis_url_of_this_process()
    client = redis.Redis.from_url(url, socket_timeout=3)
    try:
        client.ping()
    except redis.RedisError:
        _missing("Redis at 127.0.0.1:6379")
    client.flushdb()
    return url


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not (SHARED_DATA / "README.md").is_file():
        _missing(f"the public datasets in {SHARED_DATA}")
    return SHARED_DATA


@dataclass
class Api:
    """An in-process app on a fresh SQLite data directory, with two organizations."""

    client: TestClient
    settings: Settings
    key_a: str
    key_b: str

    def headers(self, key: str | None = None) -> dict[str, str]:
        return {"Authorization": f"Bearer {key or self.key_a}"}


def make_settings(data_dir: Path, **overrides: Any) -> Settings:
    return Settings(_env_file=None, data_dir=data_dir, **overrides)


@contextmanager
def in_process_api(data_dir: Path) -> Iterator[Api]:
    """An in-process app on a fresh SQLite data directory, with two organizations' keys."""
    settings = make_settings(data_dir)
    upgrade(settings.sqlalchemy_url)
    with session_scope(settings.sqlalchemy_url) as session:
        key_a = keys.create_key(session, "org-a").key
        key_b = keys.create_key(session, "org-b").key
    with TestClient(create_app(settings)) as client:
        yield Api(client, settings, key_a, key_b)


@pytest.fixture
def api(tmp_path: Path) -> Iterator[Api]:
    with in_process_api(tmp_path / "data") as api:
        yield api
