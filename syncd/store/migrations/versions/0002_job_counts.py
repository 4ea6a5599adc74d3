"""Job counts kept per state (no scan of jobs to count them), and an index on terminal_at for
deleting terminal jobs past their retention.

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "job_counts",
        sa.Column("state", sa.String(32), primary_key=True),
        sa.Column("jobs", sa.BigInteger, nullable=False),
    )
    op.execute(
        "INSERT INTO job_counts (state, jobs) SELECT state, COUNT(*) FROM jobs GROUP BY state"
    )
    op.create_index("ix_jobs_terminal_at", "jobs", ["terminal_at"])


def downgrade() -> None:
    op.drop_index("ix_jobs_terminal_at", "jobs")
    op.drop_table("job_counts")
