"""Alembic environment: the URL comes from the same Settings the API and worker read."""

from __future__ import annotations

from alembic import context

from app.core.db import make_engine
from app.core.settings import get_settings
from app.models import Base

config = context.config
target_metadata = Base.metadata


def database_url() -> str:
    # A URL set on the Config (by `tunehouse migrate` or a test) wins over the environment.
    return config.get_main_option("sqlalchemy.url") or get_settings().sqlalchemy_url


def run_migrations_offline() -> None:
    context.configure(url=database_url(), target_metadata=target_metadata, literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    engine = make_engine(database_url())
    with engine.connect() as connection:
        context.configure(
            connection=connection,
            target_metadata=target_metadata,
            render_as_batch=connection.dialect.name == "sqlite",
        )
        with context.begin_transaction():
            context.run_migrations()
    engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
