"""Database engine and sessions. SQLite runs in WAL mode so the API and workers share it."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.orm import Session, sessionmaker


def _configure_sqlite(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    # Writers from several processes queue up instead of failing at once.
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()


def make_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        path = url.split("///", 1)[-1]
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})
        event.listen(engine, "connect", _configure_sqlite)
        return engine
    # A database that does not answer fails a connection in seconds, not minutes: the callers
    # (a heartbeat, a progress write) retry or skip, and training goes on meanwhile.
    connect_args = {"connect_timeout": 5} if url.startswith("postgresql") else {}
    return create_engine(
        url, pool_pre_ping=True, pool_size=5, max_overflow=10, connect_args=connect_args
    )


@lru_cache(maxsize=8)
def get_engine(url: str) -> Engine:
    """One engine per URL and process (a spawned child builds its own)."""
    return make_engine(url)


@lru_cache(maxsize=8)
def _session_factory(url: str) -> sessionmaker[Session]:
    return sessionmaker(bind=get_engine(url), expire_on_commit=False)


@contextmanager
def session_scope(url: str) -> Iterator[Session]:
    """A session for one unit of work: committed on success, rolled back on error."""
    session = _session_factory(url)()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


def new_session(url: str) -> Session:
    return _session_factory(url)()
