"""The multipart body of an upload route (files, models), received the same way for each."""

from __future__ import annotations

from fastapi import Request
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from app.core.settings import Settings
from app.core.storage import Storage
from app.models import Organization
from app.services import quota
from app.services.uploads import Upload, receive_upload


async def receive_request_upload(
    request: Request, org: Organization, session: Session, settings: Settings, storage: Storage
) -> Upload:
    """The body, streamed to a temporary file under the size limit. When the organization has a
    storage quota, a body whose declared size cannot fit is refused unread. The key was checked
    before the body (app/api/guard.py), and no database connection is held while it arrives."""
    length = request.headers.get("content-length")
    limit = settings.storage_quota_bytes
    if limit:
        await run_in_threadpool(quota.check_declared_upload, session, org, limit, length)
        await run_in_threadpool(session.rollback)  # the connection goes back to the pool
    return await receive_upload(
        request.headers.get("content-type"),
        request.stream(),
        tmp_dir=storage.tmp_dir,
        max_bytes=settings.max_upload_bytes,
        content_length=length,
    )
