"""Metrics read at scrape time from the source of truth: jobs by status (the database) and
the wake-ups waiting in each worker queue (the broker). The control API serves them.

A scrape costs one ``GROUP BY`` over the jobs' status index and one look at the broker, each
bounded by a short timeout. The query runs on a connection of its own, opened for it and closed
right after: a scrape never takes, nor waits for, a connection of the requests' pool. A source
that does not answer is reported by ``tunehouse_metrics_source_up`` and its figures are left
out (never a stale or a made-up zero).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from functools import cached_property

from prometheus_client import REGISTRY, CollectorRegistry, Metric
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import Engine, create_engine, func, select, text
from sqlalchemy.pool import NullPool

from app.core.queue_depth import TIMEOUT_SECONDS, queue_depths
from app.core.settings import Settings
from app.models import Job
from app.services.jobs import ACTIVE, TERMINAL

log = logging.getLogger(__name__)

STATUSES = (*ACTIVE, *TERMINAL)


class StateCollector(Collector):
    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    @cached_property
    def _engine(self) -> Engine:
        url = self.settings.sqlalchemy_url
        timeout = int(TIMEOUT_SECONDS)
        if url.startswith("sqlite"):
            connect_args: dict[str, object] = {"timeout": timeout, "check_same_thread": False}
        elif url.startswith("postgresql"):
            connect_args = {"connect_timeout": timeout}
        else:
            connect_args = {}
        return create_engine(url, poolclass=NullPool, connect_args=connect_args)

    def _jobs_by_status(self) -> dict[str, int]:
        with self._engine.connect() as connection, connection.begin():
            if connection.dialect.name == "postgresql":
                milliseconds = int(TIMEOUT_SECONDS * 1000)
                connection.execute(text(f"SET LOCAL statement_timeout = {milliseconds}"))
            rows = connection.execute(select(Job.status, func.count()).group_by(Job.status))
            return {status: count for status, count in rows}

    def collect(self) -> Iterable[Metric]:
        up = GaugeMetricFamily(
            "tunehouse_metrics_source_up",
            "Whether the last scrape could read the source (database, broker)",
            labels=["source"],
        )
        jobs = GaugeMetricFamily(
            "tunehouse_jobs", "Jobs by status, of all organizations", labels=["status"]
        )
        try:
            counts = self._jobs_by_status()
        except Exception as exc:
            log.warning("metrics: could not count the jobs: %s", exc)
            up.add_metric(["database"], 0)
        else:
            up.add_metric(["database"], 1)
            for status in sorted({*STATUSES, *counts}):
                jobs.add_metric([status], counts.get(status, 0))
        depth = GaugeMetricFamily(
            "tunehouse_queue_depth",
            "Wake-ups waiting in each worker queue of the broker",
            labels=["queue"],
        )
        try:
            depths = queue_depths(self.settings)
        except Exception as exc:
            log.warning("metrics: could not read the broker's queues: %s", exc)
            up.add_metric(["broker"], 0)
        else:
            up.add_metric(["broker"], 1)
            for queue, messages in sorted(depths.items()):
                depth.add_metric([queue], messages)
        yield from (jobs, depth, up)


class _ProcessMetrics(Collector):
    """Every metric this process's modules registered (prometheus_client's default registry)."""

    def collect(self) -> Iterator[Metric]:
        yield from REGISTRY.collect()


def api_registry(settings: Settings, *, control: bool) -> CollectorRegistry:
    """What an API process's ``/metrics`` shows: its own metrics, and with the control routes
    the jobs and queues (one API role serves them, so they are not counted twice by
    inference replicas)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_ProcessMetrics())
    if control:
        registry.register(StateCollector(settings))
    return registry
