"""The server's commands: run everything, or each part on its own (migrate, api, worker, keys).

Settings and the server's modules load inside each command, so that the client commands
(app/cli/client.py and the modules beside it) start without them."""

from __future__ import annotations

import functools
import os
import signal
import socket
import subprocess
import sys
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console

from app.core.roles import Role

if TYPE_CHECKING:
    from app.core.settings import Settings

cli = typer.Typer(help="Tunehouse: self-hosted fine-tuning and inference.", no_args_is_help=True)
keys_cli = typer.Typer(help="Manage API keys.", no_args_is_help=True)
cli.add_typer(keys_cli, name="keys")
console = Console()

Host = Annotated[str | None, typer.Option(help="Interface to listen on")]
Port = Annotated[int | None, typer.Option(help="Port to listen on")]


def _settings() -> Settings:
    from app.core.settings import get_settings

    get_settings.cache_clear()
    return get_settings()


def _migrate(settings: Settings) -> None:
    from app.core.migrate import upgrade

    settings.resolved_data_dir.mkdir(parents=True, exist_ok=True)
    upgrade(settings.sqlalchemy_url)


def _serve(settings: Settings, host: str | None, port: int | None, role: Role) -> None:
    import uvicorn

    from app.core.logs import configure_logging
    from app.main import create_app

    # uvicorn's loggers write through the root logger, in log_format like every other line.
    configure_logging(settings.log_level, settings.log_format)
    # The role goes to the factory itself: settings read later (and cached) never see it.
    uvicorn.run(
        functools.partial(create_app, settings, role),
        factory=True,
        host=host or settings.host,
        port=port or settings.port,
        log_level=settings.log_level.lower(),
        log_config=None,
        timeout_keep_alive=settings.keep_alive_seconds,
    )


def _worker_command(
    settings: Settings, concurrency: int, beat: bool, name: str | None = None
) -> list[str]:
    command = [
        sys.executable, "-m", "celery", "-A", "worker.celery_app:celery_app", "worker",
        "--pool", "threads", "--concurrency", str(concurrency),
        "--loglevel", settings.log_level, "-Q", settings.serving_queue,
    ]  # fmt: skip
    if name:
        command += ["--hostname", name]
    if beat:
        # Beat sends the reconciler's periodic wake-up; its schedule file lives with the data,
        # one per machine, since workers on several machines may share the data directory.
        schedule = settings.resolved_data_dir / f"celerybeat-schedule-{socket.gethostname()}"
        command += ["--beat", "--schedule", str(schedule)]
    return command


@cli.command()
def migrate() -> None:
    """Apply database migrations (safe to run again)."""
    settings = _settings()
    _migrate(settings)
    console.print(f"[green]Database is up to date[/] ({settings.sqlalchemy_url.split('@')[-1]})")


def api(
    host: Host = None,
    port: Port = None,
    role: Annotated[Role, typer.Option(help="control, inference or all")] = "all",
) -> None:
    """Serve the HTTP API (control and inference routes by default)."""
    _serve(_settings(), host, port, role)


cli.command("api")(api)
# `serve` is the same command under the name the replica docs use.
cli.command(
    "serve", help="Serve the HTTP API with one role: `--role inference` serves predictions alone."
)(api)


@cli.command()
def worker(
    concurrency: Annotated[int, typer.Option(help="Jobs trained at once")] = 1,
    beat: Annotated[bool, typer.Option(help="Also send the reconciler's periodic wake-up")] = True,
    queue: Annotated[
        str | None,
        typer.Option(help="Device queue to take jobs from: cpu, gpu... (default: default queue)"),
    ] = None,
    devices: Annotated[
        str | None,
        typer.Option(help='Accelerators its training may use, e.g. "0,1" (CUDA_VISIBLE_DEVICES)'),
    ] = None,
    max_processes: Annotated[
        int | None, typer.Option(help="Most processes one job may run (default: one per device)")
    ] = None,
    name: Annotated[
        str | None,
        typer.Option(
            "--name",
            "-n",
            help="Celery node name (default celery@HOST); each worker on one host needs its own, "
            "e.g. gpu0@%h",
        ),
    ] = None,
) -> None:
    """Run a Celery worker that trains jobs from one device queue."""
    from pydantic import ValidationError

    # The options are settings: the worker's process reads them from its environment.
    for variable, value in (
        ("TUNEHOUSE_WORKER_QUEUE", queue),
        ("TUNEHOUSE_WORKER_DEVICES", devices),
        ("TUNEHOUSE_WORKER_MAX_PROCESSES", max_processes),
    ):
        if value is not None:
            os.environ[variable] = str(value)
    try:
        settings = _settings()
    except ValidationError as exc:
        raise typer.BadParameter(str(exc)) from None
    console.print(
        f"Worker for queue [bold]{settings.serving_queue}[/]"
        + (f", devices {','.join(settings.worker_devices)}" if settings.worker_devices else "")
        + f", at most {settings.worker_process_limit} processes per job"
    )
    sys.stdout.flush()
    os.execv(sys.executable, _worker_command(settings, concurrency, beat, name))


