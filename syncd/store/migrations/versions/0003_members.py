"""The member table (desired and sent state per audience member) and erase tombstones.

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

_DUE = sa.text("due_since IS NOT NULL")
_PENDING_JOB = sa.text("job_request_id IS NOT NULL")
_ACCEPTED = sa.text("accepted_at IS NOT NULL")


def upgrade() -> None:
    op.create_table(
        "members",
        sa.Column("audience_id", sa.BigInteger, nullable=False),
        sa.Column("external_user_id", sa.String(128), nullable=False),
        sa.Column("action", sa.String(6), nullable=False),
        sa.Column("record", sa.LargeBinary, nullable=False),
        sa.Column("digest", sa.LargeBinary, nullable=False),
        sa.Column("occurred_at", sa.Float, nullable=False),
        sa.Column("position", sa.BigInteger, nullable=False),
        sa.Column("due_rank", sa.SmallInteger, nullable=False),
        sa.Column("due_since", sa.Float),
        sa.Column("sent_action", sa.String(6)),
        sa.Column("sent_digest", sa.LargeBinary),
        sa.Column("sent_at", sa.Float),
        sa.Column("job_request_id", sa.String(128)),
        sa.Column("accepted_at", sa.Float),
        sa.Column("outcome", sa.String(16)),
        sa.Column("reason", sa.String(64)),
        sa.Column("attempts", sa.SmallInteger, nullable=False),
        sa.Column("claimed_by", sa.String(256)),
        sa.Column("claim_token", sa.String(32)),
        sa.Column("claimed_until", sa.Float),
        sa.PrimaryKeyConstraint("audience_id", "external_user_id"),
        sqlite_with_rowid=False,
    )
    op.create_index(
        "ix_members_due",
        "members",
        ["audience_id", "due_rank", "due_since", "external_user_id"],
        sqlite_where=_DUE,
        postgresql_where=_DUE,
    )
    op.create_index(
        "ix_members_job",
        "members",
        ["job_request_id"],
        sqlite_where=_PENDING_JOB,
        postgresql_where=_PENDING_JOB,
    )
    op.create_index(
        "ix_members_accepted",
        "members",
        ["audience_id", "accepted_at"],
        sqlite_where=_ACCEPTED,
        postgresql_where=_ACCEPTED,
    )
    op.create_table(
        "tombstones",
        sa.Column("audience_id", sa.BigInteger, nullable=False),
        sa.Column("external_user_id", sa.String(128), nullable=False),
        sa.Column("erased_at", sa.Float, nullable=False),
        sa.PrimaryKeyConstraint("audience_id", "external_user_id"),
        sqlite_with_rowid=False,
    )
    op.create_index("ix_tombstones_erased_at", "tombstones", ["erased_at"])


def downgrade() -> None:
    op.drop_table("tombstones")
    op.drop_table("members")
