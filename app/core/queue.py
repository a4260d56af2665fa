"""The Celery application as both sides see it. The API only sends wake-ups by task name;
the worker adds its tasks in ``worker.celery_app``. The broker carries wake-ups, never state:
a lost message is re-sent by the reconciler from what the database says.

Each device kind has a queue of its own, named for it ("cpu", "gpu", or a name an operator
chose): a job's wake-up goes to the queue of its ``resources.device`` (``settings.default_queue``
when it named none), and a worker takes jobs from one queue (``settings.serving_queue``).
"""

from __future__ import annotations

import logging
from datetime import timedelta

from celery import Celery

from app.core.filesystem_broker import TRANSPORT as FILESYSTEM_TRANSPORT
from app.core.settings import Settings

log = logging.getLogger(__name__)

RUN_JOB = "tunehouse.run_job"
RECONCILE = "tunehouse.reconcile"


def make_celery(settings: Settings) -> Celery:
    app = Celery("tunehouse", broker=settings.celery_broker_url, set_as_current=False)
    transport_options: dict[str, object]
    transport = None
    if settings.uses_filesystem_broker:
        transport = FILESYSTEM_TRANSPORT  # kombu's, with files that appear whole
        queue_dir, control_dir = settings.ensure_broker_dirs()
        transport_options = {
            "data_folder_in": str(queue_dir),
            "data_folder_out": str(queue_dir),
            "control_folder": str(control_dir),
            "store_processed": False,
        }
    else:
        # Redis hands an unacknowledged task to another worker after this long; the job's
        # lease makes that second delivery a no-op, so it only has to outlive a normal start.
        transport_options = {
            "visibility_timeout": settings.broker_visibility_timeout,
            # Look for such tasks every 10 s (kombu's interval), not on every tenth look
            # (its default throttle, about 100 s), so the timeout means what it says.
            "unacked_restore_throttle": 1,
            "max_retries": 1,
        }
    app.conf.update(
        task_default_queue=settings.default_queue,
        task_ignore_result=True,
        task_acks_late=True,
        worker_prefetch_multiplier=1,
        worker_hijack_root_logger=False,
        broker_transport=transport,
        broker_transport_options=transport_options,
        broker_connection_retry_on_startup=True,
        broker_connection_timeout=settings.broker_publish_timeout,
        worker_enable_remote_control=not settings.uses_filesystem_broker,
        worker_send_task_events=False,
        beat_schedule={
            "reconcile": {
                "task": RECONCILE,
                "schedule": timedelta(seconds=settings.reconcile_interval_seconds),
                # A wake-up that waited longer than one interval is stale: drop it. It goes
                # to the queue of the worker whose beat sends it, which may be the only one.
                "options": {
                    "expires": settings.reconcile_interval_seconds,
                    "queue": settings.serving_queue,
                },
            }
        },
    )
    return app


_clients: dict[tuple[str, str], Celery] = {}


def _client(settings: Settings) -> Celery:
    key = (settings.celery_broker_url, str(settings.broker_dir))
    if key not in _clients:
        _clients[key] = make_celery(settings)
    return _clients[key]


def enqueue_job(settings: Settings, job_id: str, queue: str | None = None) -> bool:
    """Send the job's wake-up to ``queue``, the job's (``jobs.job_queue``; default: the
    default queue). False when the broker is unreachable: the job stays queued in the database
    and the reconciler sends it again later."""
    try:
        _client(settings).send_task(
            RUN_JOB,
            args=[job_id],
            queue=queue or settings.default_queue,
            retry=True,
            retry_policy={"max_retries": 1, "interval_start": 0, "interval_step": 0.5},
        )
        return True
    except Exception:  # the broker is down or unreachable; the database still holds the job
        log.warning("could not enqueue job %s; the reconciler will retry", job_id, exc_info=True)
        return False
