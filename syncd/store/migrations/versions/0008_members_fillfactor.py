"""PostgreSQL: the member table's pages keep half their space free (fillfactor 50).

A member's row (~1 kB, its record inline) gets a new version at every step of its cycle: leased,
sent, confirmed. On full pages each version went to another page, with new entries in every
index, and the dead ones stayed until autovacuum came by. With room on the page, a lease (no
indexed column changes) is a heap-only update, and every page prunes its own dead versions as it
is read. Measured with MemberTable on embedded PostgreSQL (docs/benchmarks.md): less server CPU
and a third of the WAL per member, and a smaller table as it is worked (compacted, it takes
twice the room). Only pages written from now on keep the space: no rewrite, though the catalog
change waits for a running anti-wraparound autovacuum of the table. A member table an operator
partitioned (by audience, docs/operations.md) holds no pages itself and takes no storage
parameter: each of its partitions gets it. SQLite: nothing changes.

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
    _alter("SET (fillfactor = 50)")


def downgrade() -> None:
    _alter("RESET (fillfactor)")


def _alter(change: str) -> None:
    """`change` on the member table, or on each of its leaf partitions if it is partitioned."""
    if op.get_context().dialect.name != "postgresql":
        return
    conn = op.get_bind()
    tables = conn.exec_driver_sql(
        "SELECT 'members' WHERE 'members'::regclass NOT IN (SELECT partrelid FROM"
        " pg_partitioned_table) UNION ALL SELECT relid::regclass::text"
        " FROM pg_partition_tree('members') WHERE isleaf"
    )
    for table in tables.scalars().all():  # names as PostgreSQL quotes them
        conn.exec_driver_sql(f"ALTER TABLE {table} {change}")
