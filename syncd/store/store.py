"""The SQL store: tracked jobs and per-connection budget reservations, shared by every replica.

SQLite (`sqlite+aiosqlite`, one replica) and PostgreSQL (`postgresql+asyncpg`, many replicas)
run the same statements. Atomicity:

- SQLite: every write is one `BEGIN IMMEDIATE` transaction (the database-wide write lock), run
  whole in the store's writer thread (`run_write`); WAL journal, `busy_timeout` so that other
  processes wait instead of failing.
- PostgreSQL: jobs are claimed with `UPDATE .. WHERE id IN (SELECT .. FOR UPDATE SKIP LOCKED)`;
  budget reservations of one connection are serialized by `pg_advisory_xact_lock`. Every
  transaction runs at READ COMMITTED, whatever the database's `default_transaction_isolation`:
  the algorithms need each statement to see what committed before it (a repeatable-read
  snapshot taken before the advisory lock is granted misses the reservations of the transaction
  that held it), and READ COMMITTED never fails a transaction for serialization.

Times are unix epoch seconds from one clock: PostgreSQL's `clock_timestamp()`, so replicas with
skewed clocks agree; the process clock for SQLite (one host). Tests may inject a clock.

Job counts per state live in `job_counts`, changed by the transaction that adds, ends or deletes
jobs, so that counting never scans `jobs`. A poll result other than a terminal state is stored
only by the claim that polled it (owner and lease unchanged): a poller whose lease ran out and
whose job another poller claimed cannot overwrite the newer claim. A terminal state is stored
by whoever learns it first.

Budget rows: a reservation is stamped when it is made and re-stamped when its POST was
accepted (`confirm`). A confirmed row counts for `window_s` after its stamp. An unconfirmed row
(its POST is in flight, or its outcome is unknown) counts for a window plus `hold_s`, the
longest its POST may stay in flight (at least a window), so that a slow POST can never fall out
of the window before Amazon received it. Rows past that are pruned by the next reservation of
the same connection.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from importlib import resources
from typing import TYPE_CHECKING, Any, Final, TypeVar

from sqlalchemy import (
    ColumnElement,
    Engine,
    case,
    create_engine,
    delete,
    event,
    func,
    insert,
    inspect,
    select,
    text,
    update,
)
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import URL, Connection
from sqlalchemy.exc import DBAPIError, SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine
from sqlalchemy.pool import ConnectionPoolEntry, NullPool
from sqlalchemy.util import await_only

from syncd.amazon.api import JobStatus
from syncd.config import mask_urls
from syncd.errors import SchemaOutdatedError, StoreUnavailable
from syncd.store.persist import conflict, transient
from syncd.store.reasons import invalid_reason_counts
from syncd.store.schema import budget_reservations, connection_blocks, job_counts, jobs
from syncd.vocabulary import JobState

if TYPE_CHECKING:
    from alembic.config import Config as AlembicConfig

T = TypeVar("T")
# The migration this code needs (the newest in migrations/versions; a unit test holds them equal).
SCHEMA_REVISION: Final = "0012"
_VERSION_TABLE = "alembic_version"
_PG_ISOLATION = "READ COMMITTED"  # pinned: see the module docstring
_MIGRATION_LOCK = 0x73796E6364  # pg_advisory_xact_lock key: "syncd" in hex
# how long an SQLite statement waits for another process's write lock: a command's writes are
# not retried; the daemon's are (`persist`), so it waits less and is never held long by a lock
SQLITE_BUSY_TIMEOUT_S = 30.0
# how long a PostgreSQL statement may go unanswered (asyncpg's command_timeout): a connection
# whose server went silent without a reset (a failover) fails instead of hanging for ever
STATEMENT_TIMEOUT_S = 60.0
_PG_CONNECTION_LOCK = text("SELECT pg_advisory_xact_lock(hashtext(:c))")
_PG_NOW = text("SELECT CAST(extract(epoch FROM clock_timestamp()) AS double precision)")
_PING_TIMEOUT_S = 5.0
_IDS_PER_QUERY = 500
_PURGE_BATCH = 1000  # terminal jobs deleted per purge_jobs call: short transactions
_MAX_ERROR_CHARS = 500


@dataclass(frozen=True)
class NewJob:
    """A job Amazon accepted (202), to be tracked until it is terminal."""

    job_request_id: str
    connection_id: str
    audience_id: int
    audience: str
    records: int
    adds: int
    removes: int


@dataclass(frozen=True)
class JobRow(NewJob):
    """One row of the jobs table: the job as stored, plus what polling learned. Times are
    epoch seconds; None = not yet."""

    state: str  # PENDING, then Amazon's terminal state, or EXPIRED
    created_at: float
    next_poll_at: float
    polls: int
    last_polled_at: float | None
    terminal_at: float | None
    processed_rate: float | None
    invalid_records: int
    invalid_reasons: dict[str, int]
    audience_size: int | None
    received_records: int | None
    matched_records: int | None
    error: str | None
    owner: str | None
    claimed_until: float | None
    unknown_since: float | None = None  # see `record_poll`

    @property
    def terminal(self) -> bool:
        return self.state != JobState.PENDING

    @classmethod
    def from_mapping(cls, row: Mapping[Any, Any]) -> JobRow:
        values = dict(row)
        values["invalid_reasons"] = dict(values["invalid_reasons"] or {})
        return cls(**values)


def alembic_config() -> AlembicConfig:
    """Alembic's config for the migrations shipped inside the package. Alembic is imported only
    to migrate: a daemon whose store is at `SCHEMA_REVISION` never loads it (~11 MB)."""
    from alembic.config import Config as AlembicConfig

    cfg = AlembicConfig()
    cfg.set_main_option("script_location", str(resources.files("syncd.store") / "migrations"))
    return cfg


def _current_revision(conn: Connection) -> str | None:
    """The revision alembic stamped the database with; None for an empty database."""
    if not inspect(conn).has_table(_VERSION_TABLE):
        return None
    revisions = conn.execute(text(f"SELECT version_num FROM {_VERSION_TABLE}")).scalars().all()
    if len(revisions) > 1:  # branches: never made by syncd's linear migrations
        raise SchemaOutdatedError(
            f"the store's {_VERSION_TABLE} table holds {len(revisions)} revisions "
            f"({', '.join(sorted(revisions))}); syncd's migrations are one line of revisions"
        )
    return revisions[0] if revisions else None


class Store:
    """Async access to the store. Create with `await Store.connect(url)`, end with `close()`."""

    def __init__(
        self,
        engine: AsyncEngine,
        *,
        clock: Callable[[], float] | None = None,
        busy_timeout_s: float = SQLITE_BUSY_TIMEOUT_S,
    ) -> None:
        self._engine = engine
        self._clock = clock
        self._postgres = engine.dialect.name == "postgresql"
        # SQLite has one writer at a time: this process's writes queue here, and run in one
        # thread (with a synchronous engine of the same file), rather than in SQLite's busy
        # handler, which sleeps; busy_timeout still covers other processes.
        self._write_lock = asyncio.Lock()
        self._writes_failing = False
        self._writer: ThreadPoolExecutor | None = None
        self._sync_engine: Engine | None = None
        if not self._postgres:
            self._writer = ThreadPoolExecutor(1, thread_name_prefix="syncd-store-writer")
            self._sync_engine = create_engine(
                engine.url.set(drivername="sqlite"), hide_parameters=True
            )
            _configure_sqlite(self._sync_engine, time.sleep, busy_timeout_s)

    @classmethod
    async def connect(
        cls,
        url: str,
        *,
        clock: Callable[[], float] | None = None,
        busy_timeout_s: float = SQLITE_BUSY_TIMEOUT_S,
        statement_timeout_s: float = STATEMENT_TIMEOUT_S,
    ) -> Store:
        """Open an engine for `url` (no I/O until first use). `clock` replaces the database's
        clock, for tests. `busy_timeout_s`: how long an SQLite statement waits for another
        process's write lock before it fails ("database is locked"). `statement_timeout_s`:
        how long a PostgreSQL statement may go unanswered before it fails (a TimeoutError, which
        `persist` retries on a new connection); migrations have none."""
        if url.startswith("sqlite"):
            engine = create_async_engine(url, hide_parameters=True)
            _configure_sqlite(engine.sync_engine, _sleep_in_greenlet, busy_timeout_s)
        else:
            engine = _postgres_engine(url, statement_timeout_s, pool_size=10, max_overflow=10)
        return cls(engine, clock=clock, busy_timeout_s=busy_timeout_s)

    async def close(self) -> None:
        await self._engine.dispose()
        if self._writer is not None and self._sync_engine is not None:
            await asyncio.get_running_loop().run_in_executor(
                self._writer, self._sync_engine.dispose
            )
            self._writer.shutdown()

    async def ping(self) -> bool:
        """True when the store answers a trivial query within a few seconds. Never raises."""
        try:
            async with asyncio.timeout(_PING_TIMEOUT_S), self._read() as conn:
                await conn.execute(text("SELECT 1"))
        except Exception:
            return False
        return True

    async def writes_setup(self) -> tuple[str, bool]:
        """(the database's character set, whether its transactions are read-only), as a
        transaction of syncd's sees them: PostgreSQL's `server_encoding` and
        `transaction_read_only` (a hot standby, or the database's or role's
        `default_transaction_read_only`); SQLite: UTF8, writable."""
        if not self._postgres:
            return "UTF8", False
        query = text(
            "SELECT current_setting('server_encoding'), current_setting('transaction_read_only')"
        )
        async with self._engine.connect() as conn:
            encoding, read_only = (await conn.execute(query)).one()
        return str(encoding), read_only == "on"

    async def now(self) -> float:
        """The store's clock (epoch seconds), which every time in its rows comes from."""
        async with self._read() as conn:
            return await self._now(conn)

    async def size_bytes(self) -> int:
        """The database's size on disk: PostgreSQL's `pg_database_size` (every table, index and
        dead row version of the database syncd uses); SQLite's database file (pages x page size;
        the WAL, checkpointed into it, aside). Cheap: sizes of files, no scan."""
        async with self._read() as conn:
            if self._postgres:
                size = await conn.scalar(text("SELECT pg_database_size(current_database())"))
            else:
                pages = await conn.scalar(text("PRAGMA page_count"))
                size = pages * await conn.scalar(text("PRAGMA page_size"))
        return int(size)

    # -- schema ----------------------------------------------------------------------------------
    async def schema_status(self) -> tuple[str | None, str]:
        """(the database's revision or None when empty, the revision this code needs)."""
        async with self._read() as conn:
            current = await conn.run_sync(_current_revision)
        return current, SCHEMA_REVISION

    async def upgrade(self) -> None:
        """Apply every migration up to head, in one transaction (replicas take turns)."""

        if not self._postgres:
            await self.run_write(lambda conn, _now: _upgrade_to_head(conn))
            return
        # A migration may rewrite a large table: its statements get no timeout (an engine of
        # their own, one connection), not even one set on syncd's role or database.
        engine = _postgres_engine(self._engine.url, None, poolclass=NullPool)
        try:
            async with engine.begin() as conn:
                await conn.execute(text("SET LOCAL statement_timeout = 0"))
                await conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _MIGRATION_LOCK})
                await conn.run_sync(_upgrade_to_head)
        finally:
            await engine.dispose()

    async def ensure_schema(self, *, auto_upgrade: bool) -> bool:
        """Return when the schema is at head; True when it created it. An empty database gets
        it: nothing can be using it. A schema at an older revision (older pods may still run
        on it) is upgraded only if `auto_upgrade`, else SchemaOutdatedError names
        `syncd db upgrade`."""
        current, head = await self.schema_status()
        if current == head:
            return False
        if current is not None and current > head:  # revisions are zero-padded numbers
            raise SchemaOutdatedError(
                f"the store's schema is at revision {current}, newer than this syncd's "
                f"({head}): a newer release migrated it; run that release (or a later one)"
            )
        if auto_upgrade or current is None:
            await self.upgrade()
            return current is None
        raise SchemaOutdatedError(
            f"the store's schema is at revision {current}, this syncd needs revision {head}: "
            "run `syncd db upgrade --config FILE`, or set store.auto_upgrade = true"
        )

    # -- jobs ------------------------------------------------------------------------------------
    async def add_job(self, job: NewJob, *, first_poll_after_s: float) -> None:
        """Track a job; a job_request_id already stored is left as it is."""
        await self.run_write(lambda conn, now: self.insert_job(conn, now, job, first_poll_after_s))

    def insert_job(
        self, conn: Connection, now: float, job: NewJob, first_poll_after_s: float
    ) -> bool:
        """`add_job` inside the caller's write transaction (the member table stores a job with
        its members' sent state in one). Returns whether it was added (False: stored already)."""
        values = {
            "job_request_id": job.job_request_id,
            "connection_id": job.connection_id,
            "audience_id": job.audience_id,
            "audience": job.audience,
            "records": job.records,
            "adds": job.adds,
            "removes": job.removes,
            "state": JobState.PENDING,
            "created_at": now,
            "next_poll_at": now + first_poll_after_s,
            "polls": 0,
            "invalid_records": 0,
            "invalid_reasons": {},
        }
        added = conn.scalar(
            self._insert(jobs)
            .values(values)
            .on_conflict_do_nothing()
            .returning(jobs.c.job_request_id)
        )
        if added is not None:
            self._count(conn, {JobState.PENDING: 1})
        return added is not None

    async def claim_due_jobs(self, owner: str, limit: int, lease_s: float) -> list[JobRow]:
        """Atomically claim up to `limit` due PENDING jobs for `lease_s` seconds: no other owner
        gets them until `record_poll` or the lease runs out."""

        def op(conn: Connection, now: float) -> list[JobRow]:
            due = (
                select(jobs.c.job_request_id)
                .where(
                    jobs.c.state == JobState.PENDING,
                    jobs.c.next_poll_at <= now,
                    (jobs.c.claimed_until.is_(None)) | (jobs.c.claimed_until <= now),
                )
                .order_by(jobs.c.next_poll_at)
                .limit(limit)
            )
            if self._postgres:
                due = due.with_for_update(skip_locked=True)
            result = conn.execute(
                update(jobs)
                .where(jobs.c.job_request_id.in_(due.scalar_subquery()))
                .values(owner=owner, claimed_until=now + lease_s)
                .returning(*jobs.c)
            )
            return [JobRow.from_mapping(r) for r in result.mappings()]

        return sorted(await self.run_write(op), key=lambda r: r.next_poll_at)

    async def record_poll(
        self,
        claim: JobRow,
        status: JobStatus | None,
        *,
        next_poll_in_s: float,
        error: str | None = None,
        unknown_since: float | None = None,
    ) -> bool:
        """Record one poll of a job `claim_due_jobs` returned, and release the claim. `status`
        None = the GET failed (`error` says why). `unknown_since`: when the 404s ("unknown
        job") Amazon has answered since its last status of the job began (None: no such run).
        A terminal status ends the job: it is never claimed again. Returns whether it was
        stored: a job that is terminal meanwhile (e.g. expired) is left as it is, and so is a
        job claimed since by someone else, unless `status` is terminal."""
        where = [jobs.c.job_request_id == claim.job_request_id, jobs.c.state == JobState.PENDING]
        terminal = status is not None and status.terminal
        if not terminal:
            where += [jobs.c.owner == claim.owner, jobs.c.claimed_until == claim.claimed_until]

        def op(conn: Connection, now: float) -> bool:
            values: dict[str, Any] = {
                "polls": jobs.c.polls + 1,
                "last_polled_at": now,
                "next_poll_at": now + next_poll_in_s,
                "owner": None,
                "claimed_until": None,
                "error": None if error is None else error[:_MAX_ERROR_CHARS],
                "unknown_since": unknown_since,
            }
            if status is not None and terminal:
                values |= {
                    "state": status.job_state,
                    "terminal_at": now,
                    "processed_rate": status.processed_rate,
                    "invalid_records": len(status.invalid_records),
                    "invalid_reasons": invalid_reason_counts(status.invalid_records),
                    "audience_size": status.dsp_audience_size,
                    "received_records": status.received_record_size,
                    "matched_records": status.id_resolution_count,
                }
            stored = conn.execute(update(jobs).where(*where).values(values)).rowcount == 1
            if stored and status is not None and terminal:
                self._count(conn, {JobState.PENDING: -1, status.job_state: 1})
            return stored

        return await self.run_write(op)

    async def expire_jobs(self, max_age_s: float) -> int:
        """Mark PENDING jobs created more than `max_age_s` ago EXPIRED (terminal); how many."""

        def op(conn: Connection, now: float) -> int:
            result = conn.execute(
                update(jobs)
                .where(jobs.c.state == JobState.PENDING, jobs.c.created_at <= now - max_age_s)
                .values(state=JobState.EXPIRED, terminal_at=now, owner=None, claimed_until=None)
            )
            expired = int(result.rowcount)
            self._count(conn, {JobState.PENDING: -expired, JobState.EXPIRED: expired})
            return expired

        return await self.run_write(op)

    async def purge_jobs(self, older_than_s: float) -> int:
        """Delete jobs terminal for more than `older_than_s` (a bounded batch per call: call
        again while it returns a full batch); how many."""

        def op(conn: Connection, now: float) -> int:
            old = (
                select(jobs.c.job_request_id)
                .where(jobs.c.terminal_at <= now - older_than_s, jobs.c.state != JobState.PENDING)
                .limit(_PURGE_BATCH)
            )
            if self._postgres:
                old = old.with_for_update(skip_locked=True)
            result = conn.execute(
                delete(jobs)
                .where(jobs.c.job_request_id.in_(old.scalar_subquery()))
                .returning(jobs.c.state)
            )
            gone = Counter(row[0] for row in result)
            self._count(conn, {state: -n for state, n in gone.items()})
            return gone.total()

        return await self.run_write(op)

    async def next_due_in(self) -> float | None:
        """Seconds until some PENDING job is due and unclaimed (0 if one is now); None if none."""
        due_at = case(
            (jobs.c.claimed_until > jobs.c.next_poll_at, jobs.c.claimed_until),
            else_=jobs.c.next_poll_at,
        )
        async with self._read() as conn:
            now = await self._now(conn)
            first = await conn.scalar(
                select(func.min(due_at)).where(jobs.c.state == JobState.PENDING)
            )
        return None if first is None else max(0.0, float(first) - now)

    async def job_counts(self) -> dict[str, int]:
        """{state: jobs in the store} for the states that have jobs (no scan of the jobs)."""
        async with self._read() as conn:
            result = await conn.execute(
                select(job_counts.c.state, job_counts.c.jobs)
                .where(job_counts.c.jobs > 0)
                .order_by(job_counts.c.state)
            )
            return {row[0]: int(row[1]) for row in result}

    async def list_jobs(self, state: str | None = None, limit: int = 50) -> list[JobRow]:
        """The most recently created jobs, newest first, optionally of one state."""
        query = select(jobs).order_by(jobs.c.created_at.desc(), jobs.c.job_request_id).limit(limit)
        if state is not None:
            query = query.where(jobs.c.state == state)
        async with self._read() as conn:
            result = await conn.execute(query)
            return [JobRow.from_mapping(r) for r in result.mappings()]

    async def job(self, job_request_id: str) -> JobRow | None:
        """One stored job, or None."""
        async with self._read() as conn:
            row = (
                (await conn.execute(select(jobs).where(jobs.c.job_request_id == job_request_id)))
                .mappings()
                .first()
            )
        return None if row is None else JobRow.from_mapping(row)

    async def job_states(self, ids: Iterable[str]) -> dict[str, str]:
        """{job_request_id: state} for the ids that are stored."""
        wanted = list(dict.fromkeys(ids))
        states: dict[str, str] = {}
        async with self._read() as conn:
            for start in range(0, len(wanted), _IDS_PER_QUERY):
                chunk = wanted[start : start + _IDS_PER_QUERY]
                result = await conn.execute(
                    select(jobs.c.job_request_id, jobs.c.state).where(
                        jobs.c.job_request_id.in_(chunk)
                    )
                )
                states.update({row[0]: row[1] for row in result})
        return states

    async def recent_matches(self, audience_id: int, within_s: float) -> tuple[int, int]:
        """(received, matched): the sums of Amazon's receivedRecordSize and idResolutionCount
        over the jobs of `audience_id` that ended in the last `within_s` seconds, counting only
        jobs that reported both (so that the ratio compares like with like). Reads the index on
        (audience_id, terminal_at): the cost grows with the audience's recent jobs only."""
        async with self._read() as conn:
            now = await self._now(conn)
            row = (
                await conn.execute(
                    select(
                        func.coalesce(func.sum(jobs.c.received_records), 0),
                        func.coalesce(func.sum(jobs.c.matched_records), 0),
                    ).where(
                        jobs.c.audience_id == audience_id,
                        jobs.c.terminal_at >= now - within_s,
                        jobs.c.received_records.is_not(None),
                        jobs.c.matched_records.is_not(None),
                    )
                )
            ).one()
        return int(row[0]), int(row[1])

    # -- budget ----------------------------------------------------------------------------------
    async def reserve(
        self,
        connection_id: str,
        records: int,
        limit: int,
        window_s: float,
        hold_s: float = 0.0,
    ) -> tuple[int | None, float]:
        """Atomically reserve `records` of `connection_id`'s `limit` per rolling `window_s`
        (`hold_s`: the longest a POST stays in flight, see the module's docstring).

        Returns (reservation id, 0.0), or (None, seconds until enough reserved records have
        left the window) when the reservation would exceed the limit."""
        if records > limit:
            raise ValueError(f"{records} records can never fit a budget of {limit} per window")
        r = budget_reservations

        def op(conn: Connection, now: float) -> tuple[int | None, float]:
            if self._postgres:  # the time once the connection's lock is held
                conn.execute(
                    text("SELECT pg_advisory_xact_lock(hashtext(:c))"), {"c": connection_id}
                )
                now = self._now_sync(conn)
            conn.execute(
                delete(r).where(
                    r.c.connection_id == connection_id,
                    r.c.stamped_at <= now - window_s - max(window_s, hold_s),
                )
            )
            leaves = _leaves_at(window_s, hold_s)
            in_window = (r.c.connection_id == connection_id) & (leaves > now)
            used = int(
                conn.scalar(select(func.coalesce(func.sum(r.c.records), 0)).where(in_window)) or 0
            )
            if used + records <= limit:
                new_id = conn.scalar(
                    insert(r)
                    .values(
                        connection_id=connection_id,
                        records=records,
                        stamped_at=now,
                        confirmed=False,
                    )
                    .returning(r.c.id)
                )
                return int(new_id), 0.0
            # The moment when the oldest rows that free enough records have all left the window.
            freed = func.sum(r.c.records).over(order_by=(leaves, r.c.id))
            ranked = (
                select(leaves.label("leaves"), freed.label("freed")).where(in_window).subquery()
            )
            resume_at = conn.scalar(
                select(func.min(ranked.c.leaves)).where(ranked.c.freed >= used + records - limit)
            )
            return None, (window_s if resume_at is None else max(0.0, float(resume_at) - now))

        return await self.run_write(op)

    async def release(self, reservation_id: int) -> None:
        """Drop a reservation whose POST never happened."""
        r = budget_reservations
        await self.run_write(
            lambda conn, _now: conn.execute(delete(r).where(r.c.id == reservation_id))
        )

    async def confirm(self, reservation_id: int) -> None:
        """Re-stamp a reservation at now (Amazon accepted its POST): it counts one window from
        here."""
        r = budget_reservations
        await self.run_write(
            lambda conn, now: conn.execute(
                update(r).where(r.c.id == reservation_id).values(stamped_at=now, confirmed=True)
            )
        )

    async def budget_used(self, connection_id: str, window_s: float, hold_s: float = 0.0) -> int:
        """Records of `connection_id` counted in the rolling window that ends now."""
        r = budget_reservations
        async with self._read() as conn:
            now = await self._now(conn)
            used = await conn.scalar(
                select(func.coalesce(func.sum(r.c.records), 0)).where(
                    r.c.connection_id == connection_id, _leaves_at(window_s, hold_s) > now
                )
            )
        return int(used or 0)

    # -- blocked connections ---------------------------------------------------------------------
    async def set_blocked(self, connection_id: str, cause: str) -> None:
        """Record that a sender found `connection_id` blocked for `cause` ("": open again). The
        time is kept while the cause stays the same."""
        b = connection_blocks

        def op(conn: Connection, now: float) -> None:
            if not cause:
                conn.execute(delete(b).where(b.c.connection_id == connection_id))
                return
            stmt = self._insert(b).values(connection_id=connection_id, cause=cause, since=now)
            conn.execute(
                stmt.on_conflict_do_update(
                    index_elements=[b.c.connection_id],
                    set_={"cause": cause, "since": now},
                    where=b.c.cause != stmt.excluded.cause,
                )
            )

        await self.run_write(op)

    async def blocked(self, connection_id: str) -> tuple[str, float] | None:
        """(cause, since) of a connection a sender found blocked, or None."""
        b = connection_blocks
        async with self._read() as conn:
            row = (
                await conn.execute(
                    select(b.c.cause, b.c.since).where(b.c.connection_id == connection_id)
                )
            ).first()
        return None if row is None else (str(row[0]), float(row[1]))

    # -- plumbing --------------------------------------------------------------------------------
    def _insert(self, table: Any) -> Any:
        """INSERT with the dialect's ON CONFLICT."""
        return (pg_insert if self._postgres else sqlite_insert)(table)

    def _count(self, conn: Connection, changes: Mapping[str, int]) -> None:
        """Add `changes` ({state: +-jobs}) to the job counts, in one statement, rows in state
        order (concurrent writers lock them in the same order: no deadlock)."""
        rows = [{"state": k, "jobs": n} for k, n in sorted(changes.items()) if n]
        if not rows:
            return
        upsert = self._insert(job_counts).values(rows)
        conn.execute(
            upsert.on_conflict_do_update(
                index_elements=[job_counts.c.state],
                set_={"jobs": job_counts.c.jobs + upsert.excluded.jobs},
            )
        )

    @property
    def takes_writes(self) -> bool:
        """False from a write that failed for want of the store (unreachable, or SQLite's write
        lock held by another process, which reads do not notice) until one succeeds: /readyz."""
        return not self._writes_failing

    async def run_write(self, op: Callable[[Connection, float], T]) -> T:
        """`op(conn, now)`, plain synchronous SQLAlchemy, as one write transaction.

        SQLite: the process's writes take turns (the write lock) and each runs whole in the
        writer thread: one thread hand-over per transaction, not one per statement, so the lock
        is held for the work and not for the event loop's turns between statements.
        PostgreSQL: in SQLAlchemy's greenlet (`run_sync`), concurrently."""
        try:
            result = await self._run_write(op)
        except Exception as exc:
            if transient(exc) and not conflict(exc):
                self._writes_failing = True
            raise
        self._writes_failing = False
        return result

    async def _run_write(self, op: Callable[[Connection, float], T]) -> T:
        if self._writer is None:
            async with self._engine.begin() as conn:
                return await conn.run_sync(lambda sync: op(sync, self._now_sync(sync)))
        async with self._write_lock:
            # A test's clock moves in the event loop's thread: read it there, once it is our turn.
            now = None if self._clock is None else self._clock()
            done = asyncio.get_running_loop().run_in_executor(
                self._writer, self._in_writer, op, now
            )
            try:
                return await asyncio.shield(done)
            except asyncio.CancelledError:
                await asyncio.wait([done])  # the transaction ends before the lock is given up
                if not done.cancelled():
                    done.exception()  # retrieved: its outcome no longer matters to anyone
                raise

    def _in_writer(self, op: Callable[[Connection, float], T], now: float | None) -> T:
        assert self._sync_engine is not None
        with self._sync_engine.begin() as conn:
            return op(conn, self._now_sync(conn) if now is None else now)

    def _now_sync(self, conn: Connection) -> float:
        if self._clock is not None:
            return self._clock()
        if self._postgres:
            return float(conn.scalar(_PG_NOW))
        return time.time()

    @asynccontextmanager
    async def _read(self) -> AsyncIterator[AsyncConnection]:
        """One read-only transaction (a plain, deferred BEGIN on SQLite)."""
        async with self._engine.connect() as conn:
            await conn.execution_options(syncd_read_only=True)
            yield conn

    async def _now(self, conn: AsyncConnection) -> float:
        return await conn.run_sync(self._now_sync)


