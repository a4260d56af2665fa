"""The laptop's broker under concurrent processes. Kombu's filesystem transport creates a file,
then locks and writes it, while readers do not wait: declaring queues from several processes at
once (the API, the worker and its beat all do at start-up) read a binding table that was still
empty ("Unrecoverable error: JSONDecodeError" killed the soak's worker), lost bindings, or left
the table corrupt. Tunehouse's transport writes every file whole under another name and renames
it into place."""

from __future__ import annotations

import json
import multiprocessing as mp
import time
from pathlib import Path
from queue import Empty
from typing import Any

from kombu import Connection, Exchange, Queue

from app.core.filesystem_broker import PARTIAL, TRANSPORT
from app.core.queue import make_celery
from tests.conftest import make_settings

PROCESSES = 6
EXCHANGES = 20
MESSAGES = 400  # per producer


def _connection(folder: Path) -> Connection:
    options = {
        "data_folder_in": str(folder / "queue"),
        "data_folder_out": str(folder / "queue"),
        "control_folder": str(folder / "control"),
        "store_processed": False,
    }
    return Connection("filesystem://", transport=TRANSPORT, transport_options=options)


def _declare_at(folder: Path, index: int, start: float, out: Any) -> None:
    """Bind queue ``q<index>`` to each of the exchanges, starting with the others at ``start``."""
    with _connection(folder) as connection:
        channel = connection.channel()
        time.sleep(max(0.0, start - time.time()))
        try:
            for n in range(EXCHANGES):
                queue = Queue(f"q{index}", Exchange(f"ex{n}", "direct"), routing_key=f"q{index}")
                queue(channel).declare()
                channel.get_table(f"ex{n}")  # what a publish reads
        except Exception as exc:  # reported to the test, which names it
            out.put(repr(exc))
            return
    out.put("ok")


def _produce(folder: Path, who: int, out: Any) -> None:
    with _connection(folder) as connection:
        channel = connection.channel()
        for i in range(MESSAGES):
            channel._put("q", {"who": who, "i": i, "pad": "x" * 2000})
    out.put("ok")


def _start(target: Any, args_of: list[tuple[Any, ...]]) -> list[str]:
    spawn = mp.get_context("spawn")
    out = spawn.Queue()
    processes = [spawn.Process(target=target, args=(*args, out)) for args in args_of]
    for process in processes:
        process.start()
    results = [out.get(timeout=120) for _ in processes]
    for process in processes:
        process.join(timeout=30)
    return results


def _folders(tmp_path: Path) -> Path:
    (tmp_path / "queue").mkdir()
    (tmp_path / "control").mkdir()
    return tmp_path


def test_queues_declared_by_many_processes_at_once_are_all_bound(tmp_path: Path) -> None:
    folder = _folders(tmp_path)
    start = time.time() + 3  # after the spawned interpreters have imported kombu
    results = _start(_declare_at, [(folder, i, start) for i in range(PROCESSES)])

    assert results == ["ok"] * PROCESSES
    for n in range(EXCHANGES):
        table = json.loads((folder / "control" / f"ex{n}.exchange").read_text())
        assert sorted(queue for _, _, queue in table) == [f"q{i}" for i in range(PROCESSES)]
    assert not list(folder.rglob(f"*{PARTIAL}"))


def test_messages_from_many_producers_arrive_whole_and_once(tmp_path: Path) -> None:
    folder = _folders(tmp_path)
    spawn = mp.get_context("spawn")
    out = spawn.Queue()
    producers = [spawn.Process(target=_produce, args=(folder, who, out)) for who in range(2)]
    for producer in producers:
        producer.start()
    received: list[tuple[int, int]] = []
    with _connection(folder) as connection:
        channel = connection.channel()
        deadline = time.monotonic() + 120
        while len(received) < 2 * MESSAGES and time.monotonic() < deadline:
            try:  # read while they write: a message is there whole or not at all
                message = channel._get("q")
            except Empty:
                continue
            received.append((message["who"], message["i"]))
    assert [out.get(timeout=60) for _ in producers] == ["ok", "ok"]
    for producer in producers:
        producer.join(timeout=30)

    assert sorted(received) == [(who, i) for who in range(2) for i in range(MESSAGES)]
    assert not list(folder.rglob(f"*{PARTIAL}"))


def test_the_laptop_broker_uses_this_transport(tmp_path: Path) -> None:
    celery = make_celery(make_settings(tmp_path / "data"))
    with celery.connection_for_write() as connection:
        assert type(connection.transport).__module__ == "app.core.filesystem_broker"
