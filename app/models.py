"""SQLAlchemy 2.0 ORM. The schema changes only through an Alembic migration.

Every row belongs to an organization and every query filters by it (design rule 5).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
    false,
    or_,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.sql.elements import ColumnElement


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC on every backend (SQLite forgets the zone)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is not None and value.tzinfo is None:
            raise ValueError("naive datetime")
        return value.astimezone(UTC) if value is not None else None

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is not None and value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value


class Base(DeclarativeBase):
    type_annotation_map = {datetime: UTCDateTime, dict[str, Any]: JSON, list[Any]: JSON}


class Organization(Base):
    __tablename__ = "organizations"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class ApiKey(Base):
    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    organization_id: Mapped[str] = mapped_column(
        ForeignKey("organizations.id", ondelete="CASCADE"), index=True
    )
    # The first characters of the key, shown in listings to tell keys apart.
    prefix: Mapped[str] = mapped_column(String(16))
    # sha256 of the whole key; the key itself is never stored.
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    name: Mapped[str | None] = mapped_column(String(128))
    # An admin key may also create, list and revoke its organization's keys.
    admin: Mapped[bool] = mapped_column(default=False, server_default=false())
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_used_at: Mapped[datetime | None]
    revoked_at: Mapped[datetime | None]


class File(Base):
    __tablename__ = "files"
    __table_args__ = (Index("ix_files_org_created", "organization_id", "created_at"),)

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    organization_id: Mapped[str] = mapped_column(ForeignKey("organizations.id", ondelete="CASCADE"))
    # The client's name for the file: metadata only, never part of a path.
    filename: Mapped[str] = mapped_column(String(512))
    purpose: Mapped[str] = mapped_column(String(32))
    bytes: Mapped[int] = mapped_column(Integer)
    sha256: Mapped[str] = mapped_column(String(64))
    format: Mapped[str | None] = mapped_column(String(32))
    stats: Mapped[dict[str, Any] | None]
    status: Mapped[str] = mapped_column(String(16), default="processed")
    status_details: Mapped[str | None] = mapped_column(Text)
    storage_path: Mapped[str] = mapped_column(String(256))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    expires_at: Mapped[datetime | None]

    @classmethod
    def unexpired(cls, now: datetime) -> ColumnElement[bool]:
        """Files not past their ``expires_after``: an expired file is gone for its owner at
        once (404), and its row and bytes go at the janitor's next sweep."""
        return or_(cls.expires_at.is_(None), cls.expires_at > now)


