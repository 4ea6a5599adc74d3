"""The store's tables. Times are unix epoch seconds (double precision) from the store's clock.

Changing a table here needs a new Alembic revision in `migrations/versions/`.
"""

from __future__ import annotations

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    Float,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    PrimaryKeyConstraint,
    SmallInteger,
    String,
    Table,
    Text,
    text,
)
from sqlalchemy.engine import Dialect

metadata = MetaData()


def _serial_id() -> Column[int]:
    """An `id` the database numbers (SQLite: the rowid itself)."""
    return Column(
        "id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True
    )


jobs = Table(
    "jobs",
    metadata,
    Column("job_request_id", String(128), primary_key=True),
    Column("connection_id", String(128), nullable=False),
    Column("audience_id", BigInteger, nullable=False),
    Column("audience", String(256), nullable=False),
    Column("records", Integer, nullable=False),
    Column("adds", Integer, nullable=False),
    Column("removes", Integer, nullable=False),
    Column("state", String(32), nullable=False),
    Column("created_at", Float, nullable=False),
    Column("next_poll_at", Float, nullable=False),
    Column("polls", Integer, nullable=False, default=0),
    Column("last_polled_at", Float),
    Column("terminal_at", Float),
    Column("processed_rate", Float),
    Column("invalid_records", Integer, nullable=False, default=0),
    # {reason class (syncd.store.reasons): count}; never Amazon's text, never external ids
    Column("invalid_reasons", JSON, nullable=False),
    Column("audience_size", BigInteger),
    Column("received_records", Integer),
    Column("matched_records", Integer),  # Amazon's idResolutionCount of the job
    Column("error", Text),  # short summary of the last failed poll
    # the first of the 404s ("unknown job") Amazon answered since its last status of the job
    # (migration 0012; NULL: none since): an hour of them gives the job up (syncd.jobs)
    Column("unknown_since", Float),
    Column("owner", String(256)),  # the poller that holds the claim
    Column("claimed_until", Float),
    Index("ix_jobs_due", "state", "next_poll_at"),
    Index("ix_jobs_created_at", "created_at"),
    Index("ix_jobs_terminal_at", "terminal_at"),  # finds terminal jobs past their retention
    Index("ix_jobs_audience_terminal", "audience_id", "terminal_at"),  # recent matches per audience
)

# Jobs per state, kept by the same transactions that add, end and delete jobs: the counts are
# read every few seconds and must not scan the jobs table.
job_counts = Table(
    "job_counts",
    metadata,
    Column("state", String(32), primary_key=True),
    Column("jobs", BigInteger, nullable=False),
)

budget_reservations = Table(
    "budget_reservations",
    metadata,
    _serial_id(),
    Column("connection_id", String(128), nullable=False),
    Column("records", Integer, nullable=False),
    Column("stamped_at", Float, nullable=False),
    Column("confirmed", Boolean, nullable=False, default=False),
    Index("ix_budget_connection_stamped", "connection_id", "stamped_at"),
)


class Bytes(LargeBinary):
    """A BLOB bound as the `bytes` it is: both drivers take bytes as they are, and the generic
    type's wrapping of every value in the driver's Binary was a tenth of ingest's CPU."""

    cache_ok = True

    def bind_processor(self, dialect: Dialect) -> None:
        return None


# -- the member table (syncd/members.py): one row per audience member ----------------------------
# Opaque keys compare as bytes on PostgreSQL too (migration 0007): not through a linguistic
# collation's strcoll in every b-tree step. SQLite compares bytes already.
_KEY = String(128).with_variant(String(128, collation="C"), "postgresql")
_DUE = text("due_since IS NOT NULL")
_PENDING_JOB = text("job_request_id IS NOT NULL")
_ACCEPTED = text("accepted_at IS NOT NULL")