@asynccontextmanager
async def command_store(
    url: str,
    statement_timeout_s: float = STATEMENT_TIMEOUT_S,
    *,
    schema_current: bool = True,
    writes: bool = False,
) -> AsyncIterator[Store]:
    """A command's store, closed on exit; with `schema_current`, its schema at this code's
    revision (`ensure_schema`: an empty store gets it; an older or newer one is a
    SchemaOutdatedError naming what to run); with `writes`, one that takes writes
    (`require_writable`). Its first use tells whether it can be used at all: a store that cannot
    be reached or refuses syncd is a StoreUnavailable naming it (the URL's secrets masked) and
    the cause, not a traceback."""
    store = await Store.connect(url, statement_timeout_s=statement_timeout_s)
    try:
        with store_problems(url):
            if schema_current:
                await store.ensure_schema(auto_upgrade=False)
            else:
                await store.schema_status()
            if writes:
                await require_writable(store, url)
        yield store
    finally:
        await store.close()


@contextmanager
def store_problems(url: str) -> Iterator[None]:
    """Turn a store that cannot be reached or used (an OSError, a timeout, any SQLAlchemy
    error) into a StoreUnavailable naming it (secrets masked) and the cause, in one line."""
    try:
        yield
    except (OSError, TimeoutError, SQLAlchemyError) as exc:
        cause = "no answer in time" if isinstance(exc, TimeoutError) else str(exc)
        if isinstance(exc, DBAPIError):
            cause = str(exc.orig).strip().splitlines()[0] if str(exc.orig) else cause
        problem = f"{type(exc).__name__}: {cause}"[:_MAX_ERROR_CHARS]
        raise StoreUnavailable(
            f"the store ({mask_urls(url)}) cannot be used: {mask_urls(problem)}"
        ) from None


