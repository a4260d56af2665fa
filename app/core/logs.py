"""Logging for every process: the API (uvicorn's loggers too), the worker and the training
process, as text or as one JSON object a line (``log_format``, python-json-logger).

The lines that concern a request or a job carry its ids: the request id and the caller's
organization (set by the API's middleware, ``app/api/errors.py`` and ``app/api/guard.py``), the
job id and its attempt (set around a job by the worker, and for its whole life by a training
process). They live in context variables, which follow a request through its task and the
threads it runs code in; a training process, whose threads all work for one job, fixes them
for the process instead (``configure_logging(..., fixed=...)``).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

from pythonjsonlogger.core import RESERVED_ATTRS
from pythonjsonlogger.json import JsonFormatter

from app.core.settings import LogFormat

REQUEST_ID: ContextVar[str | None] = ContextVar("tunehouse_request_id", default=None)
ORGANIZATION_ID: ContextVar[str | None] = ContextVar("tunehouse_organization_id", default=None)
JOB_ID: ContextVar[str | None] = ContextVar("tunehouse_job_id", default=None)
ATTEMPT: ContextVar[int | None] = ContextVar("tunehouse_attempt", default=None)

# The fields a line carries when they are known, in this order; a record's own (``extra=``)
# win over the context's.
CONTEXT: dict[str, ContextVar[Any]] = {
    "request_id": REQUEST_ID,
    "organization_id": ORGANIZATION_ID,
    "job_id": JOB_ID,
    "attempt": ATTEMPT,
}
# And a field only a training process of several sets, for all of its lines.
FIELDS = (*CONTEXT, "rank")
_OURS = "_tunehouse_handler"  # marks the handler configure_logging installed
# How a worker tells its training process the job's attempt (the job id is an argument).
ATTEMPT_ENV = "TUNEHOUSE_TRAINING_ATTEMPT"


class ContextFilter(logging.Filter):
    """Adds the known context fields to each record (never drops one)."""

    def __init__(self, fixed: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.fixed = dict(fixed or {})

    def filter(self, record: logging.LogRecord) -> bool:
        for name in FIELDS:
            var = CONTEXT.get(name)
            value = var.get() if var is not None else None
            if value is None:
                value = self.fixed.get(name)
            if value is not None and getattr(record, name, None) is None:
                setattr(record, name, value)
        return True


class TextFormatter(logging.Formatter):
    """``time level logger [request_id=... job_id=...] message``."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s%(context)s %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        known = [f"{name}={getattr(record, name)}" for name in FIELDS if hasattr(record, name)]
        record.context = f" [{' '.join(known)}]" if known else ""
        return super().format(record)


def json_formatter() -> JsonFormatter:
    return JsonFormatter(
        "%(levelname)s %(name)s %(process)d %(message)s",
        rename_fields={"levelname": "level", "name": "logger", "process": "pid"},
        timestamp=True,  # ISO 8601, in UTC
        # uvicorn's colored copy of a message, and the text formatter's field, stay out.
        reserved_attrs=[*RESERVED_ATTRS, "taskName", "color_message", "context"],
    )


def configure_logging(
    level: str, format: LogFormat, *, fixed: dict[str, Any] | None = None
) -> logging.Handler:
    """One handler on the root logger, to stderr, in ``format``; ``fixed`` context fields
    (a training process's job id and attempt) go on every line. Calling it again replaces
    the handler it installed before, and leaves any other (a test runner's) alone."""
    handler = logging.StreamHandler()
    handler.addFilter(ContextFilter(fixed))
    handler.setFormatter(json_formatter() if format == "json" else TextFormatter())
    setattr(handler, _OURS, True)
    root = logging.getLogger()
    for previous in [h for h in root.handlers if getattr(h, _OURS, False)]:
        root.removeHandler(previous)
    root.addHandler(handler)
    root.setLevel(level.upper())
    return handler


@contextmanager
def job_context(job_id: str, attempt: int | None = None) -> Iterator[None]:
    """Lines logged inside carry the job's id (and its attempt, once known: ``set_attempt``)."""
    tokens = (JOB_ID.set(job_id), ATTEMPT.set(attempt))
    try:
        yield
    finally:
        ATTEMPT.reset(tokens[1])
        JOB_ID.reset(tokens[0])


def set_attempt(attempt: int) -> None:
    ATTEMPT.set(attempt)
