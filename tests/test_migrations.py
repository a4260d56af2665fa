"""The schema only changes through Alembic: the migrations build exactly what the ORM declares,
on SQLite and on PostgreSQL, and go down to nothing and back up again."""

from __future__ import annotations

from pathlib import Path

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import create_engine, inspect

from app.core.migrate import alembic_config, upgrade
from app.models import Base
from tests.support import fresh_postgres_database

TABLES = {"organizations", "api_keys", "files", "jobs", "job_events", "checkpoints", "models"}


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
    with fresh_postgres_database(postgres_url, "tunehouse_mig") as url:
        check_round_trip(url)
