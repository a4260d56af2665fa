"""Celery's filesystem transport (kombu's), with files that appear whole.

Kombu's transport creates a file, then locks it, then writes it, while its readers do not all
wait for that lock: the reader of a queue renames a message away without taking it, and a
queue declared while another process creates the exchange's binding table reads that table
empty. Under concurrent use a worker then dies on an empty JSON document ("Unrecoverable
error: JSONDecodeError") or a binding is lost. Here every file is written under a name no
reader looks at and renamed into place (a rename is atomic, so a reader sees all of a file or
none of it), and writers of a binding table take turns on a lock file of their own.
"""

from __future__ import annotations

import fcntl
import os
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from time import monotonic
from typing import Any

from kombu.exceptions import ChannelError
from kombu.transport import filesystem, virtual
from kombu.utils.json import dumps

# A file being written ends with this; the queue reader only takes names that end in ".msg".
PARTIAL = ".partial"


def write_whole(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` so that no reader ever sees a part of it."""
    partial = path.with_name(f"{path.name}.{uuid.uuid4().hex}{PARTIAL}")
    try:
        with partial.open("wb") as f:
            f.write(text.encode())
        os.replace(partial, path)
    except BaseException:
        with suppress(OSError):
            partial.unlink()
        raise


@contextmanager
def _writers_lock(path: Path) -> Iterator[None]:
    with path.open("ab") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


class Channel(filesystem.Channel):
    # kombu's own channel classes name _put's second argument differently (message, payload).
    def _put(self, queue: Any, message: Any, **kwargs: Any) -> None:  # type: ignore[override]
        name = f"{round(monotonic() * 1000)}_{uuid.uuid4()}.{queue}.msg"
        try:
            write_whole(Path(self.data_folder_out) / name, dumps(message))
        except OSError as exc:
            raise ChannelError(f"Cannot add file {name!r} to directory") from exc

    def _queue_bind(self, exchange: str, routing_key: str, pattern: str, queue: str) -> None:
        binding = filesystem.exchange_queue_t(routing_key or "", pattern or "", queue or "")
        self._change_table(exchange, lambda table: table if binding in table else [binding, *table])

    def _delete(
        self, queue: str, exchange: str, routing_key: str, pattern: str, *args: Any, **kwargs: Any
    ) -> None:
        # The virtual channel's bookkeeping, then the table without the filesystem one's rewrite.
        virtual.Channel._delete(self, queue, exchange, routing_key, pattern, *args, **kwargs)
        binding = filesystem.exchange_queue_t(routing_key or "", pattern or "", queue or "")
        self._change_table(exchange, lambda table: [b for b in table if b != binding])

    def _change_table(self, exchange: str, change: Callable[[list[Any]], list[Any]]) -> None:
        file = self._exchange_file(exchange)
        try:
            self.control_folder.mkdir(exist_ok=True)
            with _writers_lock(file.with_name(f"{file.name}.lock")):
                table = self.get_table(exchange)
                changed = change(table)
                if changed != table:
                    write_whole(file, dumps(changed))
        except OSError as exc:
            raise ChannelError(f"Cannot open {file}") from exc


class Transport(filesystem.Transport):
    Channel = Channel


# Celery's `broker_transport` setting: the filesystem URL with this transport.
TRANSPORT = f"{__name__}:Transport"
