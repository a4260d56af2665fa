"""Operations endpoints outside /v1: liveness, readiness and Prometheus metrics."""

from __future__ import annotations

import asyncio
import math
import os
import time
from typing import Any

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import text
from starlette.concurrency import run_in_threadpool

from app.core.db import get_engine
from app.core.metrics_access import refusal
from app.core.settings import Settings

router = APIRouter(tags=["operations"])


@router.get("/healthz")
def healthz() -> dict[str, str]:
    return {"status": "ok"}


def _check_database(settings: Settings) -> None:
    with get_engine(settings.sqlalchemy_url).connect() as connection:
        connection.execute(text("SELECT 1"))


def _check_broker(settings: Settings) -> None:
    if settings.uses_filesystem_broker:
        queue, _ = settings.ensure_broker_dirs()
        if not os.access(queue, os.W_OK):
            raise PermissionError(f"cannot write to {queue}")
        return
    import redis

    client = redis.Redis.from_url(settings.celery_broker_url, socket_timeout=2)
    try:
        client.ping()
    finally:
        client.close()


def run_checks(settings: Settings) -> dict[str, str]:
    checks: dict[str, str] = {}
    for name, check in (("database", _check_database), ("broker", _check_broker)):
        try:
            check(settings)
            checks[name] = "ok"
        except Exception as exc:  # report, do not raise: this route exists to say what is down
            checks[name] = f"error: {type(exc).__name__}"
    return checks


class ReadinessProbe:
    """The checks of ``/readyz``, run at most once per ``ttl`` seconds however many probes
    come (load balancers probe often, and each check costs a connection). Probes that arrive
    while a check runs wait for that one. Everything here runs on the event loop, so no lock
    is needed: the checks themselves run in a worker thread."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.ttl = settings.readiness_cache_seconds
        self._checks: dict[str, str] = {}
        self._checked_at = -math.inf
        self._running: asyncio.Future[dict[str, str]] | None = None

    async def checks(self) -> dict[str, str]:
        if time.monotonic() - self._checked_at < self.ttl:
            return self._checks
        running = self._running
        if running is None or running.get_loop() is not asyncio.get_running_loop():
            running = self._running = asyncio.ensure_future(self._run())
        # shield: a probe whose client leaves does not cancel the check the others wait for.
        return await asyncio.shield(running)

    async def _run(self) -> dict[str, str]:
        try:
            checks = await run_in_threadpool(run_checks, self.settings)
            self._checks, self._checked_at = checks, time.monotonic()
            return checks
        finally:
            self._running = None


@router.get("/readyz", responses={503: {"description": "The database or broker is unreachable"}})
async def readyz(request: Request) -> Any:
    probe: ReadinessProbe = request.app.state.readiness
    checks = await probe.checks()
    ready = all(v == "ok" for v in checks.values())
    return JSONResponse(
        {"status": "ok" if ready else "unavailable", "checks": checks}, 200 if ready else 503
    )


async def metrics_access(request: Request) -> None:
    """``metrics_allow`` and ``metrics_token``, when set (app/core/metrics_access.py)."""
    client = request.client.host if request.client else None
    refused = refusal(request.app.state.settings, client, request.headers.get("authorization"))
    if refused is not None:
        raise refused


# The 401 and 403 of a restricted /metrics are documented by app/api/openapi.py, from settings.
@router.get("/metrics", response_class=Response, dependencies=[Depends(metrics_access)])
def metrics(request: Request) -> Response:
    """Prometheus metrics of this process; with the control routes, also the jobs by status
    and the depth of each worker queue, read at scrape time."""
    return Response(generate_latest(request.app.state.metrics), media_type=CONTENT_TYPE_LATEST)
