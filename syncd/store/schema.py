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
    MetaData,
    String,
    Table,
    Text,
)

metadata = MetaData()

PENDING = "PENDING"  # the only non-terminal job state
EXPIRED = "EXPIRED"  # terminal: syncd gave up polling after poll.max_job_age_s

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
    Column("error", Text),  # short summary of the last failed poll
    Column("owner", String(256)),  # the poller that holds the claim
    Column("claimed_until", Float),
    Index("ix_jobs_due", "state", "next_poll_at"),
    Index("ix_jobs_created_at", "created_at"),
    Index("ix_jobs_terminal_at", "terminal_at"),  # finds terminal jobs past their retention
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
    Column(
        "id",
        BigInteger().with_variant(Integer, "sqlite"),
        primary_key=True,
        autoincrement=True,
    ),
    Column("connection_id", String(128), nullable=False),
    Column("records", Integer, nullable=False),
    Column("stamped_at", Float, nullable=False),
    Column("confirmed", Boolean, nullable=False, default=False),
    Index("ix_budget_connection_stamped", "connection_id", "stamped_at"),
)
