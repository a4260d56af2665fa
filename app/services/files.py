"""Files: stored under server-generated names, validated before anything is kept, within the
organization's storage quota (``quota.py``). A file past its ``expires_after`` is gone for its
owner at once (404, not listed) and its row and bytes go at the janitor's next sweep
(``worker/janitor.py``), or once no job still to run uses it."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from datetime import datetime, timedelta
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.core.errors import Conflict, InvalidRequest, NotFound
from app.core.ids import new_id
from app.core.storage import Storage
from app.models import File, Job, Organization, utcnow
from app.services import quota
from app.services.datasets import DatasetError, DatasetLimits, validate_dataset
from app.services.jobs import ACTIVE
from app.services.pagination import page
from app.services.uploads import Upload

UPLOAD_PURPOSES = ("fine-tune",)
RESULTS_PURPOSE = "fine-tune-results"


def _expiry_seconds(fields: dict[str, str]) -> int | None:
    anchor = fields.get("expires_after[anchor]")
    seconds = fields.get("expires_after[seconds]")
    if anchor is None and seconds is None:
        return None
    if anchor != "created_at":
        raise InvalidRequest("expires_after[anchor] must be 'created_at'.", param="expires_after")
    try:
        value = int(seconds or "")
    except ValueError:
        raise InvalidRequest(
            "expires_after[seconds] must be an integer.", param="expires_after"
        ) from None
    if not 3600 <= value <= 30 * 24 * 3600:
        raise InvalidRequest(
            "expires_after[seconds] must be between 3600 and 2592000.", param="expires_after"
        )
    return value


def store_upload(
    session: Session,
    storage: Storage,
    org: Organization,
    upload: Upload,
    limits: DatasetLimits | None = None,
    quota_bytes: int = 0,
) -> File:
    """Validate an uploaded temporary file and keep it, or raise and keep nothing. With a
    ``quota_bytes``, the organization stays locked from the quota check until the caller
    commits (or rolls back)."""
    assert upload.path is not None
    try:
        purpose = upload.fields.get("purpose")
        if purpose is None:
            raise InvalidRequest("Missing required form field 'purpose'.", param="purpose")
        if purpose not in UPLOAD_PURPOSES:
            raise InvalidRequest(
                f"Purpose '{purpose}' is not supported; use one of {list(UPLOAD_PURPOSES)}.",
                param="purpose",
            )
        expires = _expiry_seconds(upload.fields)
        try:
            info = validate_dataset(upload.path, filename_hint=upload.filename, limits=limits)
        except DatasetError as exc:
            raise InvalidRequest(
                f"Invalid file '{upload.filename}': {exc}", param="file", code="invalid_file"
            ) from None
        if quota_bytes:  # after validating, which reads the whole file, and not locked
            quota.lock_organization(session, org.id)
            quota.check_upload(session, org, quota_bytes, upload.size)
        file_id = new_id("file")
        target = storage.file_path(file_id)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(upload.path, target)
        upload.path = None
        now = utcnow()
        file = File(
            id=file_id,
            organization_id=org.id,
            filename=upload.filename,
            purpose=purpose,
            bytes=upload.size,
            sha256=upload.sha256,
            format=info.format,
            stats=info.stats,
            status="processed",
            storage_path=storage.relative(target),
            created_at=now,
            expires_at=now + timedelta(seconds=expires) if expires else None,
        )
        session.add(file)
        session.flush()
        return file
    finally:
        upload.discard()


def store_result_file(
    session: Session, storage: Storage, organization_id: str, filename: str, content: bytes
) -> File:
    """A file the server writes itself (a job's metrics CSV)."""
    file_id = new_id("file")
    target = storage.file_path(file_id)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(content)
    file = File(
        id=file_id,
        organization_id=organization_id,
        filename=filename,
        purpose=RESULTS_PURPOSE,
        bytes=len(content),
        sha256=hashlib.sha256(content).hexdigest(),
        format="csv",
        status="processed",
        storage_path=storage.relative(target),
    )
    session.add(file)
    session.flush()
    return file


def get_file(session: Session, org: Organization, file_id: str) -> File:
    file = session.scalar(
        select(File).where(
            File.id == file_id, File.organization_id == org.id, File.unexpired(utcnow())
        )
    )
    if file is None:
        raise NotFound(f"No such File object: {file_id}", param="file_id")
    return file


def list_files(
    session: Session,
    org: Organization,
    *,
    purpose: str | None,
    limit: int,
    after: str | None,
    descending: bool,
) -> tuple[Sequence[File], bool]:
    stmt = select(File).where(File.organization_id == org.id, File.unexpired(utcnow()))
    if purpose:
        stmt = stmt.where(File.purpose == purpose)
    cursor = get_file(session, org, after) if after else None
    return page(
        session,
        stmt,
        sort=File.created_at,
        tiebreak=File.id,
        after=cursor,
        limit=limit,
        descending=descending,
    )


def file_path(storage: Storage, file: File) -> Path:
    return storage.resolve(file.storage_path)


def delete_file(session: Session, storage: Storage, org: Organization, file_id: str) -> Path:
    """Delete the row; returns the bytes' path, for the caller to remove once committed.
    A file that a job not yet finished trains or validates on stays (Conflict): the job
    reads it again when it starts and each time it resumes."""
    # FOR UPDATE (on PostgreSQL): a job being created on this file waits, or is waited for.
    file = session.scalar(
        select(File)
        .where(File.id == file_id, File.organization_id == org.id, File.unexpired(utcnow()))
        .with_for_update()
    )
    if file is None:
        raise NotFound(f"No such File object: {file_id}", param="file_id")
    user = _active_user(session, file)
    if user is not None:
        raise Conflict(
            f"File {file_id} is used by fine-tuning job {user.id} ({user.status}); cancel the "
            "job, or wait until it has finished, before deleting the file.",
            param="file_id",
            code="file_in_use",
        )
    path = file_path(storage, file)
    session.delete(file)
    session.flush()
    return path


def _active_user(session: Session, file: File) -> Job | None:
    """The oldest job not yet finished that trains or validates on ``file``."""
    return session.scalar(
        select(Job)
        .where(
            Job.organization_id == file.organization_id,
            Job.status.in_(ACTIVE),
            (Job.training_file == file.id) | (Job.validation_file == file.id),
        )
        .order_by(Job.created_at)
        .limit(1)
    )


# ---- expiry (the janitor's) --------------------------------------------------------------------


def expired_file_ids(session: Session, now: datetime, limit: int) -> list[str]:
    """Files past their expiry, oldest expiry first."""
    return list(
        session.scalars(
            select(File.id)
            .where(File.expires_at.is_not(None), File.expires_at <= now)
            .order_by(File.expires_at)
            .limit(limit)
        )
    )


def delete_expired_file(session: Session, storage: Storage, file_id: str, now: datetime) -> bool:
    """Delete an expired file's row and bytes, unless a job not yet finished still uses it
    (the job reads it again at each start; the file goes once the job has ended). The bytes
    go before the row commits: a crash in between leaves an expired row, invisible to its
    owner, that the next sweep deletes. True when deleted."""
    file = session.scalar(
        select(File)
        .where(File.id == file_id, File.expires_at.is_not(None), File.expires_at <= now)
        .with_for_update()
    )
    if file is None or _active_user(session, file) is not None:
        return False
    path = file_path(storage, file)
    session.delete(file)
    session.flush()
    path.unlink(missing_ok=True)
    return True
