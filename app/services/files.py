"""Files: stored under server-generated names, validated before anything is kept."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.core.errors import Conflict, InvalidRequest, NotFound
from app.core.ids import new_id
from app.core.storage import Storage
from app.models import File, Job, Organization, utcnow
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
) -> File:
    """Validate an uploaded temporary file and keep it, or raise and keep nothing."""
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
    file = session.scalar(select(File).where(File.id == file_id, File.organization_id == org.id))
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
    stmt = select(File).where(File.organization_id == org.id)
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
        select(File).where(File.id == file_id, File.organization_id == org.id).with_for_update()
    )
    if file is None:
        raise NotFound(f"No such File object: {file_id}", param="file_id")
    user = session.scalar(
        select(Job)
        .where(
            Job.organization_id == org.id,
            Job.status.in_(ACTIVE),
            (Job.training_file == file_id) | (Job.validation_file == file_id),
        )
        .order_by(Job.created_at)
        .limit(1)
    )
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
