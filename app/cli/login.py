"""`tunehouse login`: check a base URL and key against the server and save them in the config
file, which the client commands read after their flags and the environment."""

from __future__ import annotations

import os
import sys

import tomli_w
import typer

from app.cli.client import Api, ApiKeyOption, BaseUrlOption, Connection, config_path, connection
from app.cli.output import console, stderr


def login(base_url: BaseUrlOption = None, api_key: ApiKeyOption = None) -> None:
    """Check a base URL and API key against the server and save them in the config file.

    The file is $TUNEHOUSE_CONFIG, by default ~/.config/tunehouse/config.toml; flags and the
    environment still come first.
    """
    conn = connection(base_url, api_key)
    if not conn.api_key and sys.stdin.isatty():
        conn = Connection(conn.base_url, typer.prompt("API key", hide_input=True))
    client = Api(conn)
    try:
        models = client.get("models")["data"]
    finally:
        client.close()
    path = config_path(os.environ)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Only its owner may read the key: the file is created private, then written.
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "wb") as handle:
        tomli_w.dump({"base_url": conn.base_url, "api_key": conn.api_key}, handle)
    os.chmod(path, 0o600)  # a file that was there before keeps no wider mode
    console.print(f"Signed in to {conn.base_url} ({len(models)} models); saved to {path}")
    stderr.print("Flags and TUNEHOUSE_*/OPENAI_* variables still take precedence.", style="dim")
