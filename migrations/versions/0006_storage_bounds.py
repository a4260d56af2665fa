"""storage bounds: sizes of models and checkpoints (the storage quota), jobs.storage_state

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-30 18:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Rows from before this revision count 0 bytes until the janitor tidies their job, which
    # it does once for every ended job (their storage_state is NULL), measuring them then.
    for table in ("models", "checkpoints"):
        with op.batch_alter_table(table, schema=None) as batch_op:
            batch_op.add_column(
                sa.Column("bytes", sa.BigInteger(), server_default="0", nullable=False)
            )
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("storage_state", sa.String(16), nullable=True))
        batch_op.create_index("ix_jobs_storage_state", ["storage_state", "status"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_index("ix_jobs_storage_state")
        batch_op.drop_column("storage_state")
    for table in ("checkpoints", "models"):
        with op.batch_alter_table(table, schema=None) as batch_op:
            batch_op.drop_column("bytes")
