"""/readyz under many concurrent probes: the database and broker checks run about once per
second (TUNEHOUSE_READINESS_CACHE_SECONDS), not once per probe, and a later probe checks anew."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from app.api.routes import health
from app.core.settings import Settings
from app.main import create_app
from tests.conftest import make_settings
from tests.served import served

CLIENTS, PROBES_EACH = 16, 10


def test_concurrent_probes_share_one_check_per_second(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    checks = 0
    lock = threading.Lock()
    check_database = health._check_database

    def counted(settings: Settings) -> None:
        nonlocal checks
        with lock:
            checks += 1
        time.sleep(0.05)  # a check takes a moment: probes pile up behind it
        check_database(settings)

    monkeypatch.setattr(health, "_check_database", counted)
    app = create_app(make_settings(tmp_path / "data"))

    def probe(base_url: str) -> list[int]:
        with httpx.Client(base_url=base_url, timeout=30) as client:
            return [client.get("/readyz").status_code for _ in range(PROBES_EACH)]

    with served(app) as base_url:
        started = time.monotonic()
        with ThreadPoolExecutor(CLIENTS) as pool:
            statuses = [s for batch in pool.map(probe, [base_url] * CLIENTS) for s in batch]
        elapsed = time.monotonic() - started
        assert statuses == [200] * CLIENTS * PROBES_EACH
        # At most one check per started second of the burst (plus the one at its start).
        assert 1 <= checks <= int(elapsed) + 2, (checks, elapsed)

        burst_checks = checks
        time.sleep(1.2)  # the cached answer is now stale: the next probe checks again
        assert httpx.get(f"{base_url}/readyz", timeout=30).json()["checks"]["database"] == "ok"
        assert checks == burst_checks + 1
