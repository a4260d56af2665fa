"""Retrying a database write while the database is away for a moment."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")


def retry_for(
    seconds: float,
    fn: Callable[[], T],
    *,
    what: str,
    give_up_on: tuple[type[BaseException], ...] = (),
) -> T:
    """``fn()``, retried with exponential backoff (0.5 s doubling to 8 s) for up to
    ``seconds``: the database may be away for a moment. ``give_up_on`` errors are final."""
    deadline = time.monotonic() + seconds
    delay = 0.5
    while True:
        try:
            return fn()
        except give_up_on:
            raise
        except Exception:
            if time.monotonic() + delay > deadline:
                raise
            log.warning("%s failed; retrying in %.1f s", what, delay, exc_info=True)
            time.sleep(delay)
            delay = min(delay * 2, 8.0)
