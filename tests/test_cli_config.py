"""Where the client commands find the server and the key, and how they fail without one:
no server needed."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from app.cli.client import DEFAULT_BASE_URL, Connection, config_path, resolve
from tests.support import ROOT, free_port

FILE = {"base_url": "http://file:1/v1", "api_key": "sk-file"}


@pytest.mark.parametrize(
    ("flags", "environ", "config", "expected"),
    [
        # Each source wins over the ones after it: flag > TUNEHOUSE_ > OPENAI_ > file > default.
        (
            ("http://flag:1/v1", "sk-flag"),
            {"TUNEHOUSE_BASE_URL": "http://th:1/v1", "TUNEHOUSE_API_KEY": "sk-th",
             "OPENAI_BASE_URL": "http://oa:1/v1", "OPENAI_API_KEY": "sk-oa"},
            FILE,
            Connection("http://flag:1/v1", "sk-flag"),
        ),
        (
            (None, None),
            {"TUNEHOUSE_BASE_URL": "http://th:1/v1", "TUNEHOUSE_API_KEY": "sk-th",
             "OPENAI_BASE_URL": "http://oa:1/v1", "OPENAI_API_KEY": "sk-oa"},
            FILE,
            Connection("http://th:1/v1", "sk-th"),
        ),
        (
            (None, None),
            {"OPENAI_BASE_URL": "http://oa:1/v1", "OPENAI_API_KEY": "sk-oa"},
            FILE,
            Connection("http://oa:1/v1", "sk-oa"),
        ),
        ((None, None), {}, FILE, Connection("http://file:1/v1", "sk-file")),
        ((None, None), {}, {}, Connection(DEFAULT_BASE_URL, None)),
        # The URL and the key are found apart, each from the first source that has it.
        (
            (None, "sk-flag"),
            {"OPENAI_BASE_URL": "http://oa:1/v1/", "TUNEHOUSE_API_KEY": "sk-th"},
            FILE,
            Connection("http://oa:1/v1", "sk-flag"),
        ),
        # An empty variable is no value.
        (
            (None, None),
            {"TUNEHOUSE_API_KEY": "", "OPENAI_API_KEY": "sk-oa"},
            {},
            Connection(DEFAULT_BASE_URL, "sk-oa"),
        ),
    ],
)  # fmt: skip
def test_flag_then_environment_then_fallback_then_config_file(
    flags: tuple[str | None, str | None],
    environ: dict[str, str],
    config: dict[str, str],
    expected: Connection,
) -> None:
    assert resolve(*flags, environ, config) == expected


def test_config_file_location() -> None:
    assert config_path({"TUNEHOUSE_CONFIG": "/etc/th.toml"}) == Path("/etc/th.toml")
    assert config_path({"XDG_CONFIG_HOME": "/x"}) == Path("/x/tunehouse/config.toml")
    assert config_path({}) == Path.home() / ".config" / "tunehouse" / "config.toml"


def run_cli(*args: str, tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("TUNEHOUSE_", "OPENAI_"))}
    clean.update(HOME=str(tmp_path), TUNEHOUSE_CONFIG=str(tmp_path / "config.toml"), **env)
    return subprocess.run(
        [sys.executable, "-m", "app.cli", *args],
        cwd=ROOT,
        env=clean,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_an_unreachable_server_is_named(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}/v1"
    done = run_cli("jobs", "list", tmp_path=tmp_path, TUNEHOUSE_BASE_URL=url, TUNEHOUSE_API_KEY="k")
    assert done.returncode == 1
    assert done.stderr.startswith(f"Error: Could not reach {url}:"), done.stderr
    assert "Traceback" not in done.stderr


def test_no_key_says_where_to_give_one(tmp_path: Path) -> None:
    done = run_cli("models", "list", tmp_path=tmp_path)
    assert done.returncode == 1
    assert "No API key: pass --api-key, set TUNEHOUSE_API_KEY" in done.stderr


def test_a_broken_config_file_is_named(tmp_path: Path) -> None:
    (tmp_path / "config.toml").write_text("base_url = \n")
    done = run_cli("files", "list", tmp_path=tmp_path)
    assert done.returncode == 1
    assert f"Cannot read the config file {tmp_path / 'config.toml'}" in done.stderr


def test_the_client_commands_load_none_of_the_server() -> None:
    """They start fast and run where the server's dependencies are not installed."""
    code = (
        "import sys; sys.argv = ['tunehouse', 'jobs', 'list', '--help']\n"
        "from app.cli import main\n"
        "try:\n    main()\nexcept SystemExit:\n    pass\n"
        "heavy = ['torch', 'transformers', 'sqlalchemy', 'fastapi', 'celery',"
        " 'app.core.settings']\n"
        "print([m for m in heavy if m in sys.modules])\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert done.stdout.splitlines()[-1] == "[]", done.stdout + done.stderr
