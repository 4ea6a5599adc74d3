"""PostgreSQL: the member table's keys compare as bytes (COLLATE "C").

External user ids and job request ids are opaque: nothing orders them for people to read. Under a
database's linguistic collation (en_US.UTF-8, even C.UTF-8 with the libc provider) every
comparison in their b-trees (the key, the due and job indexes) went through strcoll; in "C" it is
a memcmp. Measured with MemberTable on embedded PostgreSQL (docs/benchmarks.md): ~10% less of
the server's CPU per member. The indexes on these columns are rebuilt (the table is not
rewritten); on a large table the migration holds its lock for as long. SQLite: nothing changes
(it compares bytes already).

Revision ID: 0007
Revises: 0006
"""

from __future__ import annotations

from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

_KEYS = {"members": ("external_user_id", "job_request_id"), "tombstones": ("external_user_id",)}


def upgrade() -> None:
    _collate('"C"')


def downgrade() -> None:
    _collate('"default"')


def _collate(collation: str) -> None:
    if op.get_context().dialect.name != "postgresql":
        return
    for table, columns in _KEYS.items():
        changes = ", ".join(
            f"ALTER COLUMN {column} TYPE varchar(128) COLLATE {collation}" for column in columns
        )
        op.execute(f"ALTER TABLE {table} {changes}")
