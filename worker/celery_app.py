"""The Celery worker app: `celery -A worker.celery_app worker`, or `tunehouse worker`."""

from __future__ import annotations

import logging
import threading
from typing import Any

from celery.signals import worker_ready

from app.core.queue import make_celery
from app.core.settings import get_settings

celery_app = make_celery(get_settings())
celery_app.conf.update(include=["worker.tasks"], worker_concurrency=1)

log = logging.getLogger(__name__)


@worker_ready.connect
def _sweep_at_start(**_: Any) -> None:
    """Jobs whose wake-ups were lost while no worker ran are found at once, not a period later."""

    def sweep() -> None:
        from worker.reconciler import reconcile_once

        try:
            reconcile_once(get_settings(), at_start=True)
        except Exception:
            log.exception("start-up reconcile failed")

    threading.Thread(target=sweep, name="tunehouse-start-sweep", daemon=True).start()
