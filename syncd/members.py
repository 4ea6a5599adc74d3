"""The member table: per (audience_id, externalUserId), what Amazon should hold and was sent.

A reconcile loop's state, fed by the stream. Ingest records each change as the member's desired
state (`record_changes`: the newest change wins, by `occurred_at` then position); senders claim
members whose desired state differs from what was sent and that have no job pending
(`claim_due`), POST them, and store the job with the members' sent state (`mark_sent`, fenced on
the claim's token); the job poller's terminal state confirms them, marks the refused ones invalid
or makes them due again (`apply_job_outcome`). The TTL refresher marks confirmed adds due again
before their audience's ttl runs out (`due_for_refresh`). An erase sends DELETE everywhere and,
once confirmed, leaves only a tombstone (`erase`, `purge_tombstones`). `syncd reconcile` compares
a snapshot with the rows (`held_members`, `held_page`) and records the difference
(`record_reconcile`: optimistic, at the RECONCILE due rank). Due ranks: LIVE changes are claimed
first, then BACKGROUND (TTL refreshes), then RECONCILE work.

Row states, derived from the columns (never stored twice):
- due: `due_since` set. Only while no job is pending; the index of due rows is what claims read.
- claimed: due with a live lease (`claimed_until` > now); writes need its `claim_token`.
- pending: `job_request_id` set (the POST got its 202); not claimable until the job is terminal.
- settled: neither; `outcome` says how the last send ended.

Every operation is one short write transaction: on SQLite under the store's write lock
(`BEGIN IMMEDIATE`), on PostgreSQL at READ COMMITTED whatever the database's default (claims skip
rows other replicas lock; guarded writes re-check their condition on the newest row version), and
rerun when PostgreSQL reports a deadlock or a serialization failure. Rows are written in key order
so that concurrent writers rarely deadlock at all. Times come from the store's clock. Its size
per member is measured in docs/benchmarks.md.
"""

from __future__ import annotations

import functools
import math
import uuid
from collections import Counter, defaultdict
from collections.abc import (
    Callable,
    Iterable,
    Iterator,
    Mapping,
    Sequence,
)
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import orjson
from sqlalchemy import (
    Boolean,
    Column,
    ColumnElement,
    MetaData,
    String,
    Table,
    and_,
    any_,
    bindparam,
    case,
    delete,
    exists,
    func,
    insert,
    literal,
    literal_column,
    or_,
    select,
    text,
    tuple_,
    update,
)
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.postgresql.asyncpg import AsyncAdapt_asyncpg_dbapi
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import Connection
from sqlalchemy.exc import DBAPIError

from syncd.model import Action, MemberRecord
from syncd.store import NewJob, Store
from syncd.store.schema import jobs, member_dead_letters, members, reconciled, tombstones
from syncd.vocabulary import CONFIRMING_JOB_STATES, JobState

T = TypeVar("T")

ADD = "add"
REMOVE = "remove"
UPDATE = "update"  # identifiers only: applies to members whose desired action is ADD
LIVE = 0  # due rank of changes from the stream: claimed first
BACKGROUND = 1  # due rank of TTL refreshes: claimed after live changes
RECONCILE = 2  # due rank of `syncd reconcile` work: claimed after refreshes (never starves them)
RECONCILE_POSITION = -1  # `position` of a reconcile's change: a live change at the same time wins

CONFIRMED = "confirmed"
INVALID = "invalid"
FAILED = "failed"
EXPIRED = "expired"

_PARTITIONED = text(
    "SELECT EXISTS (SELECT FROM pg_partitioned_table WHERE partrelid = 'members'::regclass)"
)
_ERASE_LOCK = 0x73796E6365  # pg advisory lock: erase (exclusive) vs record_changes (shared)
_RETRYABLE_SQLSTATES = frozenset({"40001", "40P01"})  # serialization failure, deadlock
_TX_ATTEMPTS = 5
_ROWS_PER_STATEMENT = 250  # x 8 values per row: within SQLite's and asyncpg's parameter limits
_PG_IDS_PER_STATEMENT = 10_000  # PostgreSQL: ids passed as one array
_SHAPES = (_ROWS_PER_STATEMENT, 128, 64, 32, 16, 8, 4, 2, 1)  # rows per INSERT
_MAX_REASON_CHARS = 64
_MAX_DETAIL_CHARS = 300  # of Amazon's message in a dead letter's syncd-detail header
# a stored job with these of a new 202's job is that POST's own (a retried write), else another's
_POST_FIELDS = ("connection_id", "audience_id", "records", "adds", "removes")
_PURGE_BATCH = 10_000  # tombstones deleted per transaction

m = members
t = tombstones
dl = member_dead_letters


# -- values passed in and out --------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class MemberChange:
    """One change of one member, hashed and encoded (`member_change` builds it from the router's
    MemberRecord). `action` is ADD, REMOVE or UPDATE (an identifiers-only event); `position`
    orders changes with the same `occurred_at` (a Kafka offset, or a reconcile's sequence)."""

    audience_id: int
    external_user_id: str
    action: str
    record: bytes
    digest: bytes
    occurred_at: float
    position: int

    @property
    def key(self) -> tuple[int, str]:
        return (self.audience_id, self.external_user_id)

    @property
    def order(self) -> tuple[float, int]:
        return (self.occurred_at, self.position)


@dataclass(slots=True)
class RecordCounts:
    """What `record_changes` did with its changes (each change counts once)."""

    recorded: int = 0  # applied; the member is due, or will be compared when its job ends
    noop: int = 0  # applied, equal to what Amazon holds (sent and confirmed, or refused)
    superseded: int = 0  # not newer than what the member holds (older, or the same again)
    erased: int = 0  # not newer than the member's erase
    not_member: int = 0  # UPDATE of a profile that is not a member of the audience


@dataclass(frozen=True, slots=True)
class Claim:
    """A due member leased to one sender: send `record` (the API's record object) as `action`,
    then `mark_sent` or `release` it before the lease runs out (`renew` extends it)."""

    audience_id: int
    external_user_id: str
    action: str
    record: bytes
    digest: bytes
    token: str
    refresh: bool  # a TTL refresh or reconcile work rather than a live change
    occurred_at: float  # of the change claimed (end-to-end latency of live changes)

    def __hash__(self) -> int:
        # the lease's identity: hashing every field (the record too) was a share of the
        # senders' CPU, which keep their claims in sets
        return hash((self.audience_id, self.external_user_id, self.token))

    @property
    def api_action(self) -> Action:
        return Action.ADD if self.action == ADD else Action.REMOVE


@dataclass(frozen=True, slots=True)
class DeadMember:
    """A member to dead-letter: Amazon refused its record, or its sends failed too often.
    `record` is None when the member changed since that send (the refused bytes are gone)."""

    audience_id: int
    external_user_id: str
    action: str
    record: bytes | None
    reason: str


@dataclass(frozen=True, slots=True)
class QueuedDeadLetter:
    """A member dead letter waiting in the store for the broker (`MemberTable.lease_dead_letters`),
    with the detail to send beside its reason."""

    id: int
    member: DeadMember
    detail: str


@dataclass(slots=True)
class JobOutcome:
    """What a terminal job did to its members."""

    confirmed: int = 0
    invalid: list[DeadMember] = field(default_factory=list)
    retried: int = 0  # due again
    dead: list[DeadMember] = field(default_factory=list)  # failed max_attempts times
    erased: int = 0  # erase confirmed: rows removed, tombstones stay


@dataclass(frozen=True, slots=True)
class MemberState:
    """One member as `syncd members show` may print it: never the record or its digest."""

    audience_id: int
    external_user_id: str
    action: str
    occurred_at: float
    due_since: float | None
    refresh: bool
    sent_action: str | None
    sent_at: float | None
    job_request_id: str | None
    accepted_at: float | None
    outcome: str | None
    reason: str | None
    attempts: int
    claimed_by: str | None
    claimed_until: float | None
    in_sync: bool  # desired equals what was last sent


@dataclass(frozen=True, slots=True)
class HeldMember:
    """A member row as `syncd reconcile` compares it: its desired state, and what Amazon was
    sent of it. `record` is read only by `held_page` (a desired add may become a remove)."""

    external_user_id: str
    action: str
    digest: bytes
    occurred_at: float
    position: int
    never_sent: bool  # no POST of it was accepted, none is pending, none may have gone
    invalid: bool  # Amazon refused the desired state as it stands (sent as is, marked invalid)
    record: bytes | None = None

    @property
    def order(self) -> tuple[float, int]:
        return (self.occurred_at, self.position)


@dataclass(frozen=True, slots=True)
class ReconcileWrite:
    """A desired state `syncd reconcile` records for one member, with the row it compared
    (`held` None: there was no row). Applied only if that row is still as compared."""

    external_user_id: str
    action: str  # ADD or REMOVE
    record: bytes
    digest: bytes
    held: HeldMember | None
    kind: str = ""  # what the reconcile counted it as (its report's kinds)


@dataclass(slots=True)
class ReconcileCounts:
    """What `record_reconcile` did with its writes (each counts once)."""

    written: int = 0
    changed: int = 0  # the row changed since it was compared: left to that change
    erased: int = 0  # the member was erased at or after the reconcile's time
    skipped: Counter[str] = field(default_factory=Counter)  # writes not applied, by kind


# -- pure helpers ---------------------------------------------------------------------------------
def member_change(
    audience_id: int,
    record: MemberRecord,
    *,
    occurred_at: float,
    position: int,
    identifiers_only: bool = False,
) -> MemberChange:
    """The change a routed record makes to its member (`occurred_at`: the event's, else the Kafka
    message's timestamp)."""
    action = ADD if record.action is Action.ADD else REMOVE
    return MemberChange(
        audience_id,
        record.external_user_id,
        UPDATE if identifiers_only else action,
        record.json,
        record.digest,
        occurred_at,
        position,
    )


