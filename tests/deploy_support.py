"""docker-compose.yml as the deployment tests read it: as written (YAML, anchors resolved) and
as Debian's `docker-compose` renders it (`config`, with profiles)."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import yaml

from tests.support import ROOT

COMPOSE_FILE = ROOT / "docker-compose.yml"


def compose_file() -> dict[str, Any]:
    """The compose file as written, its anchors and merge keys resolved."""
    loaded = yaml.safe_load(COMPOSE_FILE.read_text())
    assert isinstance(loaded, dict)
    return loaded


def compose_service_healthcheck(service: str) -> str:
    """A service's CMD-SHELL healthcheck as the container's shell runs it (compose writes a
    literal ``$`` as ``$$``)."""
    kind, command = compose_file()["services"][service]["healthcheck"]["test"]
    assert kind == "CMD-SHELL", kind
    return str(command).replace("$$", "$")


def docker_compose() -> str | None:
    return shutil.which("docker-compose")


def compose_config(*profiles: str, quiet: bool = False) -> subprocess.CompletedProcess[str]:
    """`docker-compose -f docker-compose.yml [--profile P]... config [-q]`, run in the repo with
    none of this shell's variables or .env file: the file's own defaults."""
    env = {name: os.environ[name] for name in ("PATH", "HOME") if name in os.environ}
    with tempfile.TemporaryDirectory() as tmp:
        empty = Path(tmp) / "empty.env"
        empty.touch()
        command = [docker_compose() or "docker-compose", "-f", str(COMPOSE_FILE)]
        command += ["--env-file", str(empty)]
        for profile in profiles:
            command += ["--profile", profile]
        command += ["config"] + (["-q"] if quiet else [])
        return subprocess.run(
            command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
        )