@cli.command()
def run(host: Host = None, port: Port = None) -> None:
    """Everything in one command: migrations, the API, a worker and the reconciler."""
    from app.core.process import die_with_parent

    settings = _settings()
    _migrate(settings)
    _first_key(settings)
    # The worker stops (warm shutdown) whenever this command goes, however it goes.
    worker_process = subprocess.Popen(
        _worker_command(settings, 1, beat=True),
        preexec_fn=lambda: die_with_parent(signal.SIGTERM),
    )
    try:
        _serve(settings, host, port, "all")
    finally:
        # Warm shutdown: a running job checkpoints and goes back to the queue first.
        worker_process.send_signal(signal.SIGTERM)
        try:
            worker_process.wait(timeout=settings.shutdown_grace_seconds + 15)
        except subprocess.TimeoutExpired:
            worker_process.kill()


def _first_key(settings: Settings) -> None:
    from app.core.db import session_scope
    from app.services import keys

    with session_scope(settings.sqlalchemy_url) as session:
        if keys.any_keys(session):
            return
        new = keys.create_key(session, "default", name="first key")
    console.print(
        "\n[bold]Your API key[/] (shown once; `tunehouse keys create` makes more):\n"
        f"  [green]{new.key}[/]\n"
    )


@keys_cli.command("create")
def keys_create(
    organization: Annotated[str, typer.Option(help="Organization the key belongs to")] = "default",
    name: Annotated[str | None, typer.Option(help="A label for the key")] = None,
    admin: Annotated[
        bool, typer.Option(help="May also manage the organization's keys over HTTP")
    ] = False,
) -> None:
    """Create an API key and print it (it is not shown again)."""
    from app.core.db import session_scope
    from app.services import keys

    settings = _settings()
    _migrate(settings)
    with session_scope(settings.sqlalchemy_url) as session:
        new = keys.create_key(session, organization, name=name, admin=admin)
    # The key alone on stdout, so `KEY=$(tunehouse keys create)` works.
    print(new.key)
    kind = "admin key" if admin else "key"
    Console(stderr=True).print(
        f"[dim]{kind} {new.record.id} for organization '{new.organization.name}'[/]"
    )


@keys_cli.command("list")
def keys_list(
    organization: Annotated[str | None, typer.Option(help="Only this organization")] = None,
) -> None:
    """List API keys (prefixes only)."""
    from rich.table import Column, Table
    from sqlalchemy import select

    from app.core.db import session_scope
    from app.models import ApiKey, Organization

    settings = _settings()
    table = Table("organization", "name", "admin", "created", "revoked")
    # Ids and prefixes are copied into other commands: never wrap or truncate them.
    table.columns.insert(0, Column("id", no_wrap=True, min_width=28))
    table.columns.insert(2, Column("prefix", no_wrap=True, min_width=13))
    with session_scope(settings.sqlalchemy_url) as session:
        stmt = select(ApiKey, Organization).join(Organization).order_by(ApiKey.created_at)
        if organization:
            stmt = stmt.where(Organization.name == organization)
        for key, org in session.execute(stmt):
            table.add_row(
                key.id, org.name, key.prefix + "…", key.name or "", "yes" if key.admin else "",
                key.created_at.isoformat(timespec="seconds"),
                key.revoked_at.isoformat(timespec="seconds") if key.revoked_at else "",
            )  # fmt: skip
    # Piped output keeps whole rows: a terminal's width only limits a terminal.
    (console if console.is_terminal else Console(width=200)).print(table)


@keys_cli.command("revoke")
def keys_revoke(
    key_id: str,
    organization: Annotated[
        str | None, typer.Option(help="Only revoke it if it belongs to this organization")
    ] = None,
) -> None:
    """Revoke an API key by its id (refused from the next request on)."""
    from app.core.db import session_scope
    from app.services import keys

    with session_scope(_settings().sqlalchemy_url) as session:
        revoked = keys.revoke_key(session, key_id, organization)
    if not revoked:
        where = f" in organization '{organization}'" if organization else ""
        console.print(f"[red]No active key {key_id}{where}[/]")
        raise typer.Exit(1)
    console.print(f"Revoked {key_id}")
