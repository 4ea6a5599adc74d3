"""Connections a sender found blocked by a setup fault (401/403/404 or a start-up check), with
the cause and since when: `syncd members show` says why a member waits.

Revision ID: 0006
Revises: 0005
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "connection_blocks",
        sa.Column("connection_id", sa.String(128), primary_key=True),
        sa.Column("cause", sa.String(32), nullable=False),
        sa.Column("since", sa.Float, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("connection_blocks")