async def require_writable(store: Store, url: str) -> None:
    """StoreUnavailable, naming the store, unless it takes syncd's writes: a read-only
    PostgreSQL (a hot standby, or `default_transaction_read_only` on) fails each write, so that
    a daemon on it would start, and fail at its first event, again and again; a database not in
    UTF8 refuses Amazon's texts outside its charset (SQLSTATE 22P05: a job's outcome never
    stored) and SQL_ASCII counts lengths in bytes."""
    encoding, read_only = await store.writes_setup()
    if encoding != "UTF8":
        raise StoreUnavailable(
            f"the store ({mask_urls(url)}) is a database in {encoding}: syncd needs UTF8 "
            "(CREATE DATABASE ... ENCODING 'UTF8')"
        )
    if read_only:
        raise StoreUnavailable(
            f"the store ({mask_urls(url)}) is read-only: its transactions cannot write (a hot "
            "standby, or default_transaction_read_only = on for the database or syncd's role); "
            "give syncd the primary, or reset default_transaction_read_only"
        )


def _postgres_engine(url: str | URL, statement_timeout_s: float | None, **pool: Any) -> AsyncEngine:
    return create_async_engine(
        url,
        pool_pre_ping=True,
        isolation_level=_PG_ISOLATION,
        hide_parameters=True,  # an error names the statement, never the values (PII)
        connect_args={"command_timeout": statement_timeout_s},
        **pool,
    )


