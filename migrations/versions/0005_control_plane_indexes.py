"""jobs: indexes for the control plane at scale (bench/control_plane.py)

- ix_jobs_org_created_id (organization_id, created_at, id) replaces ix_jobs_org_created: a
  page after a cursor is one index range, (created_at, id) < (cursor's), not a scan from the
  newest job down to the cursor;
- ix_jobs_status_updated (status, updated_at) replaces ix_jobs_status: the reconciler reads
  the longest idle jobs of one status in order, and no further than its limit;
- ix_jobs_training_file and ix_jobs_validation_file: deleting a file looks for a job using it
  without reading all of the organization's jobs.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-30 18:00:00.000000
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.create_index(
            "ix_jobs_org_created_id", ["organization_id", "created_at", "id"], unique=False
        )
        batch_op.drop_index("ix_jobs_org_created")
        batch_op.create_index("ix_jobs_status_updated", ["status", "updated_at"], unique=False)
        batch_op.drop_index("ix_jobs_status")
        batch_op.create_index("ix_jobs_training_file", ["training_file"], unique=False)
        batch_op.create_index("ix_jobs_validation_file", ["validation_file"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_index("ix_jobs_validation_file")
        batch_op.drop_index("ix_jobs_training_file")
        batch_op.create_index("ix_jobs_status", ["status"], unique=False)
        batch_op.drop_index("ix_jobs_status_updated")
        batch_op.create_index(
            "ix_jobs_org_created", ["organization_id", "created_at"], unique=False
        )
        batch_op.drop_index("ix_jobs_org_created_id")
