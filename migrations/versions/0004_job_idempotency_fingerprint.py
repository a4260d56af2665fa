"""jobs: idempotency_fingerprint, the request an Idempotency-Key was first used with

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-30 17:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Nullable: jobs created before this revision have no fingerprint, and any request with
    # their key still returns them.
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("idempotency_fingerprint", sa.String(64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_column("idempotency_fingerprint")
