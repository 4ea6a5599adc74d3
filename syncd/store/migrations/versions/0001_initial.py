"""Initial schema: jobs and budget reservations.

Revision ID: 0001
Revises:
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "jobs",
        sa.Column("job_request_id", sa.String(128), primary_key=True),
        sa.Column("connection_id", sa.String(128), nullable=False),
        sa.Column("audience_id", sa.BigInteger, nullable=False),
        sa.Column("audience", sa.String(256), nullable=False),
        sa.Column("records", sa.Integer, nullable=False),
        sa.Column("adds", sa.Integer, nullable=False),
        sa.Column("removes", sa.Integer, nullable=False),
        sa.Column("state", sa.String(32), nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("next_poll_at", sa.Float, nullable=False),
        sa.Column("polls", sa.Integer, nullable=False),
        sa.Column("last_polled_at", sa.Float),
        sa.Column("terminal_at", sa.Float),
        sa.Column("processed_rate", sa.Float),
        sa.Column("invalid_records", sa.Integer, nullable=False),
        sa.Column("invalid_reasons", sa.JSON, nullable=False),
        sa.Column("audience_size", sa.BigInteger),
        sa.Column("received_records", sa.Integer),
        sa.Column("error", sa.Text),
        sa.Column("owner", sa.String(256)),
        sa.Column("claimed_until", sa.Float),
    )
    op.create_index("ix_jobs_due", "jobs", ["state", "next_poll_at"])
    op.create_index("ix_jobs_created_at", "jobs", ["created_at"])
    op.create_table(
        "budget_reservations",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer, "sqlite"),
            primary_key=True,
            autoincrement=True,
        ),
        sa.Column("connection_id", sa.String(128), nullable=False),
        sa.Column("records", sa.Integer, nullable=False),
        sa.Column("stamped_at", sa.Float, nullable=False),
        sa.Column("confirmed", sa.Boolean, nullable=False),
    )
    op.create_index(
        "ix_budget_connection_stamped", "budget_reservations", ["connection_id", "stamped_at"]
    )


def downgrade() -> None:
    op.drop_table("budget_reservations")
    op.drop_table("jobs")