class Job(Base):
    __tablename__ = "jobs"
    __table_args__ = (
        # An organization's jobs, newest first, paged by (created_at, id) (pagination.page).
        Index("ix_jobs_org_created_id", "organization_id", "created_at", "id"),
        # The reconciler's jobs of one status, longest idle first (leases.stale_job_ids).
        Index("ix_jobs_status_updated", "status", "updated_at"),
        # Which jobs use a file (files.delete_file refuses to delete one in use).
        Index("ix_jobs_training_file", "training_file"),
        Index("ix_jobs_validation_file", "validation_file"),
        UniqueConstraint("organization_id", "idempotency_key", name="uq_jobs_idempotency"),
        # The janitor's question: which ended jobs still have files to tidy.
        Index("ix_jobs_storage_state", "storage_state", "status"),
    )

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    organization_id: Mapped[str] = mapped_column(ForeignKey("organizations.id", ondelete="CASCADE"))
    model: Mapped[str] = mapped_column(String(256))
    task: Mapped[str] = mapped_column(String(32))
    # File ids are kept as given: a file deleted after training leaves the job intact.
    training_file: Mapped[str] = mapped_column(String(64))
    validation_file: Mapped[str | None] = mapped_column(String(64))
    status: Mapped[str] = mapped_column(String(32))
    hyperparameters: Mapped[dict[str, Any]]
    method: Mapped[dict[str, Any]]
    suffix: Mapped[str | None] = mapped_column(String(64))
    seed: Mapped[int] = mapped_column(Integer)
    metadata_: Mapped[dict[str, Any] | None] = mapped_column("metadata", JSON)
    integrations: Mapped[list[Any]] = mapped_column(JSON, default=list)
    error: Mapped[dict[str, Any] | None]
    fine_tuned_model: Mapped[str | None] = mapped_column(String(320))
    result_files: Mapped[list[Any]] = mapped_column(JSON, default=list)
    trained_tokens: Mapped[int | None] = mapped_column(Integer)
    steps_completed: Mapped[int] = mapped_column(Integer, default=0)
    total_steps: Mapped[int | None] = mapped_column(Integer)
    estimated_finish: Mapped[datetime | None]
    idempotency_key: Mapped[str | None] = mapped_column(String(256))
    # sha256 of the create request the key came with: the key is refused with another request.
    idempotency_fingerprint: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]
    # Lease: the worker that owns a running job renews lease_expires_at with heartbeats.
    attempt: Mapped[int] = mapped_column(Integer, default=0)  # starts, pauses' resumes included
    # Starts that ended in a crash (the process died, or its lease ran out); max_attempts caps it.
    crash_count: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    lease_owner: Mapped[str | None] = mapped_column(String(128))
    lease_expires_at: Mapped[datetime | None]
    # What is left of the job's directory once it has ended (worker/janitor.py): None (not
    # tidied yet, or still active), "tidied" (succeeded: the weights of its kept checkpoints)
    # or "removed" (nothing).
    storage_state: Mapped[str | None] = mapped_column(String(16))
    # The job's `resources` as the request gave them ({"device", "processes"}; None: none).
    resources: Mapped[dict[str, Any] | None]
    # The worker queue its wake-ups go to, chosen at creation (None: jobs from before queues,
    # which go to the default queue).
    queue: Mapped[str | None] = mapped_column(String(64))
    # What its training last ran on, as the trainer described it ("2 × cpu (gloo)").
    device: Mapped[str | None] = mapped_column(String(128))
    # The fine-tuned model a job continues from (app/services/lineage.py): {"parent_model",
    # "checkpoint_step", "base_model" (the root base), "parent_adapter"}; None: a base model.
    lineage: Mapped[dict[str, Any] | None]


class JobEvent(Base):
    __tablename__ = "job_events"
    __table_args__ = (Index("ix_job_events_job_seq", "job_id", "seq"),)

    # seq orders events exactly, even when two land in the same microsecond.
    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(64), unique=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    level: Mapped[str] = mapped_column(String(8), default="info")
    type: Mapped[str] = mapped_column(String(16), default="message")
    message: Mapped[str] = mapped_column(Text)
    data: Mapped[dict[str, Any] | None]


class Checkpoint(Base):
    __tablename__ = "checkpoints"
    __table_args__ = (UniqueConstraint("job_id", "step_number", name="uq_checkpoints_job_step"),)

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    step_number: Mapped[int] = mapped_column(Integer)
    metrics: Mapped[dict[str, Any]]
    storage_path: Mapped[str] = mapped_column(String(256))
    # Bytes of the directory (the storage quota counts them): weights and optimizer state while
    # it may be resumed from, the weights alone after.
    bytes: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class FineTunedModel(Base):
    __tablename__ = "models"
    __table_args__ = (Index("ix_models_org_created", "organization_id", "created_at"),)

    id: Mapped[str] = mapped_column(String(320), primary_key=True)
    organization_id: Mapped[str] = mapped_column(ForeignKey("organizations.id", ondelete="CASCADE"))
    task: Mapped[str] = mapped_column(String(32))
    base_model: Mapped[str] = mapped_column(String(256))
    job_id: Mapped[str] = mapped_column(String(64), index=True)
    storage_path: Mapped[str] = mapped_column(String(256))
    labels: Mapped[list[Any] | None] = mapped_column(JSON)
    # Bytes of the model's directory, measured once its job is tidied (the quota counts them).
    bytes: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
