"""How many wake-ups wait in each worker queue of the broker (``tunehouse_queue_depth``).

Read from the broker itself, for the queues it knows (the ones workers and senders declared)
and the default queue: Redis holds a queue as lists (one per priority step), named by kombu;
the filesystem broker as one file a message, ``<time>_<uuid>.<queue>.msg``. Only names that
can be Tunehouse queues count (Celery's own control queues have dots and ``@`` in theirs).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable
from pathlib import Path

from kombu.transport import redis as kombu_redis

from app.core.settings import QUEUE_NAME, Settings

# Seconds the broker may take to answer a scrape.
TIMEOUT_SECONDS = 2.0
_MESSAGE_SUFFIX = ".msg"


def _queue_names(names: Iterable[object]) -> set[str]:
    return {n for n in names if isinstance(n, str) and re.fullmatch(QUEUE_NAME, n)}


def queue_depths(settings: Settings) -> dict[str, int]:
    """Messages waiting in each queue (0 for a known queue that holds none)."""
    if settings.uses_filesystem_broker:
        depths = _filesystem_depths(settings.broker_dir / "queue", settings.broker_dir / "control")
    else:
        depths = _redis_depths(settings.celery_broker_url)
    return {settings.default_queue: 0, **depths}


def _filesystem_depths(queue_dir: Path, control_dir: Path) -> dict[str, int]:
    depths: dict[str, int] = {}
    # The exchange tables list each bound queue: [routing key, pattern, queue].
    for table in control_dir.glob("*.exchange") if control_dir.is_dir() else ():
        try:
            bindings = json.loads(table.read_text())
        except (OSError, ValueError):
            continue  # replaced while read; the next scrape sees it
        for queue in _queue_names(b[-1] for b in bindings if isinstance(b, list) and b):
            depths.setdefault(queue, 0)
    if queue_dir.is_dir():
        for name in os.listdir(queue_dir):
            if name.endswith(_MESSAGE_SUFFIX):
                queue = name.partition(".")[2].removesuffix(_MESSAGE_SUFFIX)
                if re.fullmatch(QUEUE_NAME, queue):
                    depths[queue] = depths.get(queue, 0) + 1
    return depths


def _redis_depths(url: str) -> dict[str, int]:
    import redis

    channel = kombu_redis.Channel
    client = redis.Redis.from_url(
        url,
        socket_timeout=TIMEOUT_SECONDS,
        socket_connect_timeout=TIMEOUT_SECONDS,
        decode_responses=True,
        encoding_errors="replace",
    )
    try:
        queues: set[str] = set()
        for key in client.scan_iter(match=channel.keyprefix_queue % "*", count=100):
            bound = (str(member).split(channel.sep)[-1] for member in client.smembers(key))
            queues |= _queue_names(bound)
        names = sorted(queues)
        with client.pipeline(transaction=False) as pipe:
            for queue in names:
                for priority in kombu_redis.PRIORITY_STEPS:  # one list per priority step
                    pipe.llen(f"{queue}{channel.sep}{priority}" if priority else queue)
            lengths = pipe.execute()
    finally:
        client.close()
    steps = len(kombu_redis.PRIORITY_STEPS)
    return {q: sum(lengths[i * steps : (i + 1) * steps]) for i, q in enumerate(names)}
