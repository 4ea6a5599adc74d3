"""When each erase tombstone was recorded: a tombstone is kept `members.tombstone_days` after
its erase was recorded, not only after the erase happened. An erase read long after it happened
(a lagging consumer, a topic replayed from further back) lost its tombstone as soon as its
DELETE was confirmed, and a replay of the member's older events brought it back.

Tombstones already stored count from the upgrade (when they were recorded is not known). The
column takes NULL: a tombstone an older release writes during a rolling upgrade counts from its
erase, as that release's own purge does.

Revision ID: 0010
Revises: 0009
"""

from __future__ import annotations

import time

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("tombstones", sa.Column("recorded_at", sa.Float))
    # the upgrading process's clock: at the scale of tombstone_days, the store's own
    op.execute(sa.text("UPDATE tombstones SET recorded_at = :now").bindparams(now=time.time()))


def downgrade() -> None:
    op.drop_column("tombstones", "recorded_at")
