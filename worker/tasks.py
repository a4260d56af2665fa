"""Celery tasks: thin. Each takes an id, imports the heavy parts inside, and leaves the state in
the database. The broker may deliver a task twice or lose it; neither loses nor doubles a job."""

from __future__ import annotations

from typing import Any

from app.core.queue import RECONCILE, RUN_JOB
from app.core.settings import get_settings
from worker.celery_app import celery_app


@celery_app.task(name=RUN_JOB, ignore_result=True, acks_late=True)
def run_job(job_id: str) -> None:
    from worker.supervisor import supervise_job

    supervise_job(get_settings(), job_id)


@celery_app.task(name=RECONCILE, ignore_result=True)
def reconcile() -> dict[str, Any]:
    from worker.reconciler import reconcile_once

    return reconcile_once(get_settings())
