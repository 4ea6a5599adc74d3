"""Member dead letters on their way to the dead-letter topic: a job's refused members are
written in the same transaction as its outcome and deleted once the broker acknowledged them.
They were sent from memory after the terminal state was stored, so a crash (or a stop during a
broker outage) before the send lost them, and so did an outcome written again after a COMMIT
whose reply was lost (the second write finds the members settled).

Revision ID: 0011
Revises: 0010
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None

_ID = sa.BigInteger().with_variant(sa.Integer, "sqlite")
_KEY = sa.String(128).with_variant(sa.String(128, collation="C"), "postgresql")
_BYTES = sa.LargeBinary()


def upgrade() -> None:
    op.create_table(
        "member_dead_letters",
        sa.Column("id", _ID, primary_key=True, autoincrement=True),
        sa.Column("audience_id", sa.BigInteger, nullable=False),
        sa.Column("external_user_id", _KEY, nullable=False),
        sa.Column("action", sa.String(6), nullable=False),
        sa.Column("record", _BYTES),
        sa.Column("reason", sa.String(64), nullable=False),
        sa.Column("detail", sa.Text, nullable=False),
        sa.Column("leased_until", sa.Float),
        sqlite_autoincrement=True,
    )
    op.create_index(
        "ix_member_dead_letters_member",
        "member_dead_letters",
        ["audience_id", "external_user_id"],
    )


def downgrade() -> None:
    op.drop_index("ix_member_dead_letters_member", table_name="member_dead_letters")
    op.drop_table("member_dead_letters")
