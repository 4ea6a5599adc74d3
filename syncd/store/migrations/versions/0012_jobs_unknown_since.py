"""When Amazon began answering 404 ("unknown job") to a job's GETs, counted from the first 404
since its last status of the job: a job is given up (EXPIRED, a failed send of its members) once
those 404s have lasted an hour. Without it one 404 of a job over an hour old gave it up, though
Amazon had answered it a moment before and might still be processing it.

The column takes NULL (no 404 since the last status): what an older release writes during a
rolling upgrade. A status an older release records leaves the column as it was, so the poller
counts it only while the job's last poll failed (`jobs.error` set).

Revision ID: 0012
Revises: 0011
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("jobs", sa.Column("unknown_since", sa.Float))


def downgrade() -> None:
    op.drop_column("jobs", "unknown_since")
