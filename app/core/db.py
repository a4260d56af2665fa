"""Database engine and sessions. SQLite runs in WAL mode so the API and workers share it."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event, make_url
from sqlalchemy.orm import Session


def _configure_sqlite(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    # Writers from several processes queue up instead of failing at once.
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()


@dataclass(frozen=True)
class PoolLimits:
    """An engine's connection pool: ``size`` connections kept open, up to ``overflow`` more
    when all are in use, and ``timeout`` seconds that a session waits for one beyond that."""

    size: int = 5
    overflow: int = 10
    timeout: float = 30.0


def make_engine(url: str, pool: PoolLimits = PoolLimits()) -> Engine:
    if url.startswith("sqlite"):
        path = url.split("///", 1)[-1]
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(
            url, connect_args={"check_same_thread": False, "timeout": 30}, **_pool_args(url, pool)
        )
        event.listen(engine, "connect", _configure_sqlite)
        return engine
    # A database that does not answer fails a connection in seconds, not minutes: the callers
    # (a heartbeat, a progress write) retry or skip, and training goes on meanwhile.
    connect_args = {"connect_timeout": 5} if url.startswith("postgresql") else {}
    return create_engine(
        url, pool_pre_ping=True, connect_args=connect_args, **_pool_args(url, pool)
    )


def _pool_args(url: str, pool: PoolLimits) -> dict[str, Any]:
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite" and parsed.database in (None, "", ":memory:"):
        return {}  # an in-memory database lives in one connection, not a queue of them
    return {"pool_size": pool.size, "max_overflow": pool.overflow, "pool_timeout": pool.timeout}


# One engine per URL and process (a spawned child builds its own), sized by use_pool_limits.
_engines: dict[str, Engine] = {}
_pool_limits: dict[str, PoolLimits] = {}
_engines_lock = threading.Lock()


def get_engine(url: str) -> Engine:
    with _engines_lock:
        engine = _engines.get(url)
        if engine is None:
            engine = _engines[url] = make_engine(url, _pool_limits.get(url, PoolLimits()))
        return engine


def use_pool_limits(url: str, pool: PoolLimits) -> None:
    """Size this process's pool for ``url`` (the API does, from its settings). An engine built
    earlier with other limits is replaced: its idle connections close now, the ones in use
    when they are returned."""
    with _engines_lock:
        if _pool_limits.get(url, PoolLimits()) == pool:
            return
        _pool_limits[url] = pool
        previous = _engines.pop(url, None)
    if previous is not None:
        previous.dispose()


def engine_urls() -> set[str]:
    """The URLs this process holds an engine for."""
    with _engines_lock:
        return set(_engines)


def dispose_engine(url: str) -> None:
    """Close the idle connections of ``url``'s engine and forget it; the next session on the URL
    builds a new one. Connections in use close when they are returned. A process that opens many
    databases in turn (a test run, one per test) calls it so that their files do not stay open."""
    with _engines_lock:
        engine = _engines.pop(url, None)
    if engine is not None:
        engine.dispose()


@contextmanager
def session_scope(url: str) -> Iterator[Session]:
    """A session for one unit of work: committed on success, rolled back on error."""
    with unit_of_work(new_session(url)) as session:
        yield session


@contextmanager
def unit_of_work(session: Session) -> Iterator[Session]:
    """``session`` as one unit of work: committed on success, rolled back on error, then
    closed."""
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


def new_session(url: str) -> Session:
    """A session on the URL's engine; it takes a connection at its first query, not before."""
    return Session(get_engine(url), expire_on_commit=False)