members = Table(
    "members",
    metadata,
    Column("audience_id", BigInteger, nullable=False),
    Column("external_user_id", _KEY, nullable=False),
    # desired: what Amazon should hold, from the newest change (occurred_at, then position)
    Column("action", String(6), nullable=False),  # add | remove
    Column("record", Bytes, nullable=False),  # the API's record object, JSON bytes
    Column("digest", Bytes, nullable=False),  # SHA-256 of the canonical record (32 bytes)
    Column("occurred_at", Float, nullable=False),
    Column("position", BigInteger, nullable=False),  # tie-break: the later wins
    Column("due_rank", SmallInteger, nullable=False),  # 0 live, 1 TTL refresh, 2 reconcile
    Column("due_since", Float),  # set: desired differs from sent (or must be re-sent)
    # sent: what the last POST carried and what became of it
    Column("sent_action", String(6)),
    Column("sent_digest", Bytes),
    Column("sent_at", Float),  # the 202 of the last POST
    Column("job_request_id", _KEY),  # set while that POST's job is not terminal
    Column("accepted_at", Float),  # the 202 of the last confirmed CREATE: the TTL clock
    Column("outcome", String(16)),  # confirmed | invalid | failed | expired
    Column("reason", String(64)),  # bounded reason class of an invalid/failed outcome
    Column("attempts", SmallInteger, nullable=False),  # failed sends of the current change
    # lease of a sender that claimed the row; writes are fenced on claim_token
    Column("claimed_by", String(256)),
    Column("claim_token", String(32)),
    Column("claimed_until", Float),
    PrimaryKeyConstraint("audience_id", "external_user_id"),
    Index(
        "ix_members_due",
        "audience_id",
        "due_rank",
        "due_since",
        "external_user_id",
        sqlite_where=_DUE,
        postgresql_where=_DUE,
    ),
    Index(
        "ix_members_job",
        "job_request_id",
        sqlite_where=_PENDING_JOB,
        postgresql_where=_PENDING_JOB,
    ),
    Index(
        "ix_members_accepted",
        "audience_id",
        "accepted_at",
        sqlite_where=_ACCEPTED,
        postgresql_where=_ACCEPTED,
    ),
    # a rowid table (migration 0005): rows of ~1 kB do not belong in their key's b-tree
    # PostgreSQL (migration 0008): half of each page free, for the versions of its rows
    postgresql_with={"fillfactor": 50},
)

tombstones = Table(
    "tombstones",
    metadata,
    Column("audience_id", BigInteger, nullable=False),
    Column("external_user_id", _KEY, nullable=False),
    Column("erased_at", Float, nullable=False),  # occurred_at of the erase event
    # when that erase was recorded (migration 0010; NULL: by an older release): kept from then
    Column("recorded_at", Float),
    PrimaryKeyConstraint("audience_id", "external_user_id"),
    Index("ix_tombstones_erased_at", "erased_at"),
    sqlite_with_rowid=False,
)

# -- member dead letters on their way to the dead-letter topic (migration 0011): written in the
# transaction that applies a job's outcome, deleted once the broker acknowledged them (jobs.py),
# so neither a crash before the send nor a write retried after a lost COMMIT reply loses one ---
member_dead_letters = Table(
    "member_dead_letters",
    metadata,
    _serial_id(),
    Column("audience_id", BigInteger, nullable=False),
    Column("external_user_id", _KEY, nullable=False),
    Column("action", String(6), nullable=False),  # the refused send's: add | remove
    Column("record", Bytes),  # that send's hashed record (NULL: the member changed since)
    Column("reason", String(64), nullable=False),  # reason class (syncd-reason header)
    Column("detail", Text, nullable=False),  # Amazon's message (syncd-detail header)
    Column("leased_until", Float),  # a poller is sending it (taken again once this passes)
    Index("ix_member_dead_letters_member", "audience_id", "external_user_id"),  # erasure
    sqlite_autoincrement=True,  # an id is never reused: a late sender deletes only its own
)

# -- the --as-of of each audience's last complete reconcile (migration 0009): what the snapshot
# said holds at that time, so a live change older than it is superseded (members.py) -----------
reconciled = Table(
    "reconciled",
    metadata,
    Column("audience_id", BigInteger, primary_key=True, autoincrement=False),
    Column("as_of", Float, nullable=False),
)

# -- connections a sender found blocked by a setup fault (deliver.py), for `members show` ---------
connection_blocks = Table(
    "connection_blocks",
    metadata,
    Column("connection_id", String(128), primary_key=True),
    Column("cause", String(32), nullable=False),  # syncd_connection_blocked's cause label
    Column("since", Float, nullable=False),  # when it was first found blocked for this cause
)
