"""jobs: resources (device queue and processes), the queue its wake-ups go to, and the device
it trained on

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-02 10:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Jobs from before this revision keep NULLs: no resources, the default queue, and no
    # device recorded.
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("resources", sa.JSON(), nullable=True))
        batch_op.add_column(sa.Column("queue", sa.String(64), nullable=True))
        batch_op.add_column(sa.Column("device", sa.String(128), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_column("device")
        batch_op.drop_column("queue")
        batch_op.drop_column("resources")
