"""The schema only changes through Alembic: the migrations build exactly what the ORM declares,
on SQLite and on PostgreSQL, and go down to nothing and back up again."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import create_engine, inspect

from app.core.migrate import alembic_config, upgrade
from app.models import Base

TABLES = {"organizations", "api_keys", "files", "jobs", "job_events", "checkpoints", "models"}


@contextmanager
def fresh_pg_database(postgres_url: str) -> Iterator[str]:
    """A database of its own on the test server, so going down to base touches no other test."""
    import psycopg

    admin_url = postgres_url.replace("postgresql+psycopg://", "postgresql://", 1)
    name = f"tunehouse_mig_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(admin_url, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"{postgres_url.rsplit('/', 1)[0]}/{name}"
    finally:
        with psycopg.connect(admin_url, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def schema_differences(url: str) -> list[object]:
    engine = create_engine(url)
    try:
        with engine.connect() as connection:
            context = MigrationContext.configure(connection, opts={"compare_type": True})
            return list(compare_metadata(context, Base.metadata))
    finally:
        engine.dispose()


def tables(url: str) -> set[str]:
    engine = create_engine(url)
    try:
        return set(inspect(engine).get_table_names()) - {"alembic_version"}
    finally:
        engine.dispose()


def check_round_trip(url: str) -> None:
    upgrade(url)
    assert tables(url) == TABLES
    assert schema_differences(url) == []
    config = alembic_config(url)
    command.downgrade(config, "base")
    assert tables(url) == set()
    command.upgrade(config, "head")
    assert tables(url) == TABLES
    assert schema_differences(url) == []
    upgrade(url)  # already at head: a no-op
    assert schema_differences(url) == []


def test_sqlite_migrations_match_models(tmp_path: Path) -> None:
    check_round_trip(f"sqlite:///{tmp_path / 'schema.db'}")


@pytest.mark.postgres
def test_postgres_migrations_match_models(postgres_url: str) -> None:
    with fresh_pg_database(postgres_url) as url:
        check_round_trip(url)