def without_consent_ip(record: bytes) -> bytes:
    """The record without `userConsent.geo.ipAddress` (the same object when it has none)."""
    if b'"ipAddress"' not in record:
        return record
    obj = orjson.loads(record)
    geo = (obj.get("userConsent") or {}).get("geo")
    if not isinstance(geo, dict) or "ipAddress" not in geo:
        return record
    del geo["ipAddress"]
    return orjson.dumps(obj)


def delete_record(record: bytes) -> bytes:
    """The same record with `action` DELETE (an erase removes the member with what it holds)."""
    obj = orjson.loads(record)
    obj["action"] = Action.REMOVE.value
    return orjson.dumps(obj)


class MemberDeadLetters(Protocol):
    """Where member dead letters go (the source's dead-letter producer)."""

    async def dead_letter_member(self, value: bytes, reason: str, detail: str) -> None: ...


def dead_letter_value(
    audience: str, audience_id: int, external_user_id: str, action: str, record: bytes | None
) -> bytes:
    """A member dead letter's value: {"audience", "audience_id", "externalUserId", "action",
    "record"} with the hashed record (null when the member changed since it was sent), without
    its consent IP: a dead letter outlives the change that carried it."""
    return orjson.dumps(
        {
            "audience": audience,
            "audience_id": audience_id,
            "externalUserId": external_user_id,
            "action": (Action.ADD if action == ADD else Action.REMOVE).value,
            "record": None if record is None else orjson.Fragment(without_consent_ip(record)),
        }
    )


def _rounds(
    changes: Iterable[MemberChange], counts: RecordCounts
) -> tuple[list[MemberChange], list[MemberChange]]:
    """At most two changes per member, in two rounds, with the effect of applying `changes` one
    by one in (occurred_at, position) order. An ADD or REMOVE replaces every older change of its
    member, and the newest UPDATE every older UPDATE; an UPDATE newer than the member's last ADD
    or REMOVE goes in the second round (it applies only if the member is an ADD by then). The
    changes left out are counted superseded. Each round is sorted by key: rows lock in order."""
    by_key: dict[tuple[int, str], list[MemberChange]] = defaultdict(list)
    for change in changes:
        if change.action not in (ADD, REMOVE, UPDATE):
            raise ValueError(f"unknown member action {change.action!r}")
        by_key[change.key].append(change)
    first: list[MemberChange] = []
    second: list[MemberChange] = []
    for key in sorted(by_key):
        group = by_key[key]
        if len(group) == 1:
            first.append(group[0])
            continue
        group.sort(key=lambda c: c.order)
        last = group[-1]
        sets = [c for c in group if c.action != UPDATE]
        if last.action != UPDATE:
            first.append(last)
            kept = 1
        else:
            # UPDATEs of one event, routed to destinations sharing the audience: all go on,
            # `_one_update_each` keeps the one of the member's country
            tied = [c for c in group if c.action == UPDATE and c.order == last.order]
            if sets:
                first.append(sets[-1])
            (second if sets else first).extend(tied)
            kept = len(tied) + (1 if sets else 0)
        counts.superseded += len(group) - kept
    return first, second


def _country(record: bytes) -> str | None:
    country = orjson.loads(record).get("countryCode")
    return country if isinstance(country, str) else None


def _array_of(column: Column[Any]) -> ARRAY[Any]:
    """A PostgreSQL array parameter for `column`'s values. Strings go as unbounded VARCHAR: a
    cast to VARCHAR(n) would cut a longer value short (and match or write another id) where
    the column itself refuses it."""
    return ARRAY(String() if isinstance(column.type, String) else column.type)


_IDS_ARRAY = _array_of(m.c.external_user_id)
_RECORDS_ARRAY = _array_of(m.c.record)


