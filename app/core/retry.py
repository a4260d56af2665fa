"""Retrying a database call while the database is away for a moment (tenacity)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TypeVar

from sqlalchemy.exc import DBAPIError, OperationalError
from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_exception,
    stop_after_delay,
    wait_exponential,
)

log = logging.getLogger(__name__)

T = TypeVar("T")


def _unreachable(exc: BaseException) -> bool:
    """The database did not answer, or dropped the connection: not a wrong query or a rule."""
    return isinstance(exc, OperationalError) or (
        isinstance(exc, DBAPIError) and exc.connection_invalidated
    )


def retry_for(seconds: float, fn: Callable[[], T], *, what: str) -> T:
    """``fn()``, retried while the database is unreachable, with exponential backoff (0.5 s
    doubling to 8 s) for up to ``seconds``; any other error, or the last one, is raised."""

    def warn(state: RetryCallState) -> None:
        error = state.outcome.exception() if state.outcome else None
        wait = state.next_action.sleep if state.next_action else 0.0
        log.warning("%s: the database did not answer (%s); retrying in %.1f s", what, error, wait)

    retrying = Retrying(
        retry=retry_if_exception(_unreachable),
        stop=stop_after_delay(seconds),
        wait=wait_exponential(multiplier=0.5, max=8),
        before_sleep=warn,
        reraise=True,
    )
    return retrying(fn)
