"""Helpers shared by the tests: small datasets built here, and processes of the real stack."""

from __future__ import annotations

import csv
import json
import os
import random
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import httpx

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

    from app.core.storage import Storage

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
BASE_MODEL = "sentence-transformers/all-MiniLM-L6-v2"


class Response(Protocol):
    """A response as tests read it: httpx's from a real server, or httpx2's from starlette's
    TestClient (which uses httpx2 where it is installed, as openai installs it)."""

    @property
    def status_code(self) -> int: ...
    @property
    def headers(self) -> Mapping[str, str]: ...
    @property
    def text(self) -> str: ...
    def json(self, **kwargs: Any) -> Any: ...


def as_dict(value: object) -> dict[str, Any]:
    """A JSON object the OpenAI SDK types as ``object`` (an event's data, an error's body)."""
    assert isinstance(value, dict), value
    return value


def extra(obj: Any, name: str) -> Any:
    """A field Tunehouse adds to an OpenAI object, which the SDK keeps as a pydantic extra."""
    assert obj.model_extra is not None and name in obj.model_extra, name
    return obj.model_extra[name]


POSITIVE = ["great", "wonderful", "excellent", "lovely", "superb", "fantastic", "delightful"]
NEGATIVE = ["terrible", "awful", "horrible", "dreadful", "poor", "boring", "disappointing"]
NOUNS = ["movie", "meal", "hotel", "service", "book", "concert", "trip", "game", "show", "room"]
TEMPLATES = [
    "the {noun} was {adj}",
    "what a {adj} {noun}",
    "i found the {noun} {adj} overall",
    "honestly, a {adj} {noun}",
]


def sentiment_rows(n: int, seed: int) -> list[dict[str, str]]:
    """Sentences whose label is decided by one adjective: a clear rule a model can learn."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        positive = rng.random() < 0.5
        adj = rng.choice(POSITIVE if positive else NEGATIVE)
        text = rng.choice(TEMPLATES).format(noun=rng.choice(NOUNS), adj=adj)
        rows.append({"text": text, "label": "positive" if positive else "negative"})
    return rows


def jsonl(rows: Iterable[Mapping[str, object]]) -> bytes:
    return "".join(json.dumps(row) + "\n" for row in rows).encode()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(predicate, timeout: float, interval: float = 0.25, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def tunehouse(*args: str, env: dict[str, str], **kwargs) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "app.cli", *args],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
        **kwargs,
    )


def answers_ready(base_url: str) -> bool:
    """Whether the API at ``base_url`` answers its readiness probe with 200."""
    try:
        return httpx.get(f"{base_url}/readyz", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


class Stack:
    """Tunehouse processes started the way a user starts them, and torn down afterwards."""

    def __init__(self, name: str, env: dict[str, str], log_dir: Path):
        self.name, self.env, self.log_dir = name, env, log_dir
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.processes: list[subprocess.Popen[bytes]] = []

    def start(self, *args: str, log: str) -> subprocess.Popen[bytes]:
        out = (self.log_dir / f"{log}.log").open("wb")
        process = subprocess.Popen(
            [sys.executable, "-m", "app.cli", *args],
            env=self.env,
            cwd=ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.processes.append(process)
        return process

    def wait_ready(self, timeout: float = 60) -> None:
        def ready() -> bool:
            for process in self.processes:
                if process.poll() is not None:
                    raise AssertionError(f"{self.name}: a process exited; see {self.log_dir}")
            return answers_ready(self.base_url)

        wait_until(ready, timeout, what=f"{self.name} to be ready")

    def logs(self) -> str:
        return "\n".join(
            f"--- {p.name} ---\n{p.read_text(errors='replace')[-4000:]}"
            for p in sorted(self.log_dir.glob("*.log"))
        )

    def stop(self) -> None:
        import signal

        for process in self.processes:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
        for process in self.processes:
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()


def training_processes(job_id: str) -> list[int]:
    """PIDs of live training processes for a job (from /proc, as `ps` would show them)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
            status = (entry / "status").read_text()
        except OSError:
            continue
        zombie = "\nState:\tZ" in status
        if b"worker.runner" in cmdline and job_id.encode() in cmdline and not zombie:
            pids.append(int(entry.name))
    return pids


def read_sst2(path: Path) -> list[dict[str, str]]:
    """GLUE SST-2 TSV (`sentence<TAB>label`, 1 = positive) as classification rows."""
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle, delimiter="\t", quoting=csv.QUOTE_NONE)
        return [
            {
                "text": r["sentence"].strip(),
                "label": "positive" if r["label"] == "1" else "negative",
            }
            for r in reader
        ]


def add_training_file(
    session: Session, storage: Storage, organization_id: str, content: bytes
) -> str:
    """A training file as an upload leaves it: stored, validated, and its row added; returns
    its id."""
    from app.core.ids import new_id
    from app.models import File
    from app.services.datasets import validate_dataset

    file_id = new_id("file")
    path = storage.file_path(file_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    info = validate_dataset(path)
    session.add(
        File(
            id=file_id,
            organization_id=organization_id,
            filename="train.jsonl",
            purpose="fine-tune",
            bytes=len(content),
            sha256="0" * 64,
            format=info.format,
            stats=info.stats,
            storage_path=storage.relative(path),
        )
    )
    session.flush()
    return file_id


@contextmanager
def fresh_postgres_database(server_url: str, prefix: str = "tunehouse_test") -> Iterator[str]:
    """A new database on the server of ``server_url`` (any SQLAlchemy psycopg URL), dropped
    afterwards; yields its SQLAlchemy URL."""
    import psycopg

    from app.core.db import get_engine

    admin_url = server_url.replace("postgresql+psycopg://", "postgresql://", 1)
    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(admin_url, autocommit=True, connect_timeout=3) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    base = admin_url.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://", 1)
    url = f"{base}/{name}"
    try:
        yield url
    finally:
        get_engine(url).dispose()
        with psycopg.connect(admin_url, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


# A task an untrained model cannot do: each keyword has a fixed, made-up answer word.
FACTS = {
    "apple": "zorvik", "river": "plemna", "castle": "quandor", "tiger": "belmoth",
    "cloud": "fintrap", "violin": "gorsel", "pepper": "mavlune", "rocket": "twindle",
    "garden": "sprocken", "mirror": "yelvast", "candle": "drumlow", "harbor": "kestrin",
}  # fmt: skip
TRAIN_QUESTIONS = [
    "what is the code for {kw}?",
    "tell me the code for {kw}.",
    "{kw}: which code?",
    "i need the code of {kw}",
    "code for {kw} please",
]
HELD_OUT_QUESTIONS = ["which code goes with {kw}?", "give me the {kw} code"]


def fact_chat_rows(questions: list[str]) -> list[dict[str, object]]:
    rows: list[dict[str, object]] = []
    for kw, answer in FACTS.items():
        for question in questions:
            messages = [{"role": "system", "content": "answer with the code word only"}]
            messages += [
                {"role": "user", "content": question.format(kw=kw)},
                {"role": "assistant", "content": answer},
            ]
            rows.append({"messages": messages})
    return rows


def fact_texts() -> list[str]:
    """Every text the fact task uses, for training a tiny tokenizer that knows its words."""
    texts = [q.format(kw=kw) for kw in FACTS for q in TRAIN_QUESTIONS + HELD_OUT_QUESTIONS]
    texts += list(FACTS.values()) * 5 + [
        "answer with the code word only",
        "### user: ### assistant:",
    ]
    return texts
