"""Operations endpoints outside /v1: liveness, readiness and Prometheus metrics."""

from __future__ import annotations

import os
from typing import Any

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import text

from app.api.deps import SettingsDep
from app.core.db import get_engine
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


@router.get("/readyz", responses={503: {"description": "The database or broker is unreachable"}})
def readyz(settings: SettingsDep) -> Any:
    checks: dict[str, str] = {}
    for name, check in (("database", _check_database), ("broker", _check_broker)):
        try:
            check(settings)
            checks[name] = "ok"
        except Exception as exc:  # report, do not raise: this route exists to say what is down
            checks[name] = f"error: {type(exc).__name__}"
    ready = all(v == "ok" for v in checks.values())
    return JSONResponse(
        {"status": "ok" if ready else "unavailable", "checks": checks}, 200 if ready else 503
    )


@router.get("/metrics", response_class=Response)
def metrics() -> Response:
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)
