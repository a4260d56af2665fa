"""What an operator of a running stack sees: its /metrics (the API's and the worker's port, both
behind a metrics token) and its JSON log lines. Used by tests/test_end_to_end.py, whose stacks
run with these settings, so that the jobs it trains anyway show up here too."""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from tests.support import free_port


@dataclass
class Observed:
    """A stack's metrics endpoints and log files, as its environment (``env``) sets them."""

    token: str = field(default_factory=lambda: secrets.token_urlsafe(16))
    worker_port: int = field(default_factory=free_port)

    @property
    def env(self) -> dict[str, str]:
        return {
            "TUNEHOUSE_LOG_FORMAT": "json",
            "TUNEHOUSE_METRICS_TOKEN": self.token,
            "TUNEHOUSE_WORKER_METRICS_PORT": str(self.worker_port),
            "TUNEHOUSE_WORKER_METRICS_HOST": "127.0.0.1",
        }

    def scrape(self, url: str, token: bool = True) -> httpx.Response:
        headers = {"Authorization": f"Bearer {self.token}"} if token else {}
        return httpx.get(url, headers=headers, timeout=10)

    def api(self, base_url: str, token: bool = True) -> httpx.Response:
        return self.scrape(f"{base_url}/metrics", token)

    def worker(self, token: bool = True) -> httpx.Response:
        return self.scrape(f"http://127.0.0.1:{self.worker_port}/metrics", token)


def json_lines(log_dir: Path) -> list[dict[str, Any]]:
    """The JSON log lines of every process of a stack (a Celery banner, a key printed for the
    user and the like are not log lines)."""
    lines = []
    for log in sorted(log_dir.glob("*.log")):
        for line in log.read_text(errors="replace").splitlines():
            if line.startswith("{"):
                try:
                    lines.append(json.loads(line))
                except ValueError:
                    continue
    return lines


def job_lines(lines: list[dict[str, Any]], job_id: str) -> tuple[list[dict], list[dict]]:
    """The lines about a job, of its worker's supervisor and of its training process."""
    about = [line for line in lines if line.get("job_id") == job_id]
    worker = [line for line in about if line["logger"].startswith("worker.supervisor")]
    trainer = [
        line
        for line in about
        if line["logger"].startswith(("tunehouse.training", "worker.training"))
    ]
    return worker, trainer
