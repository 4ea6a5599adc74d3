"""The --as-of of each audience's last complete reconcile: a live change older than the snapshot
is superseded by it, for the members it found unchanged too (no row written for them).

Revision ID: 0009
Revises: 0008
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "reconciled",
        sa.Column("audience_id", sa.BigInteger, primary_key=True, autoincrement=False),
        sa.Column("as_of", sa.Float, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("reconciled")
