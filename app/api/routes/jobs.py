"""/v1/fine_tuning/jobs: create, list, retrieve, cancel, pause, resume, events (and their
stream), checkpoints."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from functools import partial
from typing import Annotated, Any

from fastapi import APIRouter, BackgroundTasks, Header, Query, Request
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

from app.api.deps import OrgDep, SessionDep, SettingsDep
from app.api.metadata_filter import METADATA_PARAMETER, metadata_filter
from app.api.presenters import checkpoint_object, event_object, job_object, list_response
from app.core.db import session_scope
from app.core.queue import enqueue_job
from app.core.settings import Settings
from app.models import JobEvent
from app.schemas import (
    CheckpointObject,
    ErrorResponse,
    JobCreate,
    JobEventObject,
    JobObject,
    ListResponse,
)
from app.services import job_files, jobs

router = APIRouter(prefix="/fine_tuning/jobs", tags=["fine-tuning"])

_401 = {"model": ErrorResponse, "description": "Missing or wrong API key"}
_404 = {"model": ErrorResponse, "description": "No such job in this organization"}
Limit = Annotated[int, Query(ge=1, le=100)]
After = Annotated[str | None, Query(max_length=64)]


def validate_and_enqueue(settings: Settings, job_id: str, queue: str) -> None:
    """Runs after the create response: re-read the files, queue the job, wake a worker of its
    queue. If this process dies first, the reconciler finds the job still validating and
    finishes the work."""
    sessions = partial(session_scope, settings.sqlalchemy_url)
    if job_files.validate_job_files(settings, job_id, sessions=sessions):
        enqueue_job(settings, job_id, queue)


@router.post(
    "",
    response_model=JobObject,
    responses={
        400: {"model": ErrorResponse, "description": "Invalid request"},
        401: _401,
        404: {
            "model": ErrorResponse,
            "description": "model is a fine-tuned model or checkpoint this organization does not "
            "have (model_not_found)",
        },
        422: {
            "model": ErrorResponse,
            "description": "The Idempotency-Key was already used with a different request",
        },
    },
)
def create_job(
    body: JobCreate,
    org: OrgDep,
    session: SessionDep,
    settings: SettingsDep,
    background: BackgroundTasks,
    idempotency_key: Annotated[str | None, Header(max_length=256)] = None,
) -> JobObject:
    job, created = jobs.create_job(session, settings, org, body, idempotency_key)
    session.commit()
    if created:
        background.add_task(
            validate_and_enqueue, settings, job.id, jobs.job_queue(settings, job.queue)
        )
    return job_object(job)


@router.get(
    "",
    response_model=ListResponse[JobObject],
    responses={401: _401},
    openapi_extra={"parameters": [METADATA_PARAMETER]},
)
def list_jobs(
    request: Request,
    org: OrgDep,
    session: SessionDep,
    limit: Limit = 20,
    after: After = None,
) -> ListResponse[JobObject]:
    metadata, null_metadata = metadata_filter(request)
    rows, more = jobs.list_jobs(
        session, org, limit=limit, after=after, metadata=metadata, null_metadata=null_metadata
    )
    data = [job_object(j) for j in rows]
    return list_response(data, more)


@router.get("/{job_id}", response_model=JobObject, responses={401: _401, 404: _404})
def retrieve_job(job_id: str, org: OrgDep, session: SessionDep) -> JobObject:
    return job_object(jobs.get_job(session, org, job_id))


@router.post(
    "/{job_id}/cancel",
    response_model=JobObject,
    responses={
        401: _401,
        404: _404,
        409: {"model": ErrorResponse, "description": "The job has already finished"},
    },
)
def cancel_job(job_id: str, org: OrgDep, session: SessionDep) -> JobObject:
    job = jobs.cancel_job(session, org, job_id)
    session.commit()
    return job_object(job)


@router.post(
    "/{job_id}/pause",
    response_model=JobObject,
    responses={
        401: _401,
        404: _404,
        409: {"model": ErrorResponse, "description": "The job is not queued or running"},
    },
)
def pause_job(job_id: str, org: OrgDep, session: SessionDep) -> JobObject:
    """Pause a queued or running job: a running job saves a checkpoint and frees its worker."""
    job = jobs.pause_job(session, org, job_id)
    session.commit()
    return job_object(job)


@router.post(
    "/{job_id}/resume",
    response_model=JobObject,
    responses={
        401: _401,
        404: _404,
        409: {"model": ErrorResponse, "description": "The job is not paused"},
    },
)
def resume_job(
    job_id: str,
    org: OrgDep,
    session: SessionDep,
    settings: SettingsDep,
    background_tasks: BackgroundTasks,
) -> JobObject:
    """Queue a paused job again; it goes on from the checkpoint its pause saved."""
    job = jobs.resume_job(session, org, job_id)
    session.commit()
    if job.status == jobs.QUEUED:
        # After the answer: a broker that is away delays nobody; the reconciler re-sends it.
        background_tasks.add_task(
            enqueue_job, settings, job.id, jobs.job_queue(settings, job.queue)
        )
    return job_object(job)


@router.get(
    "/{job_id}/events",
    response_model=ListResponse[JobEventObject],
    responses={
        401: _401,
        404: _404,
        200: {"content": {"text/event-stream": {}}, "description": "Events (or their stream)"},
    },
)
def list_events(
    job_id: str,
    org: OrgDep,
    session: SessionDep,
    settings: SettingsDep,
    limit: Limit = 20,
    after: After = None,
    stream: bool = False,
) -> Any:
    if stream:
        job = jobs.get_job(session, org, job_id)
        # The request's session closes as this returns (deps.get_session), before the stream
        # starts: the stream holds no connection, and each of its polls takes one briefly.
        return StreamingResponse(_follow_events(settings, job.id), media_type="text/event-stream")
    rows, more = jobs.list_events(session, org, job_id, limit=limit, after=after)
    data = [event_object(e) for e in rows]
    return list_response(data, more)


def _events_after(
    settings: Settings, job_id: str, last_seq: int
) -> tuple[list[JobEvent], str | None]:
    with session_scope(settings.sqlalchemy_url) as session:
        return jobs.events_after(session, job_id, last_seq)


async def _follow_events(settings: Settings, job_id: str) -> AsyncIterator[str]:
    """Every event of the job in order, then new ones as they come, until the job ends."""
    last_seq, idle = 0, 0.0
    while True:
        events, status = await run_in_threadpool(_events_after, settings, job_id, last_seq)
        for event in events:
            last_seq = event.seq
            yield f"data: {event_object(event).model_dump_json()}\n\n"
        if not events and (status is None or status in jobs.TERMINAL):
            yield "data: [DONE]\n\n"
            return
        idle = 0.0 if events else idle + 0.5
        if idle >= 15:
            yield ": keep-alive\n\n"
            idle = 0.0
        await asyncio.sleep(0.5)


@router.get(
    "/{job_id}/checkpoints",
    response_model=ListResponse[CheckpointObject],
    responses={401: _401, 404: _404},
)
def list_checkpoints(
    job_id: str,
    org: OrgDep,
    session: SessionDep,
    limit: Limit = 10,
    after: After = None,
) -> ListResponse[CheckpointObject]:
    job, rows, more = jobs.list_checkpoints(session, org, job_id, limit=limit, after=after)
    name = job.fine_tuned_model or jobs.fine_tuned_model_name(job, org)
    data = [checkpoint_object(c, name) for c in rows]
    return list_response(data, more)
