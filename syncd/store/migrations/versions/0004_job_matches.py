"""Each job's idResolutionCount (`matched_records`, next to `received_records`), and an index on
(audience_id, terminal_at) for the recent match ratio of an audience (`syncd audiences status`).

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("jobs", sa.Column("matched_records", sa.Integer))
    op.create_index("ix_jobs_audience_terminal", "jobs", ["audience_id", "terminal_at"])


def downgrade() -> None:
    op.drop_index("ix_jobs_audience_terminal", "jobs")
    op.drop_column("jobs", "matched_records")
