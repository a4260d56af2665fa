"""The `tunehouse` command: the server's own commands (app/cli/server.py), and a client of its
HTTP API for people and scripts (files, jobs, models, predict, chat, login), which talks to any
Tunehouse server over HTTP and loads none of the server's modules."""

from __future__ import annotations

import sys

from app.cli.client import ClientError
from app.cli.files import files_cli
from app.cli.inference import chat, predict
from app.cli.jobs import jobs_cli
from app.cli.login import login
from app.cli.models import models_cli
from app.cli.server import cli

cli.add_typer(files_cli, name="files")
cli.add_typer(jobs_cli, name="jobs")
cli.add_typer(models_cli, name="models")
cli.command("predict")(predict)
cli.command("chat")(chat)
cli.command("login")(login)

__all__ = ["cli", "main"]


def main() -> None:
    try:
        cli()
    except ClientError as exc:  # the server's message, or the URL it could not reach
        from rich.text import Text

        from app.cli.output import stderr

        stderr.print(Text("Error:", style="bold red"), exc.message)
        sys.exit(1)