def _chunks(items: Sequence[T], size: int = _ROWS_PER_STATEMENT) -> Iterator[Sequence[T]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _shaped_chunks(items: Sequence[T]) -> Iterator[Sequence[T]]:
    """`items` in slices of the sizes in `_SHAPES`, for multi-row INSERTs: the drivers keep
    prepared statements by their text, and one per distinct row count filled their caches with
    statements of up to 1,000 rows (tens of MB)."""
    start = 0
    for size in _SHAPES:
        while len(items) - start >= size:
            yield items[start : start + size]
            start += size


def _by_audience(keys: Iterable[tuple[int, str]]) -> dict[int, list[str]]:
    grouped: dict[int, list[str]] = defaultdict(list)
    for audience_id, external_user_id in keys:
        grouped[audience_id].append(external_user_id)
    for ids in grouped.values():
        ids.sort()
    return grouped


def _newer(occurred_at: Any, position: Any) -> ColumnElement[bool]:
    """The change (occurred_at, position) is newer than the row's."""
    return or_(
        occurred_at > m.c.occurred_at,
        and_(occurred_at == m.c.occurred_at, position > m.c.position),
    )


def _applies(newer: ColumnElement[bool], *, adds_only: bool) -> ColumnElement[bool]:
    """The upsert's guard: the change is newer (and, for an identifiers-only UPDATE applied as
    an add, the member's desired action is ADD)."""
    return and_(newer, m.c.action == ADD) if adds_only else newer


def _differs() -> ColumnElement[bool]:
    """Desired differs from what was last sent (or nothing was)."""
    return or_(
        m.c.sent_action.is_(None),
        m.c.action != m.c.sent_action,
        m.c.digest != m.c.sent_digest,
    )


def _an_erase() -> ColumnElement[bool]:
    """The member's desired state is its erase: a REMOVE not newer than its tombstone."""
    return and_(
        m.c.action == REMOVE,
        exists().where(
            t.c.audience_id == m.c.audience_id,
            t.c.external_user_id == m.c.external_user_id,
            t.c.erased_at >= m.c.occurred_at,
        ),
    )


def _claimable(now: float) -> ColumnElement[bool]:
    return and_(
        m.c.due_since.is_not(None),
        m.c.job_request_id.is_(None),
        or_(m.c.claimed_until.is_(None), m.c.claimed_until <= now),
    )


def _retryable(exc: DBAPIError) -> bool:
    """A deadlock or a serialization failure; or a prepared statement that another process's
    migration made stale (it fails once: SQLAlchemy then clears the caches, and the next
    attempt prepares it anew)."""
    if isinstance(exc.orig, AsyncAdapt_asyncpg_dbapi.InvalidCachedStatementError):
        return True
    return getattr(exc.orig, "sqlstate", None) in _RETRYABLE_SQLSTATES


class JobIdReused(Exception):
    """Amazon answered a POST with the jobRequestId of a job that is over: the POST's outcome
    can never be read."""

    def __init__(self, job_request_id: str) -> None:
        super().__init__(
            f"Amazon answered with the jobRequestId of another POST's job ({job_request_id}): "
            "the outcome of this POST cannot be followed"
        )


# -- the table ------------------------------------------------------------------------------------
class MemberTable:
    """The member table over a connected `Store` (same engine, same SQLite write lock, same
    clock). Not itself retried on outages: callers wrap writes in `syncd.store.persist`."""

    def __init__(self, store: Store) -> None:
        self._store = store
        self._postgres = store._postgres
        self._upserts = {
            adds_only: self._upsert_statement(adds_only=adds_only) for adds_only in (False, True)
        }
        self._partitioned: bool | None = None  # PostgreSQL: read at the first claim

    def _is_partitioned(self, conn: Connection) -> bool:
        """PostgreSQL: whether an operator partitioned the member table (by audience,
        docs/operations.md; done with syncd stopped, so read once)."""
        if self._partitioned is None:
            self._partitioned = bool(conn.scalar(_PARTITIONED))
        return self._partitioned

    # -- plumbing --------------------------------------------------------------------------------
    async def _transaction(self, op: Callable[[Connection, float], T]) -> T:
        """`op(conn, now)` in one write transaction (`Store.run_write`), rerun (from scratch) on a
        deadlock or serialization failure."""
        attempt = 1
        while True:
            try:
                return await self._store.run_write(op)
            except DBAPIError as exc:
                if attempt >= _TX_ATTEMPTS or not _retryable(exc):
                    raise
                attempt += 1

    def _insert(self, table: Any) -> Any:
        return (pg_insert if self._postgres else sqlite_insert)(table)

    def _batches(self, items: Sequence[T]) -> Iterator[Sequence[T]]:
        """`items` in slices for `_among`: PostgreSQL takes a whole claim's ids in one array."""
        return _chunks(items, _PG_IDS_PER_STATEMENT if self._postgres else _ROWS_PER_STATEMENT)

    def _among(self, column: Column[Any], values: Sequence[Any]) -> ColumnElement[bool]:
        """`column IN values`. PostgreSQL: `column = ANY(array)`, one statement text whatever the
        length (an IN list is rendered anew, and prepared by asyncpg anew, for each length)."""
        if self._postgres:
            return column == any_(bindparam(None, list(values), type_=_array_of(column)))
        return column.in_(values)

    # -- ingest ----------------------------------------------------------------------------------
    async def record_changes(
        self, changes: Iterable[MemberChange], *, rank: int = LIVE
    ) -> RecordCounts:
        """Record changes as their members' desired state, in one transaction: a change applies
        only when newer (occurred_at, then position) than the member's row and than its erase,
        and not older than its audience's last complete reconcile (`mark_reconciled`); an UPDATE
        applies only to a member whose desired action is ADD. A member becomes due when
        its desired state differs from what was sent and confirmed and no job is pending. A
        member with no row always gets one, due (unknown is not absent: a REMOVE is sent too).
        `rank` BACKGROUND for reconcile work (claimed after live changes)."""

        counts = RecordCounts()
        rounds = _rounds(changes, counts)

        def op(conn: Connection, now: float) -> RecordCounts:
            done = RecordCounts(superseded=counts.superseded)
            if self._postgres:  # an erase must not slip between the tombstone check and a write
                conn.execute(text("SELECT pg_advisory_xact_lock_shared(:k)"), {"k": _ERASE_LOCK})
            # a row per audience a complete reconcile set: what held at its --as-of
            snapshot_at = {int(a): float(t) for a, t in conn.execute(select(reconciled))}
            for changes_of_round in rounds:
                self._apply(conn, changes_of_round, now, rank, done, snapshot_at)
            return done

        return await self._transaction(op)

    def _apply(
        self,
        conn: Connection,
        changes: Sequence[MemberChange],
        now: float,
        rank: int,
        counts: RecordCounts,
        snapshot_at: Mapping[int, float],
    ) -> None:
        """Record changes of distinct members (see `record_changes`); `snapshot_at`: audience
        id -> the --as-of of its last complete reconcile."""
        erased_at = self._tombstones(conn, [c.key for c in changes])
        live = []
        for change in changes:
            erased = erased_at.get(change.key)
            if erased is not None and change.occurred_at <= erased:
                counts.erased += 1
            elif change.occurred_at < snapshot_at.get(change.audience_id, -math.inf):
                counts.superseded += 1  # older than a snapshot of the whole audience
            else:
                live.append(change)
        full = [c for c in live if c.action != UPDATE]
        updates = self._one_update_each(conn, [c for c in live if c.action == UPDATE], counts)
        # PostgreSQL reads every row first (SQLite: `_upsert_staged` flags them itself): the
        # upsert locks each conflicting row, and logs the lock, even where its guard then
        # refuses the change, which every change of a replay is.
        rows = self._rows(conn, [c.key for c in (live if self._postgres else updates)])
        as_adds = []
        for c in updates:
            if (row := rows.get(c.key)) is not None and row[0] == ADD:
                as_adds.append(MemberChange(*c.key, ADD, c.record, c.digest, *c.order))
            else:
                counts.not_member += 1
        if self._postgres:  # what is older than its row now stays older (rows only move on)
            newer = [c for c in full if (row := rows.get(c.key)) is None or c.order > row[1]]
            newer_adds = [c for c in as_adds if c.order > rows[c.key][1]]
            counts.superseded += len(full) - len(newer) + len(as_adds) - len(newer_adds)
            full, as_adds = newer, newer_adds
        self._upsert(conn, full, now, rank, counts, adds_only=False)
        self._upsert(conn, as_adds, now, rank, counts, adds_only=True)

    def _one_update_each(
        self, conn: Connection, updates: Sequence[MemberChange], counts: RecordCounts
    ) -> list[MemberChange]:
        """An identifiers-only event routed to destinations that share an audience_id gives its
        member an UPDATE from each, at the same time, each with its destination's country: the
        one of the member's own country applies (none of it: the last listed, as for a member
        of one destination). The others count superseded."""
        by_key: dict[tuple[int, str], list[MemberChange]] = defaultdict(list)
        for change in updates:
            by_key[change.key].append(change)
        shared = [key for key, group in by_key.items() if len(group) > 1]
        if not shared:
            return list(updates)
        held = self._countries(conn, shared)
        kept = []
        for key, group in by_key.items():
            own = [c for c in group if _country(c.record) == held.get(key)]
            kept.append((own or group)[-1])
            counts.superseded += len(group) - 1
        return kept

    def _countries(
        self, conn: Connection, keys: Sequence[tuple[int, str]]
    ) -> dict[tuple[int, str], str | None]:
        """The country of each member's stored record."""
        found: dict[tuple[int, str], str | None] = {}
        for audience_id, ids in _by_audience(keys).items():
            for chunk in self._batches(ids):
                result = conn.execute(
                    select(m.c.external_user_id, m.c.record).where(
                        m.c.audience_id == audience_id, self._among(m.c.external_user_id, chunk)
                    )
                )
                found.update({(audience_id, e): _country(bytes(r)) for e, r in result})
        return found

    def _tombstones(
        self, conn: Connection, keys: Sequence[tuple[int, str]]
    ) -> dict[tuple[int, str], float]:
        found: dict[tuple[int, str], float] = {}
        for audience_id, ids in _by_audience(keys).items():
            for chunk in self._batches(ids):
                result = conn.execute(
                    select(t.c.external_user_id, t.c.erased_at).where(
                        t.c.audience_id == audience_id, self._among(t.c.external_user_id, chunk)
                    )
                )
                found.update({(audience_id, row[0]): float(row[1]) for row in result})
        return found

    def _rows(
        self, conn: Connection, keys: Sequence[tuple[int, str]]
    ) -> dict[tuple[int, str], tuple[str, tuple[float, int]]]:
        """The desired action and order (occurred_at, position) of the member rows of `keys`."""
        found: dict[tuple[int, str], tuple[str, tuple[float, int]]] = {}
        for audience_id, ids in _by_audience(keys).items():
            for chunk in self._batches(ids):
                result = conn.execute(
                    select(m.c.external_user_id, m.c.action, m.c.occurred_at, m.c.position).where(
                        m.c.audience_id == audience_id, self._among(m.c.external_user_id, chunk)
                    )
                )
                found.update({(audience_id, e): (a, (float(o), int(p))) for e, a, o, p in result})
        return found

    def _upsert(
        self,
        conn: Connection,
        changes: Sequence[MemberChange],
        now: float,
        rank: int,
        counts: RecordCounts,
        *,
        adds_only: bool,
    ) -> None:
        """One INSERT .. ON CONFLICT DO UPDATE .. WHERE newer of all `changes`, from one array
        per column (one statement text, prepared once). SQLite: `_upsert_staged`."""
        if not self._postgres:
            self._upsert_staged(conn, changes, now, rank, counts, adds_only=adds_only)
            return
        if not changes:
            return
        columns = {name: [getattr(c, name) for c in changes] for name in _STAGED_COLUMNS}
        written = conn.execute(
            self._upserts[adds_only], {**columns, "rank": rank, "now": now}
        ).all()
        for due_since, job in written:
            if due_since is None and job is None:
                counts.noop += 1
            else:
                counts.recorded += 1
        counts.superseded += len(changes) - len(written)

    def _upsert_staged(
        self,
        conn: Connection,
        changes: Sequence[MemberChange],
        now: float,
        rank: int,
        counts: RecordCounts,
        *,
        adds_only: bool,
    ) -> None:
        """SQLite's `_upsert`, in a dozen statement steps instead of one per row returned (see
        _SQLITE_PICK): the changes are staged in a temporary table, flagged where they will
        apply (the upsert's own guard), upserted from there in one statement, and counted."""
        if not changes:
            return
        conn.exec_driver_sql(_SQLITE_STAGING)
        for chunk in _shaped_chunks(changes):
            values = [
                v
                for c in chunk
                for v in (
                    c.audience_id,
                    c.external_user_id,
                    c.action,
                    c.record,
                    c.digest,
                    c.occurred_at,
                    c.position,
                )
            ]
            conn.exec_driver_sql(_stage_statement(len(chunk)), tuple(values))
        guard = _applies(_newer(staged.c.occurred_at, staged.c.position), adds_only=adds_only)
        held_back = exists().where(
            m.c.audience_id == staged.c.audience_id,
            m.c.external_user_id == staged.c.external_user_id,
            ~guard,
        )
        conn.execute(update(staged).values(applies=~held_back))
        conn.execute(self._upserts[adds_only], {"rank": rank, "now": now})
        applied, recorded = conn.execute(
            select(
                func.count(),
                func.coalesce(
                    func.sum(
                        case(
                            (or_(m.c.due_since.is_not(None), m.c.job_request_id.is_not(None)), 1),
                            else_=0,
                        )
                    ),
                    0,
                ),
            )
            .select_from(staged)
            .join(
                m,
                and_(
                    m.c.audience_id == staged.c.audience_id,
                    m.c.external_user_id == staged.c.external_user_id,
                ),
            )
            .where(staged.c.applies)
        ).one()
        conn.exec_driver_sql("DELETE FROM staged_changes")
        counts.recorded += int(recorded)
        counts.noop += int(applied) - int(recorded)
        counts.superseded += len(changes) - int(applied)

    def _upsert_statement(self, *, adds_only: bool) -> Any:
        """The upsert of `_upsert`, built once: every value comes from the inserted row
        (`excluded`), so the statement is the same for every call and compiles once. The rows
        come from one array per column (PostgreSQL) or from `staged_changes`, the flagged ones
        (SQLite), with the due rank and time as parameters."""
        if self._postgres:
            source: Any = (
                func.unnest(
                    *(bindparam(name, type_=_array_of(m.c[name])) for name in _STAGED_COLUMNS)
                )
                .table_valued(*_STAGED_COLUMNS)
                .render_derived(name="changes")
            )
        else:
            source = staged
        rows = select(
            *(source.c[name] for name in _STAGED_COLUMNS),
            bindparam("rank", type_=m.c.due_rank.type),
            bindparam("now", type_=m.c.due_since.type),
            literal(0),
        )
        stmt = self._insert(m).from_select(
            [*_STAGED_COLUMNS, "due_rank", "due_since", "attempts"],
            rows if self._postgres else rows.where(staged.c.applies),
        )
        new = stmt.excluded
        same_as_sent = and_(
            new.action == m.c.sent_action,
            new.digest == m.c.sent_digest,
            or_(m.c.outcome == CONFIRMED, m.c.outcome == INVALID),  # not IN: executemany
        )
        upsert = stmt.on_conflict_do_update(
            index_elements=[m.c.audience_id, m.c.external_user_id],
            set_={
                "action": new.action,
                "record": new.record,
                "digest": new.digest,
                "occurred_at": new.occurred_at,
                "position": new.position,
                "attempts": 0,
                "due_since": case(
                    (m.c.job_request_id.is_not(None), None),
                    (same_as_sent, None),
                    else_=func.coalesce(m.c.due_since, new.due_since),
                ),
                "due_rank": case(
                    (and_(m.c.due_since.is_not(None), m.c.due_rank < new.due_rank), m.c.due_rank),
                    else_=new.due_rank,
                ),
            },
            where=_applies(_newer(new.occurred_at, new.position), adds_only=adds_only),
        )
        return upsert.returning(m.c.due_since, m.c.job_request_id) if self._postgres else upsert

    # -- senders ---------------------------------------------------------------------------------
    async def claim_due(
        self, audience_ids: Sequence[int], limit: int, lease_s: float, owner: str
    ) -> list[Claim]:
        """Lease up to `limit` due members of `audience_ids` (the sending connection's unpaused
        audiences) for `lease_s` seconds: live changes before background work, and each rank
        shared evenly between the audiences that have some (an audience with fewer leaves its
        share to the others). Rows another replica holds (lease or lock) are skipped."""

        def op(conn: Connection, now: float) -> list[Claim]:
            token = uuid.uuid4().hex
            audiences = sorted(set(audience_ids))
            if self._postgres:
                claims = self._claim_shares(conn, audiences, limit, now, lease_s, owner, token)
            else:
                claims = _claim_rowids(conn, audiences, limit, now, lease_s, owner, token)
            claims.sort(key=lambda c: (c.refresh, c.audience_id, c.external_user_id))
            return claims

        if limit <= 0 or not audience_ids:
            return []
        return await self._transaction(op)

    def _claim_shares(
        self,
        conn: Connection,
        audience_ids: list[int],
        limit: int,
        now: float,
        lease_s: float,
        owner: str,
        token: str,
    ) -> list[Claim]:
        """PostgreSQL: lease up to `limit` claimable members (`_share_out`), one statement per
        share. Each takes the share's first rows in the due index after the last key it took,
        skips the rows another transaction locks (SKIP LOCKED), and leases them by their row
        address: no second descent of the key's index per member. A row address is unique
        within one partition only: on a table partitioned by audience the lease names the
        audience too, which keeps it to the audience's partition (on a plain table the planner
        could serve that from an index, every row of the audience, in a plan it made and
        cached while the table was small)."""
        claims: list[Claim] = []
        after: dict[tuple[int, int], tuple[float, str]] = {}
        ctid: ColumnElement[Any] = literal_column("ctid")
        partitioned = self._is_partitioned(conn)

        def take(audience_id: int, rank: int, want: int) -> int:
            picked = (
                select(ctid)
                .select_from(m)
                .where(m.c.audience_id == audience_id, m.c.due_rank == rank, _claimable(now))
                .order_by(m.c.due_since, m.c.external_user_id)
                .limit(want)
                .with_for_update(skip_locked=True)
            )
            if (audience_id, rank) in after:
                since, euid = after[(audience_id, rank)]
                picked = picked.where(
                    or_(
                        m.c.due_since > since,
                        and_(m.c.due_since == since, m.c.external_user_id > euid),
                    )
                )
            lease = update(m).where(ctid == any_(func.array(picked.scalar_subquery())))
            if partitioned:
                lease = lease.where(m.c.audience_id == audience_id)
            rows = conn.execute(
                lease.values(
                    claimed_by=owner, claim_token=token, claimed_until=now + lease_s
                ).returning(
                    m.c.audience_id,
                    m.c.external_user_id,
                    m.c.action,
                    m.c.record,
                    m.c.digest,
                    m.c.due_rank,
                    m.c.occurred_at,
                    m.c.due_since,
                )
            ).all()
            claims.extend(_claim(row[:7], token) for row in rows)
            if rows:
                last = max((float(row[7]), row[1]) for row in rows)
                after[(audience_id, rank)] = last
            return len(rows)

        _share_out(audience_ids, limit, take)
        return claims

    async def mark_sent(self, claims: Sequence[Claim], job_request_id: str) -> list[Claim]:
        """Amazon accepted the POST of `claims` (202, `job_request_id`): store what was sent, the
        job, and the 202's time (the TTL clock's start for adds), in one transaction. Only rows
        whose lease still holds the claim's token are written; the others are returned (lost:
        another sender took them over, and the POST is left to the job alone)."""
        return await self._transaction(
            lambda conn, now: self._mark_sent(conn, now, claims, job_request_id)
        )

    async def store_job(
        self, claims: Sequence[Claim], job: NewJob, *, first_poll_after_s: float
    ) -> list[Claim]:
        """The job row of a POST Amazon accepted and its members' sent state (`mark_sent`), in
        one transaction: the job is stored whatever happened to the claims (the poller follows
        it), the members only where their lease still holds. Returns the lost claims.

        A jobRequestId of another POST's job (Amazon reused it) would give these members that
        job's outcome, or none if it is over already (it is never polled again): JobIdReused is
        raised and nothing is written (the claims still hold). The same POST stored again (a
        retried write) takes its job as it is."""

        def op(conn: Connection, now: float) -> list[Claim]:
            if not self._store.insert_job(conn, now, job, first_poll_after_s):
                stored = conn.execute(
                    select(jobs.c.state, *(jobs.c[f] for f in _POST_FIELDS)).where(
                        jobs.c.job_request_id == job.job_request_id
                    )
                ).first()  # None: purged meanwhile (a retention's old id)
                post = (JobState.PENDING, *(getattr(job, f) for f in _POST_FIELDS))
                if stored is None or tuple(stored) != post:
                    raise JobIdReused(job.job_request_id)
            return self._mark_sent(conn, now, claims, job.job_request_id)

        return await self._transaction(op)

    def _mark_sent(
        self, conn: Connection, now: float, claims: Sequence[Claim], job_request_id: str
    ) -> list[Claim]:
        return self._sent(conn, now, claims, {"job_request_id": job_request_id})

    def _forget_consent_ips(self, conn: Connection, accepted: Sequence[Claim]) -> None:
        """The store keeps a consent IP only until the change that carried it is accepted (or
        refused for good): from here the record keeps `geo.countryCode` alone (refreshes send
        that). A row whose record changed since the claim keeps its own (not sent yet).
        SQLite; PostgreSQL does it as it marks the rows sent (`_without_consent_ips`)."""
        params = [
            {"a": c.audience_id, "e": c.external_user_id, "old": c.record, "new": new}
            for c in accepted
            if (new := without_consent_ip(c.record)) is not c.record
        ]
        if params:
            conn.execute(
                update(m)
                .where(
                    m.c.audience_id == bindparam("a"),
                    m.c.external_user_id == bindparam("e"),
                    m.c.record == bindparam("old"),
                )
                .values(record=bindparam("new")),
                params,
            )

    async def refuse(self, claims: Sequence[Claim], reason: str) -> list[Claim]:
        """Amazon refused these claimed records on their own (a 400 isolated by the bisect, or a
        record too large for any body): mark them invalid with the `reason` class, as sent, so
        that they are not sent again until they change (a member that changed since its claim
        is due again). Fenced on the claims' tokens; returns the lost claims."""
        values = {"outcome": INVALID, "reason": reason[:_MAX_REASON_CHARS], "accepted_at": None}
        return await self._transaction(lambda conn, now: self._sent(conn, now, claims, values))

    def _sent(
        self,
        conn: Connection,
        now: float,
        claims: Sequence[Claim],
        values: Mapping[str, Any],
    ) -> list[Claim]:
        """Store `claims` as sent (with `values`), where their lease still holds; returns the
        lost claims. The sent state is each claim's; a row that changed since is due again."""
        lost: list[Claim] = []
        for (audience_id, token), group in _claim_groups(claims).items():
            sent = {c.external_user_id: c for c in group}
            # SQLite: one chunk (its statements take any number of ids in one step)
            for chunk in self._batches(sorted(sent)) if self._postgres else [sorted(sent)]:
                ours = and_(m.c.audience_id == audience_id, m.c.claim_token == token)
                update_sent = update(m).values(
                    sent_action=m.c.action,
                    sent_digest=m.c.digest,
                    sent_at=now,
                    due_since=None,
                    claimed_by=None,
                    claim_token=None,
                    claimed_until=None,
                    **values,
                )
                if self._postgres:
                    returned = conn.execute(
                        _without_consent_ips(update_sent, [sent[euid] for euid in chunk])
                        .where(ours)
                        .returning(m.c.external_user_id, m.c.action, m.c.digest)
                    )
                    written = [(euid, action, bytes(digest)) for euid, action, digest in returned]
                else:
                    ids = orjson.dumps(chunk).decode()
                    held = conn.exec_driver_sql(_SQLITE_HELD, (audience_id, token, ids))
                    written = [
                        (e, a, bytes.fromhex(d)) for e, a, d in orjson.loads(held.scalar_one())
                    ]
                    conn.execute(
                        update_sent.where(ours, m.c.external_user_id.in_(_IDS)), {"ids": ids}
                    )
                # The row may have changed since the claim: the sent state is the claim's.
                changed = [
                    {"a": audience_id, "e": euid, "sa": c.action, "sd": c.digest}
                    for euid, action, digest in written
                    if (c := sent[euid]).action != action or c.digest != digest
                ]
                if changed:
                    due = None if "job_request_id" in values else now  # pending: the poller's
                    conn.execute(
                        update(m)
                        .where(
                            m.c.audience_id == bindparam("a"),
                            m.c.external_user_id == bindparam("e"),
                        )
                        .values(
                            sent_action=bindparam("sa"), sent_digest=bindparam("sd"), due_since=due
                        ),
                        changed,
                    )
                kept = {row[0] for row in written}
                lost.extend(sent[euid] for euid in chunk if euid not in kept)
        if not self._postgres:  # PostgreSQL: in the same row versions (_without_consent_ips)
            gone = set(lost)
            self._forget_consent_ips(conn, [c for c in claims if c not in gone])
        return lost

    async def waiting(self, audience_ids: Sequence[int], rank: int | None = None) -> int:
        """Due members of `audience_ids`, of one due `rank` if given (RECONCILE: reconcile work
        waiting), read from the index of due rows."""
        if not audience_ids:
            return 0
        query = select(func.count()).where(
            m.c.audience_id.in_(sorted(set(audience_ids))), m.c.due_since.is_not(None)
        )
        if rank is not None:
            query = query.where(m.c.due_rank == rank)
        async with self._store._read() as conn:
            count = await conn.scalar(query)
        return int(count or 0)

    async def release(self, claims: Sequence[Claim]) -> None:
        """Give claims back unsent (no budget, connection blocked): they stay due."""
        await self._lease(claims, None)

    async def renew(self, claims: Sequence[Claim], lease_s: float) -> list[Claim]:
        """Extend the lease of `claims` (a POST still retrying); returns the claims already
        lost."""
        return await self._lease(claims, lease_s)

    async def _lease(self, claims: Sequence[Claim], lease_s: float | None) -> list[Claim]:
        def op(conn: Connection, now: float) -> list[Claim]:
            lost: list[Claim] = []
            for (audience_id, token), group in _claim_groups(claims).items():
                held = {c.external_user_id: c for c in group}
                for chunk in self._batches(sorted(held)):
                    if lease_s is None:
                        values: dict[str, Any] = {
                            "claimed_by": None,
                            "claim_token": None,
                            "claimed_until": None,
                        }
                    else:
                        values = {"claimed_until": now + lease_s}
                    result = conn.execute(
                        update(m)
                        .where(
                            m.c.audience_id == audience_id,
                            self._among(m.c.external_user_id, chunk),
                            m.c.claim_token == token,
                        )
                        .values(values)
                        .returning(m.c.external_user_id)
                    )
                    kept = set(result.scalars())
                    lost.extend(held[euid] for euid in chunk if euid not in kept)
            return lost

        return await self._transaction(op)

    # -- job outcomes ----------------------------------------------------------------------------
    async def apply_job_outcome(
        self,
        job_request_id: str,
        state: str,
        invalid: Mapping[str, str] | None = None,
        *,
        max_attempts: int = 5,
        reason: str | None = None,
        details: Mapping[str, str] | None = None,
    ) -> JobOutcome:
        """A job reached a terminal `state` (Amazon's, or EXPIRED): update its members.

        SUCCEEDED / COMPLETED confirm them (an add's TTL clock starts at its 202);
        PARTIALLYSUCCEEDED confirms all but `invalid` ({externalUserId: reason class}), which are
        marked invalid and dead-lettered (`details`: Amazon's message per externalUserId);
        FAILED makes them due again, `reason` noted, and after `max_attempts` failed sends
        dead-letters them (not due until they change); EXPIRED makes them due again (the same
        action is sent again). A member whose desired state changed meanwhile is due whatever
        the outcome. A confirmed or refused DELETE of an erased member removes its row (its
        tombstone stays). The dead letters are queued in the same transaction
        (`lease_dead_letters`) and returned too."""
        refused = {euid: r[:_MAX_REASON_CHARS] for euid, r in (invalid or {}).items()}
        if state in CONFIRMING_JOB_STATES:
            outcome = CONFIRMED
        elif state == JobState.FAILED:
            outcome = FAILED
        elif state == JobState.EXPIRED:
            outcome = EXPIRED
        else:
            raise ValueError(f"{state!r} is not a terminal job state")
        short_reason = None if reason is None else reason[:_MAX_REASON_CHARS]

        def op(conn: Connection, now: float) -> JobOutcome:
            result = JobOutcome()
            of_job = m.c.job_request_id == job_request_id
            if self._postgres:  # lock the job's rows in key order: no deadlock with ingest
                locked = (
                    select(m.c.audience_id)
                    .where(of_job)
                    .order_by(m.c.audience_id, m.c.external_user_id)
                    .with_for_update()
                    .subquery()
                )
                conn.execute(select(func.count()).select_from(locked))  # counted, not returned
            if outcome == CONFIRMED:
                result.erased = self._finish_erasures(conn, of_job)
                # Amazon's list may name anything, any number of times: only the job's own
                # members are marked, a statement per reason class (and chunk), not per entry.
                held = set(conn.execute(select(m.c.external_user_id).where(of_job)).scalars())
                by_reason: dict[str, list[str]] = defaultdict(list)
                for euid in sorted(held.intersection(refused)):
                    by_reason[refused[euid]].append(euid)
                for why, ids in sorted(by_reason.items()):
                    for chunk in self._batches(ids):
                        rows = conn.execute(
                            update(m)
                            .where(of_job, self._among(m.c.external_user_id, chunk))
                            .values(_settle(now, INVALID, why, accepted=False))
                            .returning(*_dead_columns())
                        )
                        result.invalid.extend(_dead(row, why) for row in rows)
                confirmed = conn.execute(
                    update(m).where(of_job).values(_settle(now, CONFIRMED, None, accepted=True))
                )
                result.confirmed = int(confirmed.rowcount)
            elif outcome == FAILED:
                # an erase's DELETE is retried for as long as it fails: never given up
                exhausted = and_(m.c.attempts + 1 >= max_attempts, ~_differs(), ~_an_erase())
                rows = conn.execute(
                    update(m)
                    .where(of_job, exhausted)
                    .values(_settle(now, FAILED, short_reason, accepted=False, retry=False))
                    .returning(*_dead_columns())
                )
                result.dead = [_dead(row, short_reason or FAILED) for row in rows]
                retried = conn.execute(
                    update(m)
                    .where(of_job)
                    .values(_settle(now, FAILED, short_reason, accepted=False, retry=True))
                )
                result.retried = int(retried.rowcount)
            else:
                retried = conn.execute(
                    update(m)
                    .where(of_job)
                    .values(job_request_id=None, outcome=EXPIRED, reason=None, due_since=now)
                )
                result.retried = int(retried.rowcount)
            failed = f"job {job_request_id} {short_reason or 'FAILED'}; {max_attempts} sends failed"
            queued = [(d, (details or {}).get(d.external_user_id, "")) for d in result.invalid]
            self._queue_dead_letters(conn, [*queued, *((d, failed) for d in result.dead)])
            return result

        return await self._transaction(op)

    # -- member dead letters: queued with the outcome, deleted once the broker has them ----------
    def _queue_dead_letters(
        self, conn: Connection, letters: Sequence[tuple[DeadMember, str]]
    ) -> None:
        if letters:
            conn.execute(
                insert(dl),
                [
                    {
                        "audience_id": d.audience_id,
                        "external_user_id": d.external_user_id,
                        "action": d.action,
                        "record": d.record,
                        "reason": d.reason,
                        "detail": detail[:_MAX_DETAIL_CHARS],
                    }
                    for d, detail in letters
                ],
            )

    async def lease_dead_letters(self, limit: int, lease_s: float) -> list[QueuedDeadLetter]:
        """Up to `limit` queued dead letters no one is sending (never leased, or the lease ran
        out: its sender died), oldest first, each leased for `lease_s`."""

        def op(conn: Connection, now: float) -> list[QueuedDeadLetter]:
            free = or_(dl.c.leased_until.is_(None), dl.c.leased_until <= now)
            pick = select(dl.c.id).where(free).order_by(dl.c.id).limit(limit)
            if self._postgres:
                pick = pick.with_for_update(skip_locked=True)
            ids = list(conn.execute(pick).scalars())
            if not ids:
                return []
            rows = conn.execute(
                update(dl)
                .where(self._among(dl.c.id, ids))
                .values(leased_until=now + lease_s)
                .returning(
                    dl.c.id,
                    dl.c.audience_id,
                    dl.c.external_user_id,
                    dl.c.action,
                    dl.c.record,
                    dl.c.reason,
                    dl.c.detail,
                )
            ).all()
            return [
                QueuedDeadLetter(
                    int(i), DeadMember(int(a), e, act, None if r is None else bytes(r), why), d
                )
                for i, a, e, act, r, why, d in sorted(rows)
            ]

        return await self._transaction(op)

    async def renew_dead_letters(self, ids: Sequence[int], lease_s: float) -> None:
        """Extend the lease of dead letters still being sent (a slow or absent broker)."""
        await self._transaction(
            lambda conn, now: conn.execute(
                update(dl).where(self._among(dl.c.id, ids)).values(leased_until=now + lease_s)
            )
        )

    async def dead_letters_queued(self) -> int:
        """How many member dead letters wait for the broker (being sent or not)."""
        async with self._store._read() as conn:
            return int(await conn.scalar(select(func.count()).select_from(dl)) or 0)

    async def dead_letters_sent(self, ids: Sequence[int]) -> None:
        """The broker acknowledged these: forget them."""
        await self._transaction(
            lambda conn, now: conn.execute(delete(dl).where(self._among(dl.c.id, ids)))
        )

    async def expired_jobs(self, limit: int = 100) -> list[str]:
        """Jobs syncd gave up polling (EXPIRED) whose members still wait for them: their outcome
        is still to apply (found again after a crash between the expiry and its application).
        Reads only members with a job pending (the index of pending rows)."""
        async with self._store._read() as conn:
            result = await conn.execute(
                select(m.c.job_request_id)
                .where(
                    m.c.job_request_id.is_not(None),
                    m.c.job_request_id.in_(
                        select(jobs.c.job_request_id).where(jobs.c.state == JobState.EXPIRED)
                    ),
                )
                .distinct()
                .limit(limit)
            )
            return sorted(result.scalars())

    def _finish_erasures(self, conn: Connection, of_job: ColumnElement[bool]) -> int:
        """Delete the job's rows whose DELETE was the member's erase (desired remove, sent as is,
        not newer than the tombstone). No tombstone, the usual case: nothing to scan."""
        if conn.execute(select(t.c.audience_id).limit(1)).first() is None:
            return 0
        result = conn.execute(delete(m).where(of_job, ~_differs(), _an_erase()))
        return int(result.rowcount)

    # -- TTL refresh -----------------------------------------------------------------------------
    async def due_for_refresh(self, audience_id: int, older_than_s: float, limit: int) -> int:
        """Mark due (BACKGROUND rank) up to `limit` members of `audience_id` whose last confirmed
        CREATE was accepted more than `older_than_s` seconds ago, oldest first, walking the index
        on accepted_at. Returns how many; fewer than `limit` means none is left for now."""

        def op(conn: Connection, now: float) -> int:
            stale = and_(
                m.c.audience_id == audience_id,
                m.c.accepted_at.is_not(None),
                m.c.accepted_at < now - older_than_s,
                m.c.due_since.is_(None),
                m.c.job_request_id.is_(None),
                m.c.action == ADD,
                m.c.outcome == CONFIRMED,
            )
            # Keys first, then the update: a LIMIT subquery inside the UPDATE may be rescanned
            # by PostgreSQL's semi-join and mark more than `limit` rows.
            oldest = (
                select(m.c.external_user_id)
                .where(stale)
                .order_by(m.c.accepted_at, m.c.external_user_id)
                .limit(limit)
            )
            if self._postgres:
                oldest = oldest.with_for_update(skip_locked=True)
            ids = list((conn.execute(oldest)).scalars())
            marked = 0
            for chunk in self._batches(ids):
                result = conn.execute(
                    update(m)
                    .where(stale, self._among(m.c.external_user_id, chunk))
                    .values(due_since=now, due_rank=BACKGROUND)
                )
                marked += int(result.rowcount)
            return marked

        if limit <= 0:
            return 0
        return await self._transaction(op)

    # -- erasure ---------------------------------------------------------------------------------
    async def erase(
        self,
        external_user_ids: Iterable[str],
        audience_ids: Iterable[int],
        *,
        occurred_at: float,
        position: int,
    ) -> int:
        """Erase profiles from `audience_ids` (every audience the daemon serves): each member row
        the erase is newer than becomes a due DELETE of what it holds (a row Amazon already
        confirmed removed is deleted at once), and every (audience, id) gets a tombstone, so that
        no change not newer than the erase brings it back. Returns how many rows wait for their
        DELETE (due, or once the job pending for them ends)."""
        keys = sorted({(a, e) for a in set(audience_ids) for e in set(external_user_ids)})

        def op(conn: Connection, now: float) -> int:
            if self._postgres:
                conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _ERASE_LOCK})
            self._add_tombstones(conn, keys, occurred_at, now)
            deletes = 0
            for audience_id, ids in _by_audience(keys).items():
                for chunk in self._batches(ids):
                    where = and_(
                        m.c.audience_id == audience_id,
                        self._among(m.c.external_user_id, chunk),
                        _newer(occurred_at, position),
                    )
                    done = and_(
                        m.c.sent_action == REMOVE,
                        m.c.digest == m.c.sent_digest,
                        m.c.outcome.in_((CONFIRMED, INVALID)),
                        m.c.job_request_id.is_(None),
                    )
                    conn.execute(delete(m).where(where, done))
                    rows = (
                        conn.execute(
                            select(m.c.external_user_id, m.c.action, m.c.record)
                            .where(where)
                            .order_by(m.c.external_user_id)
                        )
                    ).all()
                    params = [
                        {
                            "a": audience_id,
                            "e": euid,
                            "r": record if action == REMOVE else delete_record(record),
                        }
                        for euid, action, record in rows
                    ]
                    if params:
                        conn.execute(
                            update(m)
                            .where(
                                m.c.audience_id == bindparam("a"),
                                m.c.external_user_id == bindparam("e"),
                            )
                            .values(
                                action=REMOVE,
                                record=bindparam("r"),
                                occurred_at=occurred_at,
                                position=position,
                                attempts=0,
                                due_rank=LIVE,
                                due_since=case(
                                    (m.c.job_request_id.is_not(None), None),
                                    else_=func.coalesce(m.c.due_since, now),
                                ),
                            ),
                            params,
                        )
                    # after the rows' locks: a job outcome holding them queued its dead
                    # letters by now (a leased one is being sent: it goes, once)
                    of_erased = self._among(dl.c.external_user_id, chunk)
                    conn.execute(delete(dl).where(dl.c.audience_id == audience_id, of_erased))
                    deletes += len(params)
            return deletes

        return await self._transaction(op)

    def _add_tombstones(
        self, conn: Connection, keys: Sequence[tuple[int, str]], erased_at: float, now: float
    ) -> None:
        """A tombstone per key of the erase at `erased_at`, recorded `now`; a key's newer erase
        replaces an older one's."""
        for chunk in _shaped_chunks(keys):
            stmt = self._insert(t).values(
                [
                    {
                        "audience_id": a,
                        "external_user_id": e,
                        "erased_at": erased_at,
                        "recorded_at": now,
                    }
                    for a, e in chunk
                ]
            )
            stmt = stmt.on_conflict_do_update(
                index_elements=[t.c.audience_id, t.c.external_user_id],
                set_={"erased_at": stmt.excluded.erased_at, "recorded_at": now},
                where=stmt.excluded.erased_at > t.c.erased_at,
            )
            conn.execute(stmt)

    async def purge_tombstones(self, older_than_s: float, batch: int = _PURGE_BATCH) -> int:
        """Delete tombstones whose erase both happened and was recorded more than
        `older_than_s` ago, and whose member rows are gone (a DELETE still waiting keeps its
        tombstone): an erase read long after it happened guards against replays of the
        member's older events as long as any. A tombstone an older release wrote (no
        recorded_at) counts from its erase. `batch` at a time, a transaction each. Returns how
        many."""

        def op(conn: Connection, now: float) -> int:
            cutoff = now - older_than_s
            row_left = exists().where(
                m.c.audience_id == t.c.audience_id,
                m.c.external_user_id == t.c.external_user_id,
            )
            recorded_before = or_(t.c.recorded_at.is_(None), t.c.recorded_at < cutoff)
            old = (
                select(t.c.audience_id, t.c.external_user_id)
                .where(t.c.erased_at < cutoff, recorded_before, ~row_left)
                .limit(batch)
            )
            key = tuple_(t.c.audience_id, t.c.external_user_id)
            return int(conn.execute(delete(t).where(key.in_(old))).rowcount)

        purged = 0
        while True:
            done = await self._transaction(op)
            purged += done
            if done < batch:
                return purged

    # -- reading ---------------------------------------------------------------------------------
    async def counts(self, audience_id: int) -> dict[str, int]:
        """Members of an audience by state, non-overlapping: `pending` (due or job pending),
        `invalid` (refused, or failed too often), `member` (confirmed add), `removed` (confirmed
        remove). One pass over the audience's rows in key order (the primary key's range): its
        cost grows with the audience, not with the table."""
        state = case(
            (or_(m.c.due_since.is_not(None), m.c.job_request_id.is_not(None)), "pending"),
            (m.c.outcome != CONFIRMED, "invalid"),
            (m.c.action == ADD, "member"),
            else_="removed",
        )
        counted = {"member": 0, "pending": 0, "removed": 0, "invalid": 0}
        async with self._store._read() as conn:
            result = await conn.execute(
                select(state, func.count()).where(m.c.audience_id == audience_id).group_by(state)
            )
            counted.update({row[0]: int(row[1]) for row in result})
        return counted

    async def member(self, audience_id: int, external_user_id: str) -> MemberState | None:
        """One member's state (no record, no digest), or None."""
        async with self._store._read() as conn:
            row = (
                await conn.execute(
                    select(m, (~_differs()).label("in_sync")).where(
                        m.c.audience_id == audience_id, m.c.external_user_id == external_user_id
                    )
                )
            ).first()
        if row is None:
            return None
        return MemberState(
            audience_id=audience_id,
            external_user_id=external_user_id,
            action=row.action,
            occurred_at=row.occurred_at,
            due_since=row.due_since,
            refresh=row.due_rank > 0,
            sent_action=row.sent_action,
            sent_at=row.sent_at,
            job_request_id=row.job_request_id,
            accepted_at=row.accepted_at,
            outcome=row.outcome,
            reason=row.reason,
            attempts=row.attempts,
            claimed_by=row.claimed_by,
            claimed_until=row.claimed_until,
            in_sync=bool(row.in_sync),
        )

    async def tombstone(self, audience_id: int, external_user_id: str) -> float | None:
        """When the member was erased (the erase's occurred_at), if a tombstone holds it."""
        async with self._store._read() as conn:
            erased_at = await conn.scalar(
                select(t.c.erased_at).where(
                    t.c.audience_id == audience_id, t.c.external_user_id == external_user_id
                )
            )
        return None if erased_at is None else float(erased_at)

    # -- expiry watch (syncd/audiences.py) -------------------------------------------------------
    async def count_at_risk(self, audience_id: int, older_than_s: float) -> int:
        """Members of `audience_id` that Amazon holds from a CREATE accepted more than
        `older_than_s` seconds ago, whose desired state is still an add and whose re-send has no
        job yet (due or not): they leave the audience at its ttl unless sent soon. Reads the
        index on accepted_at, so only the old members are visited."""
        async with self._store._read() as conn:
            now = await self._store._now(conn)
            found = await conn.scalar(
                select(func.count()).where(
                    m.c.audience_id == audience_id,
                    m.c.accepted_at.is_not(None),
                    m.c.accepted_at < now - older_than_s,
                    m.c.job_request_id.is_(None),
                    m.c.action == ADD,
                )
            )
        return int(found or 0)

    # -- operator commands (syncd/operate.py) ----------------------------------------------------
    async def audience_ids(self) -> list[int]:
        """Every audience_id that has member rows, ascending. A loose index scan (one seek on the
        primary key per audience, in a recursive query), not a scan of the members."""
        found = select(func.min(m.c.audience_id).label("audience_id")).cte("found", recursive=True)
        following = (
            select(func.min(m.c.audience_id))
            .where(m.c.audience_id > found.c.audience_id)
            .scalar_subquery()
        )
        found = found.union_all(select(following).where(found.c.audience_id.is_not(None)))
        query = select(found.c.audience_id).where(found.c.audience_id.is_not(None))
        async with self._store._read() as conn:
            return [int(a) for a in (await conn.execute(query)).scalars()]

    async def purge_audience(self, audience_id: int, batch: int = _ROWS_PER_STATEMENT) -> int:
        """Delete every member row of `audience_id` (an audience no destination names any more),
        `batch` rows per transaction so that a large audience never holds the write lock long.
        Its tombstones stay until `purge_tombstones` (should a destination name the audience
        again, an erased profile must not come back); its last reconcile time goes. Returns how
        many rows were deleted."""

        def op(conn: Connection, now: float) -> int:
            keys = (
                select(m.c.external_user_id)
                .where(m.c.audience_id == audience_id)
                .order_by(m.c.external_user_id)
                .limit(batch)
            )
            if self._postgres:
                keys = keys.with_for_update()
            ids = list((conn.execute(keys)).scalars())
            if not ids:  # the last round: the audience's reconcile time goes with its rows
                conn.execute(delete(reconciled).where(reconciled.c.audience_id == audience_id))
                return 0
            result = conn.execute(
                delete(m).where(m.c.audience_id == audience_id, m.c.external_user_id.in_(ids))
            )
            return int(result.rowcount)

        total = 0
        while deleted := await self._transaction(op):
            total += deleted
        return total

    async def mark_reconciled(self, audience_id: int, as_of: float) -> None:
        """A reconcile said what the whole audience holds at `as_of`: a live change older than
        that is superseded from now on (`record_changes`). Only ever moves forward."""

        def op(conn: Connection, now: float) -> None:
            stmt = self._insert(reconciled).values(audience_id=audience_id, as_of=as_of)
            conn.execute(
                stmt.on_conflict_do_update(
                    index_elements=[reconciled.c.audience_id],
                    set_={"as_of": stmt.excluded.as_of},
                    where=stmt.excluded.as_of > reconciled.c.as_of,
                )
            )

        await self._transaction(op)

    # -- reconcile (syncd/reconcile.py) ----------------------------------------------------------
    async def held_members(self, audience_id: int, ids: Sequence[str]) -> dict[str, HeldMember]:
        """The rows of `ids` in `audience_id` (by primary key), without their records."""
        found: dict[str, HeldMember] = {}
        async with self._store._read() as conn:
            for chunk in self._batches(sorted(set(ids))):
                result = await conn.execute(
                    select(*_held_columns()).where(
                        m.c.audience_id == audience_id, self._among(m.c.external_user_id, chunk)
                    )
                )
                found.update((row[0], _held(row)) for row in result)
        return found

    async def members_among(self, keys: Iterable[tuple[int, str]]) -> set[tuple[int, str]]:
        """Those of `keys` (audience_id, externalUserId) whose desired action is ADD: where the
        profile is a member, as an identifiers-only change finds it."""
        found: set[tuple[int, str]] = set()
        for audience_id, ids in _by_audience(set(keys)).items():
            held = await self.held_members(audience_id, ids)
            found.update((audience_id, euid) for euid, row in held.items() if row.action == ADD)
        return found

    async def held_page(
        self, audience_id: int, after: str | None, limit: int, *, action: str | None = None
    ) -> list[HeldMember]:
        """Up to `limit` rows of `audience_id` after the key `after` (None: from the first), in
        key order (the primary key's range, the database's collation), with their records;
        only those whose desired action is `action` if given."""
        query = (
            select(*_held_columns(), m.c.record)
            .where(m.c.audience_id == audience_id)
            .order_by(m.c.external_user_id)
            .limit(limit)
        )
        if action is not None:
            query = query.where(m.c.action == action)
        if after is not None:
            query = query.where(m.c.external_user_id > after)
        async with self._store._read() as conn:
            rows = (await conn.execute(query)).all()
        return [_held(row, bytes(row[-1])) for row in rows]

    async def record_reconcile(
        self, audience_id: int, writes: Sequence[ReconcileWrite], *, occurred_at: float
    ) -> ReconcileCounts:
        """Record a reconcile's desired states in one transaction, each with `occurred_at` (the
        reconcile's time) and `RECONCILE_POSITION`, due at RECONCILE rank (after live changes and
        refreshes; a row due already keeps its rank). A write applies only where the member's
        row is still as compared (`held`: the same desired state, or still no row) and the
        member was not erased at or after `occurred_at`. A remove of a member Amazon was never
        sent (no POST accepted, none pending or under way) is recorded without being due:
        there is nothing to take out."""
        counts = ReconcileCounts()
        by_id = {w.external_user_id: w for w in writes}
        ids = sorted(by_id)

        def op(conn: Connection, now: float) -> ReconcileCounts:
            done = ReconcileCounts()
            if self._postgres:  # an erase must not slip between the tombstone check and a write
                conn.execute(text("SELECT pg_advisory_xact_lock_shared(:k)"), {"k": _ERASE_LOCK})
            erased = self._erased_since(conn, audience_id, ids, occurred_at)
            current: dict[str, HeldMember] = {}
            for chunk in self._batches(ids):
                query = (
                    select(*_held_columns())
                    .where(m.c.audience_id == audience_id, self._among(m.c.external_user_id, chunk))
                    .order_by(m.c.external_user_id)
                )
                if self._postgres:
                    query = query.with_for_update()
                current.update((row[0], _held(row)) for row in conn.execute(query))
            inserts: list[ReconcileWrite] = []
            updates: dict[str, list[ReconcileWrite]] = {ADD: [], REMOVE: []}
            for euid in ids:
                w = by_id[euid]
                if euid in erased:
                    done.erased += 1
                    done.skipped[w.kind] += 1
                    continue
                now_held = current.get(euid)
                if now_held is None and w.held is None:
                    inserts.append(w)
                elif (
                    now_held is not None
                    and w.held is not None
                    and (now_held.action, now_held.digest, now_held.order)
                    == (w.held.action, w.held.digest, w.held.order)
                ):
                    updates[w.action].append(w)
                else:
                    done.changed += 1
                    done.skipped[w.kind] += 1
            for part in _shaped_chunks(inserts):
                rows = [
                    {
                        "audience_id": audience_id,
                        "external_user_id": w.external_user_id,
                        "action": w.action,
                        "record": w.record,
                        "digest": w.digest,
                        "occurred_at": occurred_at,
                        "position": RECONCILE_POSITION,
                        "due_rank": RECONCILE,
                        "due_since": now,
                        "attempts": 0,
                    }
                    for w in part
                ]
                stmt = self._insert(m).values(rows).on_conflict_do_nothing()
                result = conn.execute(stmt.returning(m.c.external_user_id))
                inserted = set(result.scalars())
                done.written += len(inserted)
                for w in part:  # ingest made a row meanwhile: left to that change
                    if w.external_user_id not in inserted:
                        done.changed += 1
                        done.skipped[w.kind] += 1
            for action, group in updates.items():
                if group:
                    conn.execute(
                        _reconcile_update(action, now),
                        [
                            {
                                "a": audience_id,
                                "e": w.external_user_id,
                                "r": w.record,
                                "d": w.digest,
                                "at": occurred_at,
                            }
                            for w in group
                        ],
                    )
                    done.written += len(group)
            return done

        if not writes:
            return counts
        return await self._transaction(op)

    async def erased_since(self, audience_id: int, ids: Sequence[str], at: float) -> set[str]:
        """Those of `ids` erased from `audience_id` at or after `at`: what `record_reconcile`
        leaves out of a reconcile at `at` (a dry run counts them as it would)."""
        async with self._store._read() as conn:
            return await conn.run_sync(self._erased_since, audience_id, ids, at)

    def _erased_since(
        self, conn: Connection, audience_id: int, ids: Sequence[str], at: float
    ) -> set[str]:
        erased_at = self._tombstones(conn, [(audience_id, e) for e in ids])
        return {euid for (_, euid), erased in erased_at.items() if erased >= at}

    async def reconcile_progress(self, audience_id: int, as_of: float) -> tuple[int, int]:
        """(left, refused) of reconcile changes in `audience_id` (rows whose desired state a
        reconcile wrote, and no change since): left = due or sent with its job pending, of any
        reconcile (one may wait for an earlier one's); refused = of the reconcile at `as_of`,
        Amazon refused it, or its sends failed too often (not due until it changes). One pass
        over the audience's rows."""
        mine = and_(m.c.audience_id == audience_id, m.c.position == RECONCILE_POSITION)
        left = or_(m.c.due_since.is_not(None), m.c.job_request_id.is_not(None))
        refused = and_(
            m.c.occurred_at == as_of,
            m.c.due_since.is_(None),
            m.c.job_request_id.is_(None),
            m.c.outcome.in_((INVALID, FAILED)),
            ~_differs(),
        )
        async with self._store._read() as conn:
            row = (
                await conn.execute(
                    select(
                        func.coalesce(func.sum(case((left, 1), else_=0)), 0),
                        func.coalesce(func.sum(case((refused, 1), else_=0)), 0),
                    ).where(mine)
                )
            ).one()
        return int(row[0]), int(row[1])

    async def sending(self, connection_id: str, audience_id: int, within_s: float) -> bool:
        """Whether something sends for the connection: a job of it created within `within_s`,
        or a member of `audience_id` under a sender's lease now."""
        async with self._store._read() as conn:
            now = await self._store._now(conn)
            job = await conn.scalar(
                select(jobs.c.job_request_id)
                .where(jobs.c.created_at > now - within_s, jobs.c.connection_id == connection_id)
                .limit(1)
            )
            claimed = await conn.scalar(
                select(m.c.external_user_id)
                .where(
                    m.c.audience_id == audience_id,
                    m.c.due_since.is_not(None),
                    m.c.claimed_until > now,
                )
                .limit(1)
            )
        return job is not None or claimed is not None


