"""SQLite: the member table becomes a rowid table (its key a unique index beside it).

A WITHOUT ROWID table keeps each row in its key's b-tree, which suits small rows; a member's row
is about 1 kB (its record), so random keys left those pages half empty and every claim, send and
confirm moved rows around them: a rowid table is smaller per member and cheaper per change
(docs/benchmarks.md). PostgreSQL: nothing changes.

Revision ID: 0005
Revises: 0004
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

_INDEXES = {
    "ix_members_due": (
        ["audience_id", "due_rank", "due_since", "external_user_id"],
        "due_since IS NOT NULL",
    ),
    "ix_members_job": (["job_request_id"], "job_request_id IS NOT NULL"),
    "ix_members_accepted": (["audience_id", "accepted_at"], "accepted_at IS NOT NULL"),
}


def upgrade() -> None:
    _rebuild(with_rowid=True)


def downgrade() -> None:
    _rebuild(with_rowid=False)


def _rebuild(*, with_rowid: bool) -> None:
    """Copy the table into a new one of the other kind, in one transaction (the migration's)."""
    if op.get_context().dialect.name != "sqlite":
        return
    for name in _INDEXES:
        op.drop_index(name, "members")
    op.rename_table("members", "members_old")
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
        sqlite_with_rowid=with_rowid,
    )
    # in key order: the new table's pages fill up, whichever kind it is
    op.execute(
        "INSERT INTO members SELECT * FROM members_old ORDER BY audience_id, external_user_id"
    )
    op.drop_table("members_old")
    for name, (columns, where) in _INDEXES.items():
        op.create_index(name, "members", columns, sqlite_where=sa.text(where))
