"""The Celery worker app: `celery -A worker.celery_app worker`, or `tunehouse worker`.

The pool is threads: a task only watches its training process (the training runs in a
spawned process of its own), so the worker stays one process. Killing it (even with -9)
takes its training processes with it, and a SIGTERM reaches the code that hands its jobs
back to the queue.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from celery.signals import beat_init, setup_logging, worker_ready, worker_shutting_down

from app.core.logs import configure_logging
from app.core.queue import make_celery
from app.core.settings import get_settings

celery_app = make_celery(get_settings())
celery_app.conf.update(include=["worker.tasks"], worker_concurrency=1, worker_pool="threads")

log = logging.getLogger(__name__)


@setup_logging.connect
def _logging(**_: Any) -> None:
    """The worker logs as the API does (``log_level``, ``log_format``), Celery's lines too:
    a receiver of this signal replaces Celery's own set-up."""
    settings = get_settings()
    configure_logging(settings.log_level, settings.log_format)


@worker_ready.connect
def _serve_metrics(**_: Any) -> None:
    """The worker's metrics on ``worker_metrics_port``, from the worker's own process (started
    once the worker is ready, so an embedded beat, a child process, does not inherit the
    socket)."""
    settings = get_settings()
    if settings.worker_metrics_port:
        from worker.metrics_server import start_metrics_server

        try:
            start_metrics_server(settings)
        except OSError:
            log.exception("cannot serve metrics on port %d", settings.worker_metrics_port)


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


@worker_shutting_down.connect
def _drain(sig: str = "", how: str = "", **_: Any) -> None:
    """Warm shutdown: each running job checkpoints and goes back to the queue, instead of the
    worker waiting for it to finish."""
    from worker.supervisor import DRAINING

    log.info("%s received (%s shutdown): handing running jobs back to the queue", sig, how)
    DRAINING.set()


@beat_init.connect
def _beat_dies_with_worker(**_: Any) -> None:
    """An embedded beat (`worker --beat`) is a child process: it goes when its worker goes."""
    from app.core.process import die_with_parent

    die_with_parent()