def _share_out(audience_ids: list[int], limit: int, take: Callable[[int, int, int], int]) -> None:
    """The order of a claim: per rank (live changes first), rounds of equal shares of what is
    left of `limit` over the audiences that filled their last share (an audience with fewer
    leaves its share to the others). `take(audience_id, rank, want)` takes up to `want` claimable
    members and returns how many it took."""
    taken = 0
    for rank in (LIVE, BACKGROUND, RECONCILE):
        open_ = list(audience_ids)
        while open_ and taken < limit:
            share = -(-(limit - taken) // len(open_))
            still_open = []
            for audience_id in open_:
                want = min(share, limit - taken)
                if want == 0:
                    break
                got = take(audience_id, rank, want)
                taken += got
                if got == want:
                    still_open.append(audience_id)
            open_ = still_open


# SQLite: Python's sqlite3 gives the GIL up around each step of a statement, that is for each
# row read or returned, and the event loop's thread takes it meanwhile: a claim's thousands of
# rows cost a GIL hand-over each, under the write lock. These statements take or read a whole
# share in one step (rowids and rows aggregated into one JSON value).
_SQLITE_PICK = (
    "SELECT json_group_array(rowid) FROM (SELECT rowid FROM members"
    " WHERE audience_id = ? AND due_rank = ? AND due_since IS NOT NULL"
    " AND job_request_id IS NULL AND (claimed_until IS NULL OR claimed_until <= ?)"
    " ORDER BY due_since, external_user_id LIMIT ?)"
)
_SQLITE_LEASE = (
    "UPDATE members SET claimed_by = ?, claim_token = ?, claimed_until = ?"
    " WHERE rowid IN (SELECT value FROM json_each(?))"
)
_SQLITE_HELD = (
    "SELECT json_group_array(json_array(external_user_id, action, hex(digest))) FROM members"
    " WHERE audience_id = ? AND claim_token = ? AND external_user_id IN"
    " (SELECT value FROM json_each(?))"
)
_STAGED_COLUMNS = (
    "audience_id",
    "external_user_id",
    "action",
    "record",
    "digest",
    "occurred_at",
    "position",
)
_SQLITE_STAGING = (
    "CREATE TEMP TABLE IF NOT EXISTS staged_changes (audience_id INTEGER, external_user_id TEXT,"
    " action TEXT, record BLOB, digest BLOB, occurred_at REAL, position INTEGER,"
    " applies INTEGER)"
)
staged = Table(  # one transaction's changes to record (SQLite), per connection
    "staged_changes",
    MetaData(),
    *(Column(name, members.c[name].type) for name in _STAGED_COLUMNS),
    Column("applies", Boolean),
)


@functools.cache
def _stage_statement(rows: int) -> str:
    row = "(" + ", ".join("?" * len(_STAGED_COLUMNS)) + ")"
    names = ", ".join(_STAGED_COLUMNS)
    return f"INSERT INTO staged_changes ({names}) VALUES " + ", ".join([row] * rows)


_IDS = select(func.json_each(bindparam("ids")).table_valued("value").c.value).scalar_subquery()
_CLAIMED_PER_READ = 500
# The records come apart from the rest, joined by a byte no UTF-8 text holds: as strings in
# the JSON value they were escaped there and unescaped here (twice the read's cost). One pass
# over the rows feeds both aggregates, in the same order.
_SQLITE_CLAIMED = (
    "SELECT json_group_array(json_array(audience_id, external_user_id, action,"
    " hex(digest), due_rank, occurred_at)), CAST(group_concat(record, x'ff') AS BLOB)"
    " FROM members WHERE rowid IN (SELECT value FROM json_each(?))"
)
_RECORD_SEPARATOR = b"\xff"


def _claim_rowids(
    conn: Connection,
    audience_ids: list[int],
    limit: int,
    now: float,
    lease_s: float,
    owner: str,
    token: str,
) -> list[Claim]:
    """SQLite's claim (under the write lock: no other writer between reading and leasing):
    each share leased as it is picked, so the next round's reads skip it."""
    rowids: list[int] = []

    def take(audience_id: int, rank: int, want: int) -> int:
        picked = conn.exec_driver_sql(_SQLITE_PICK, (audience_id, rank, now, want)).scalar_one()
        if picked == "[]":
            return 0
        conn.exec_driver_sql(_SQLITE_LEASE, (owner, token, now + lease_s, picked))
        ids = orjson.loads(picked)
        rowids.extend(ids)
        return len(ids)

    _share_out(audience_ids, limit, take)
    claims: list[Claim] = []
    for chunk in _chunks(rowids, _CLAIMED_PER_READ):  # bounds the JSON held at once
        rows, records = conn.exec_driver_sql(_SQLITE_CLAIMED, (orjson.dumps(chunk).decode(),)).one()
        if records is None:  # no row (none can go between the lease and this read)
            continue
        claims.extend(
            _claim((a, euid, action, record, bytes.fromhex(digest), rank, at), token)
            for (a, euid, action, digest, rank, at), record in zip(
                orjson.loads(rows), records.split(_RECORD_SEPARATOR), strict=True
            )
        )
    return claims


def _without_consent_ips(update_sent: Any, claims: Sequence[Claim]) -> Any:
    """PostgreSQL: `update_sent` of the rows of `claims`, which also forgets the consent IPs
    they carried (`MemberTable._forget_consent_ips`) in the same row versions: where the row
    still holds the claimed record, it gets the record without its IP. Claims without one
    (most) keep the plain statement: their ids as one array."""
    ids = [c.external_user_id for c in claims]
    bare = [without_consent_ip(c.record) for c in claims]
    with_ip = [new is not c.record for new, c in zip(bare, claims, strict=True)]
    if not any(with_ip):
        return update_sent.where(m.c.external_user_id == any_(bindparam("ids", ids, _IDS_ARRAY)))
    old = [c.record if ip else None for c, ip in zip(claims, with_ip, strict=True)]
    new = [record if ip else None for record, ip in zip(bare, with_ip, strict=True)]
    sent = (  # a NULL old record (no IP) matches no row: the record stays
        func.unnest(
            bindparam("ids", ids, _IDS_ARRAY),
            bindparam("old", old, _RECORDS_ARRAY),
            bindparam("new", new, _RECORDS_ARRAY),
        )
        .table_valued("external_user_id", "old", "new")
        .render_derived(name="sent")
    )
    return update_sent.values(
        record=case((m.c.record == sent.c.old, sent.c.new), else_=m.c.record)
    ).where(m.c.external_user_id == sent.c.external_user_id)


def _claim(row: Any, token: str) -> Claim:
    audience_id, euid, action, record, digest, rank, at = row
    return Claim(
        int(audience_id), euid, action, bytes(record), bytes(digest), token, rank > 0, float(at)
    )


def _claim_groups(claims: Iterable[Claim]) -> dict[tuple[int, str], list[Claim]]:
    groups: dict[tuple[int, str], list[Claim]] = defaultdict(list)
    for claim in claims:
        groups[(claim.audience_id, claim.token)].append(claim)
    return groups


def _settle(
    now: float, outcome: str, reason: str | None, *, accepted: bool, retry: bool = False
) -> dict[str, Any]:
    """Column values ending a member's job: due again if `retry` or its desired state changed
    meanwhile; `accepted` starts an add's TTL clock at its 202."""
    values: dict[str, Any] = {
        "job_request_id": None,
        "outcome": outcome,
        "reason": reason,
        "due_since": now if retry else case((_differs(), now), else_=None),
    }
    if accepted:
        values["accepted_at"] = case((m.c.sent_action == ADD, m.c.sent_at), else_=None)
        values["attempts"] = 0
    else:
        values["accepted_at"] = None
        values["attempts"] = m.c.attempts + 1 if outcome == FAILED else m.c.attempts
    return values


def _dead_columns() -> tuple[Any, ...]:
    return (
        m.c.audience_id,
        m.c.external_user_id,
        m.c.sent_action,
        m.c.record,
        _differs(),
    )


def _dead(row: Any, reason: str) -> DeadMember:
    audience_id, euid, sent_action, record, differs = row
    return DeadMember(audience_id, euid, sent_action, None if differs else bytes(record), reason)


def _never_sent() -> ColumnElement[bool]:
    """No POST of the member was accepted, none is pending, and none may have gone: no claim is
    left on the row (a sender's claim stays until its POST is answered or it gives the claim
    back; one that ran out may have POSTed and died before the answer)."""
    return and_(
        m.c.sent_action.is_(None), m.c.job_request_id.is_(None), m.c.claimed_until.is_(None)
    )


def _held_columns() -> tuple[Any, ...]:
    invalid = and_(m.c.outcome == INVALID, m.c.job_request_id.is_(None), ~_differs())
    return (
        m.c.external_user_id,
        m.c.action,
        m.c.digest,
        m.c.occurred_at,
        m.c.position,
        case((_never_sent(), True), else_=False),
        case((invalid, True), else_=False),
    )


def _held(row: Any, record: bytes | None = None) -> HeldMember:
    euid, action, digest, occurred_at, position, never_sent, invalid = row[:7]
    return HeldMember(
        euid,
        action,
        bytes(digest),
        float(occurred_at),
        int(position),
        bool(never_sent),
        bool(invalid),
        record,
    )


def _reconcile_update(action: str, now: float) -> Any:
    """The UPDATE of one reconcile write (executemany: a, e, r, d, at). Due at RECONCILE rank
    unless a job is pending, the new state equals what Amazon holds, or (a remove) Amazon was
    never sent the member; a row due already keeps its due time and a lower rank."""
    same_as_sent = and_(
        m.c.sent_action == action,
        m.c.sent_digest == bindparam("d"),
        or_(m.c.outcome == CONFIRMED, m.c.outcome == INVALID),  # no IN: an executemany
    )
    nothing_to_send = or_(same_as_sent, _never_sent()) if action == REMOVE else same_as_sent
    return (
        update(m)
        .where(m.c.audience_id == bindparam("a"), m.c.external_user_id == bindparam("e"))
        .values(
            action=action,
            record=bindparam("r"),
            digest=bindparam("d"),
            occurred_at=bindparam("at"),
            position=RECONCILE_POSITION,
            attempts=0,
            due_since=case(
                (m.c.job_request_id.is_not(None), None),
                (nothing_to_send, None),
                else_=func.coalesce(m.c.due_since, now),
            ),
            due_rank=case(
                (and_(m.c.due_since.is_not(None), m.c.due_rank < RECONCILE), m.c.due_rank),
                else_=RECONCILE,
            ),
        )
    )
