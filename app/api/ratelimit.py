"""Per-key request limits (``TUNEHOUSE_RATE_LIMIT_PER_MINUTE``), counted over a moving
one-minute window by the ``limits`` library: in Redis when Redis is the broker, so every API
process shares the count, and in this process otherwise."""

from __future__ import annotations

import logging
import math
import threading
import time
from dataclasses import dataclass

from fastapi import FastAPI
from limits import RateLimitItem, RateLimitItemPerMinute
from limits.errors import StorageError
from limits.storage import MemoryStorage, RedisStorage, Storage
from limits.strategies import MovingWindowRateLimiter

from app.core.errors import RateLimited
from app.core.settings import Settings

log = logging.getLogger("tunehouse.api")

NAMESPACE = "tunehouse-requests"
_build_lock = threading.Lock()


@dataclass
class KeyRateLimiter:
    limiter: MovingWindowRateLimiter
    item: RateLimitItem

    def check(self, key_id: str) -> None:
        """Count one request for ``key_id``; RateLimited when it is over the limit."""
        try:
            if self.limiter.hit(self.item, NAMESPACE, key_id):
                return
            reset_at = self.limiter.get_window_stats(self.item, NAMESPACE, key_id).reset_time
        except StorageError as exc:
            # A broken counter store must not take the API down with it: serve unlimited.
            log.warning("rate limit store unavailable, request not counted: %s", exc)
            return
        retry_after = max(1, math.ceil(reset_at - time.time()))
        raise RateLimited(
            f"Rate limit reached: {self.item.amount} requests per minute for this API key. "
            f"Try again in {retry_after} s.",
            retry_after=retry_after,
        )


def build_limiter(settings: Settings) -> KeyRateLimiter | None:
    """None when limits are off (``rate_limit_per_minute = 0``)."""
    if settings.rate_limit_per_minute <= 0:
        return None
    storage: Storage
    if settings.celery_broker_url.startswith(("redis://", "rediss://")):
        storage = RedisStorage(
            settings.celery_broker_url,
            wrap_exceptions=True,
            socket_connect_timeout=2,
            socket_timeout=2,
        )
    else:
        storage = MemoryStorage()
    item = RateLimitItemPerMinute(settings.rate_limit_per_minute)
    return KeyRateLimiter(MovingWindowRateLimiter(storage), item)


def limiter_for(app: FastAPI, settings: Settings) -> KeyRateLimiter | None:
    """The app's limiter, built on first use (one per app, so one count per process)."""
    with _build_lock:
        if not hasattr(app.state, "rate_limiter"):
            app.state.rate_limiter = build_limiter(settings)
    limiter: KeyRateLimiter | None = app.state.rate_limiter
    return limiter
