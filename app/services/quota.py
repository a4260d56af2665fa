"""The storage quota: the bytes each organization may keep (``TUNEHOUSE_STORAGE_QUOTA_BYTES``;
0, the default, is no limit).

Usage is what the database records, never a walk of directories per request: the organization's
files, fine-tuned models and checkpoints, each measured when written (a checkpoint again when
it loses its training state). An upload is checked twice: by its declared size before its body
is read, and by its real size before it is stored, with the organization locked until the
file's row commits (a row lock on PostgreSQL, the write lock on SQLite), so that concurrent
uploads cannot pass the quota together. A new job is refused while the organization is at or
over its quota. A job that has started is never stopped for it: its checkpoints and model are
counted as they are written and may take the organization past its quota, which then refuses
the next upload or job until something is deleted.
"""

from __future__ import annotations

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from app.core.errors import TooLarge
from app.models import Checkpoint, File, FineTunedModel, Job, Organization
from app.services.uploads import FORM_OVERHEAD_BYTES


class QuotaExceeded(TooLarge):
    """413 ``quota_exceeded``: retrying the same request cannot help."""

    retryable = False


def usage_bytes(session: Session, organization_id: str) -> int:
    """Bytes of the organization's files, fine-tuned models and checkpoints."""
    files = select(func.coalesce(func.sum(File.bytes), 0)).where(
        File.organization_id == organization_id
    )
    models = select(func.coalesce(func.sum(FineTunedModel.bytes), 0)).where(
        FineTunedModel.organization_id == organization_id
    )
    checkpoints = (
        select(func.coalesce(func.sum(Checkpoint.bytes), 0))
        .join(Job, Job.id == Checkpoint.job_id)
        .where(Job.organization_id == organization_id)
    )
    return sum(int(session.scalar(query) or 0) for query in (files, models, checkpoints))


def lock_organization(session: Session, organization_id: str) -> None:
    """Serialise the organization's quota checks until this transaction ends. PostgreSQL: a
    row lock that still lets other transactions insert rows pointing at the organization
    (FOR NO KEY UPDATE, not FOR UPDATE, which their foreign-key checks would wait for).
    SQLite: a write that changes nothing takes the database's write lock before the usage
    is read, so the read cannot be stale when the row is written."""
    if session.get_bind().dialect.name == "postgresql":
        session.execute(
            select(Organization.id)
            .where(Organization.id == organization_id)
            .with_for_update(key_share=True)
        )
    else:
        session.execute(
            update(Organization)
            .where(Organization.id == organization_id)
            .values(name=Organization.name)
            .execution_options(synchronize_session=False)
        )


def check_upload(session: Session, org: Organization, quota: int, size: int) -> None:
    """Refuse a file of ``size`` bytes that would take the organization past ``quota``."""
    if quota:
        _refuse_past(session, org, quota, size, f"this file of {size} bytes would pass it.")


def check_declared_upload(
    session: Session, org: Organization, quota: int, content_length: str | None
) -> None:
    """Refuse, before reading it, an upload whose body cannot hold a file that fits: the
    file is at least the body less the form's other parts."""
    try:
        declared = int(content_length) if content_length else 0
    except ValueError:
        return  # the upload's own parsing answers that
    least = max(0, declared - FORM_OVERHEAD_BYTES)
    if quota and least:
        detail = f"this upload of at least {least} bytes would pass it."
        _refuse_past(session, org, quota, least, detail)


def check_new_job(session: Session, org: Organization, quota: int) -> None:
    """Refuse a new job while the organization is at or over its quota: its checkpoints and
    model would pass it."""
    if quota:
        detail = "a new job's checkpoints and model would pass it."
        _refuse_past(session, org, quota, 1, detail, param=None)


def _refuse_past(
    session: Session,
    org: Organization,
    quota: int,
    incoming: int,
    detail: str,
    param: str | None = "file",
) -> None:
    used = usage_bytes(session, org.id)
    if used + incoming > quota:
        raise QuotaExceeded(
            f"Organization '{org.name}' uses {used} of {quota} bytes of its storage quota; "
            f"{detail} Delete files or fine-tuned models to make room.",
            param=param,
            code="quota_exceeded",
        )