def _leaves_at(window_s: float, hold_s: float) -> ColumnElement[float]:
    """When a reservation row stops counting: one window after a confirmed stamp; a window
    plus `hold_s` (at least a window) after an unconfirmed one."""
    r = budget_reservations
    unconfirmed = window_s + max(window_s, hold_s)
    return r.c.stamped_at + case((r.c.confirmed, window_s), else_=unconfirmed)


def _upgrade_to_head(connection: Connection) -> None:
    from alembic import command

    cfg = alembic_config()
    cfg.attributes["connection"] = connection
    command.upgrade(cfg, "head")


def _configure_sqlite(
    engine: Engine, sleep: Callable[[float], None], busy_timeout_s: float
) -> None:
    """WAL, busy timeout, and SQLAlchemy (not the driver) in charge of BEGIN, so that writes
    take the lock up front (`BEGIN IMMEDIATE`) and reads see one snapshot (`BEGIN`). `sleep`
    waits between attempts to switch to WAL, as the engine's connections can."""

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: ConnectionPoolEntry) -> None:
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute(f"PRAGMA busy_timeout = {int(busy_timeout_s * 1000)}")
        _enable_wal(cursor, sleep, busy_timeout_s)
        cursor.execute("PRAGMA synchronous = NORMAL")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        read_only = conn.get_execution_options().get("syncd_read_only", False)
        conn.exec_driver_sql("BEGIN" if read_only else "BEGIN IMMEDIATE")


def _enable_wal(cursor: Any, sleep: Callable[[float], None], busy_timeout_s: float) -> None:
    """Switch the file to WAL (persistent, so later connections find it done). Connections racing
    to switch a new file can get "database is locked" without SQLite's busy handler being asked,
    so retry for as long as the busy timeout."""
    deadline = time.monotonic() + busy_timeout_s
    delay = 0.005
    while True:
        try:
            cursor.execute("PRAGMA journal_mode = WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() + delay > deadline:
                raise
        sleep(delay)
        delay = min(delay * 2, 0.2)


def _sleep_in_greenlet(seconds: float) -> None:
    """Sleep on the event loop from the async engine's connect (it runs in SQLAlchemy's
    greenlet)."""
    await_only(asyncio.sleep(seconds))
