"""PostgreSQL: the member table's pages keep half their space free (fillfactor 50).

A member's row (~1 kB, its record inline) gets a new version at every step of its cycle: leased,
sent, confirmed. On full pages each version went to another page, with new entries in every
index, and the dead ones stayed until autovacuum came by. With room on the page, a lease (no
indexed column changes) is a heap-only update, and every page prunes its own dead versions as it
is read. Measured with MemberTable on embedded PostgreSQL (docs/benchmarks.md): less server CPU
and a third of the WAL per member, and a smaller table, not a larger one. Only pages written
from now on keep the space (no rewrite, no long lock). SQLite: nothing changes.

Revision ID: 0008
Revises: 0007
"""

from __future__ import annotations

from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    if op.get_context().dialect.name == "postgresql":
        op.execute("ALTER TABLE members SET (fillfactor = 50)")


def downgrade() -> None:
    if op.get_context().dialect.name == "postgresql":
        op.execute("ALTER TABLE members RESET (fillfactor)")
