"""The store on SQLite with an injected clock. tests/integration/test_store_postgres.py runs the
same tests against PostgreSQL by overriding the `store_db_url` fixture."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from alembic import command
from alembic.script import ScriptDirectory
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import func, insert, inspect, select, text
from sqlalchemy.engine import Connection
from sqlalchemy.exc import DBAPIError

from syncd import cli
from syncd.amazon.api import InvalidRecord, JobStatus
from syncd.errors import SchemaOutdatedError
from syncd.store import JobRow, NewJob, Store
from syncd.store import store as store_mod
from syncd.store.commands import upgrade_store
from syncd.store.schema import jobs
from syncd.store.store import SCHEMA_REVISION, alembic_config
from tests.fakes import T0, FakeClock
from tests.fixtures.store import migrate


def new_job(job_id: str, records: int = 10, connection: str = "conn-1") -> NewJob:
    return NewJob(job_id, connection, 413642381039213536, "vip", records, records - 3, 3)


async def claimed(store: Store, owner: str = "a") -> dict[str, JobRow]:
    """Claim every due job; {job_request_id: the claim}."""
    return {j.job_request_id: j for j in await store.claim_due_jobs(owner, 1000, 60)}


# the revision of the newest file in migrations/versions/ (named NNNN_*.py)
NEWEST_MIGRATION = max(
    p.name[:4] for p in (Path(store_mod.__file__).parent / "migrations" / "versions").glob("0*.py")
)
OLDER = f"{int(SCHEMA_REVISION) - 1:04d}"  # the revision before the newest


# -- schema --------------------------------------------------------------------------------------
async def test_an_empty_database_gets_the_schema_an_outdated_one_only_with_auto_upgrade(
    store_db_url: str,
) -> None:
    """No schema at all: nothing can be using the store, so creating it is safe (a first
    `syncd run` needs no `syncd db upgrade`). A schema at an older revision may be in use by
    older pods: it is upgraded only when asked (`syncd db upgrade`, store.auto_upgrade)."""
    s = await Store.connect(store_db_url)
    try:
        current, head = await s.schema_status()
        assert current is None
        assert head == NEWEST_MIGRATION
        await s.ensure_schema(auto_upgrade=False)
        assert await s.schema_status() == (head, head)
        async with s._engine.begin() as conn:
            await conn.run_sync(migrate(OLDER, down=True))
        with pytest.raises(SchemaOutdatedError) as err:
            await s.ensure_schema(auto_upgrade=False)
        assert f"at revision {OLDER}" in str(err.value)
        assert "syncd db upgrade" in str(err.value)
        assert "store.auto_upgrade" in str(err.value)
        await s.ensure_schema(auto_upgrade=True)
        assert await s.schema_status() == (head, head)
        await s.ensure_schema(auto_upgrade=False)  # now current: no error
        await s.upgrade()  # idempotent
        assert await s.schema_status() == (head, head)
    finally:
        await s.close()


async def test_a_store_a_newer_release_migrated_is_refused_by_name(store_db_url: str) -> None:
    """Not "run syncd db upgrade" (this release cannot): the store is ahead of the code. A
    version table with two revisions (not syncd's linear migrations) is refused too."""
    s = await Store.connect(store_db_url)
    try:
        await s.upgrade()
        newer = f"{int(SCHEMA_REVISION) + 1:04d}"
        async with s._engine.begin() as conn:
            await conn.execute(text("UPDATE alembic_version SET version_num = :v"), {"v": newer})
        for auto_upgrade in (False, True):
            with pytest.raises(SchemaOutdatedError) as err:
                await s.ensure_schema(auto_upgrade=auto_upgrade)
            assert f"at revision {newer}, newer than this syncd's ({SCHEMA_REVISION})" in str(
                err.value
            )
        async with s._engine.begin() as conn:
            await conn.execute(text("INSERT INTO alembic_version VALUES ('0001')"))
        with pytest.raises(SchemaOutdatedError, match="holds 2 revisions"):
            await s.schema_status()
    finally:
        await s.close()


async def test_explicit_upgrade_then_a_new_store_accepts_the_schema(store_db_url: str) -> None:
    s = await Store.connect(store_db_url)
    await s.upgrade()
    await s.close()
    again = await Store.connect(store_db_url)
    try:
        await again.ensure_schema(auto_upgrade=False)
    finally:
        await again.close()


async def test_the_migrations_make_the_schema_the_code_declares(store_db_url: str) -> None:
    """The tables, columns, types and indexes the migrations leave are those of
    `syncd/store/schema.py` (a table or index changed there needs its migration)."""
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    from syncd.store.schema import metadata

    s = await Store.connect(store_db_url)
    try:
        await s.upgrade()
        async with s._engine.connect() as conn:
            diffs = await conn.run_sync(
                lambda sync: compare_metadata(
                    MigrationContext.configure(sync, opts={"compare_type": True}), metadata
                )
            )
    finally:
        await s.close()
    assert diffs == []


def test_schema_revision_is_the_newest_migration() -> None:
    """The revision the daemon checks for without alembic is the head of the shipped scripts."""
    assert ScriptDirectory.from_config(alembic_config()).get_heads() == [SCHEMA_REVISION]


def test_a_store_at_head_is_checked_without_loading_alembic(tmp_path: Path) -> None:
    """`syncd run` on a store already upgraded (`syncd db upgrade`, as the chart runs it) never
    imports alembic: ~11 MB of the daemon's memory. The command line loads every command."""
    url = f"sqlite+aiosqlite:///{tmp_path / 'syncd.db'}"
    asyncio.run(upgrade_store(url))
    script = (
        "import asyncio, sys\n"
        "import syncd.app, syncd.cli\n"
        "syncd.cli.build_parser()\n"
        "from syncd.store import Store\n"
        "async def main():\n"
        f"    store = await Store.connect({url!r})\n"
        "    await store.ensure_schema(auto_upgrade=False)\n"
        "    print(await store.schema_status())\n"
        "    await store.close()\n"
        "asyncio.run(main())\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'alembic'))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True
    ).stdout
    assert out.splitlines() == [str((SCHEMA_REVISION, SCHEMA_REVISION)), "[]"]


async def test_ping(store: Store, tmp_path: Path) -> None:
    assert await store.ping() is True
    broken = await Store.connect(f"sqlite+aiosqlite:///{tmp_path / 'missing' / 'dir' / 'x.db'}")
    try:
        assert await broken.ping() is False
    finally:
        await broken.close()


# -- commands ------------------------------------------------------------------------------------
def test_jobs_on_a_new_store_lists_none(
    store_db_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "syncd.toml"
    config.write_text(f'[store]\nurl = "{store_db_url}"\n')
    assert cli.main(["jobs", "--config", str(config), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"counts": {}, "jobs": []}


def test_db_upgrade_then_jobs_command(
    store_db_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "syncd.toml"
    config.write_text(f'[store]\nurl = "{store_db_url}"\n')
    assert cli.main(["db", "upgrade", "--config", str(config)]) == 0
    assert f"upgraded from empty to revision {NEWEST_MIGRATION}" in capsys.readouterr().out
    assert cli.main(["db", "upgrade", "--config", str(config)]) == 0
    assert f"already at revision {NEWEST_MIGRATION}" in capsys.readouterr().out

    async def fill() -> None:
        s = await Store.connect(store_db_url)
        try:
            for i in range(3):
                await s.add_job(new_job(f"job-{i}"), first_poll_after_s=0)
            claims = await claimed(s)
            done = JobStatus("job-1", "SUCCEEDED", 99.0, (InvalidRecord("p", "BAD_HASH"),))
            await s.record_poll(claims["job-1"], done, next_poll_in_s=0)
        finally:
            await s.close()

    asyncio.run(fill())
    assert cli.main(["jobs", "--config", str(config), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["counts"] == {"PENDING": 2, "SUCCEEDED": 1}
    assert {j["job_request_id"] for j in doc["jobs"]} == {"job-0", "job-1", "job-2"}
    for state in ("SUCCEEDED", "succeeded"):
        assert cli.main(["jobs", "--config", str(config), "--json", "--state", state]) == 0
        [job] = json.loads(capsys.readouterr().out)["jobs"]
        assert (job["job_request_id"], job["invalid_reasons"]) == ("job-1", {"invalid_pii": 1})
    for flag, value in (
        ("--state", "BOGUS"),
        ("--limit", "0"),
        ("--limit", "-1"),
        ("--limit", "99999999999999999999"),
    ):
        assert cli.main(["jobs", "--config", str(config), flag, value]) == 2
        assert f"argument {flag}" in capsys.readouterr().err
    assert cli.main(["jobs", "--config", str(config)]) == 0
    table = capsys.readouterr().out
    assert "Jobs by state" in table
    assert "invalid_pii" in table
    assert "job-2" in table


# -- jobs ----------------------------------------------------------------------------------------
async def test_add_job_is_idempotent(store: Store, clock: FakeClock) -> None:
    await store.add_job(new_job("job-1", records=10), first_poll_after_s=30)
    clock.advance(5)
    await store.add_job(new_job("job-1", records=99), first_poll_after_s=1)
    [row] = await store.list_jobs()
    assert row.records == 10
    assert row.created_at == T0
    assert row.next_poll_at == T0 + 30
    assert row.state == "PENDING"
    assert row.polls == 0
    assert row.invalid_reasons == {}
    assert await store.job_counts() == {"PENDING": 1}


async def test_claim_only_due_jobs_and_respect_the_lease(store: Store, clock: FakeClock) -> None:
    await store.add_job(new_job("early"), first_poll_after_s=10)
    await store.add_job(new_job("late"), first_poll_after_s=20)
    assert await store.claim_due_jobs("a", 10, lease_s=60) == []
    assert await store.next_due_in() == 10

    clock.advance(10)
    assert [j.job_request_id for j in await store.claim_due_jobs("a", 10, 60)] == ["early"]
    clock.advance(10)
    # "early" is leased to a; only "late" is free
    claimed = await store.claim_due_jobs("b", 10, 60)
    assert [(j.job_request_id, j.owner, j.claimed_until) for j in claimed] == [
        ("late", "b", T0 + 80)
    ]
    assert await store.claim_due_jobs("c", 10, 60) == []
    assert await store.next_due_in() == 50  # a's lease on "early" ends at T0 + 70

    clock.advance(50)  # a's lease ran out (a crashed): someone else may take the job
    assert [j.job_request_id for j in await store.claim_due_jobs("c", 10, 60)] == ["early"]


async def test_claim_limit_takes_the_most_overdue_first(store: Store, clock: FakeClock) -> None:
    for i in range(5):
        await store.add_job(new_job(f"job-{i}"), first_poll_after_s=10 - i)
    clock.advance(10)
    first = await store.claim_due_jobs("a", 2, 60)
    assert [j.job_request_id for j in first] == ["job-4", "job-3"]
    rest = await store.claim_due_jobs("a", 10, 60)
    assert [j.job_request_id for j in rest] == ["job-2", "job-1", "job-0"]


async def test_record_pending_poll_releases_claim_and_reschedules(
    store: Store, clock: FakeClock
) -> None:
    await store.add_job(new_job("job-1"), first_poll_after_s=0)
    [job] = await store.claim_due_jobs("a", 10, 60)
    clock.advance(1)
    assert await store.record_poll(job, JobStatus("job-1", "PENDING"), next_poll_in_s=30)
    [row] = await store.list_jobs()
    assert (row.state, row.polls, row.owner, row.claimed_until) == ("PENDING", 1, None, None)
    assert row.last_polled_at == T0 + 1
    assert row.next_poll_at == T0 + 31
    clock.advance(29.5)
    assert await store.claim_due_jobs("b", 10, 60) == []
    clock.advance(0.5)
    assert [j.polls for j in await store.claim_due_jobs("b", 10, 60)] == [1]


async def test_failed_poll_keeps_error_summary(store: Store, clock: FakeClock) -> None:
    await store.add_job(new_job("job-1"), first_poll_after_s=0)
    [job] = await store.claim_due_jobs("a", 10, 60)
    await store.record_poll(job, None, next_poll_in_s=60, error="HTTP 503 " + "x" * 900)
    [row] = await store.list_jobs()
    assert row.state == "PENDING"
    assert row.polls == 1
    assert row.error is not None
    assert row.error.startswith("HTTP 503")
    assert len(row.error) == 500


async def test_terminal_job_is_never_claimed_again(store: Store, clock: FakeClock) -> None:
    await store.add_job(new_job("job-1", records=6000), first_poll_after_s=0)
    [job] = await store.claim_due_jobs("a", 10, 60)
    clock.advance(42)
    status = JobStatus(
        "job-1",
        "PARTIALLYSUCCEEDED",
        processed_rate=99.5,
        invalid_records=(
            InvalidRecord("cdp-user-7", "INVALID_HASHED_PII: cdp-user-7 has no identifier"),
            InvalidRecord("cdp-user-8", "INVALID_HASHED_PII: cdp-user-8 has no identifier"),
            InvalidRecord(None, "MISSING_COUNTRY"),
        ),
        received_record_size=6000,
        dsp_audience_size=120000,
    )
    assert await store.record_poll(job, status, next_poll_in_s=30)
    [row] = await store.list_jobs()
    assert row.terminal
    assert row.state == "PARTIALLYSUCCEEDED"
    assert row.terminal_at == T0 + 42
    assert row.processed_rate == 99.5
    assert row.invalid_records == 3
    assert row.invalid_reasons == {"invalid_pii": 2, "invalid_country": 1}
    assert row.audience_size == 120000
    assert row.received_records == 6000
    assert "cdp-user" not in repr(row)  # external ids are not stored

    clock.advance(10 * 86400)
    assert await store.claim_due_jobs("b", 10, 60) == []
    assert await store.next_due_in() is None
    # a late answer from a poll that raced with the terminal one does not revive the job
    assert not await store.record_poll(job, JobStatus("job-1", "PENDING"), next_poll_in_s=0)
    assert not await store.record_poll(job, JobStatus("job-1", "FAILED"), next_poll_in_s=0)
    assert await store.job_states(["job-1"]) == {"job-1": "PARTIALLYSUCCEEDED"}
    assert await store.job_counts() == {"PARTIALLYSUCCEEDED": 1}
    assert await store.claim_due_jobs("b", 10, 60) == []


async def test_expire_old_pending_jobs(store: Store, clock: FakeClock) -> None:
    await store.add_job(new_job("old"), first_poll_after_s=0)
    await store.add_job(new_job("done"), first_poll_after_s=0)
    claims = await claimed(store)
    await store.record_poll(claims["done"], JobStatus("done", "SUCCEEDED"), next_poll_in_s=0)
    clock.advance(50)
    await store.add_job(new_job("young"), first_poll_after_s=0)
    clock.advance(50)
    assert await store.expire_jobs(max_age_s=100) == 1
    assert await store.expire_jobs(max_age_s=100) == 0
    assert await store.job_states(["old", "done", "young"]) == {
        "old": "EXPIRED",
        "done": "SUCCEEDED",
        "young": "PENDING",
    }
    [expired] = await store.list_jobs(state="EXPIRED")
    assert expired.terminal_at == T0 + 100
    assert [j.job_request_id for j in await store.claim_due_jobs("b", 10, 60)] == ["young"]
    assert await store.job_counts() == {"EXPIRED": 1, "PENDING": 1, "SUCCEEDED": 1}


async def test_list_jobs_newest_first_with_state_filter_and_limit(
    store: Store, clock: FakeClock
) -> None:
    for i in range(4):
        await store.add_job(new_job(f"job-{i}"), first_poll_after_s=0)
        clock.advance(1)
    claims = await claimed(store)
    await store.record_poll(claims["job-1"], JobStatus("job-1", "FAILED"), next_poll_in_s=0)
    assert [j.job_request_id for j in await store.list_jobs(limit=3)] == [
        "job-3",
        "job-2",
        "job-1",
    ]
    assert [j.job_request_id for j in await store.list_jobs(state="PENDING")] == [
        "job-3",
        "job-2",
        "job-0",
    ]
    assert [j.job_request_id for j in await store.list_jobs(state="FAILED")] == ["job-1"]


async def test_job_states_of_many_ids(store: Store) -> None:
    ids = [f"job-{i}" for i in range(1200)]
    for job_id in ids[::100]:
        await store.add_job(new_job(job_id), first_poll_after_s=0)
    states = await store.job_states([*ids, "unknown", ids[0]])
    assert states == dict.fromkeys(ids[::100], "PENDING")


async def test_concurrent_claims_never_share_a_job(store: Store, clock: FakeClock) -> None:
    for i in range(60):
        await store.add_job(new_job(f"job-{i}"), first_poll_after_s=0)
    results = await asyncio.gather(*(store.claim_due_jobs(f"o{i}", 7, 60) for i in range(12)))
    claimed = [j.job_request_id for batch in results for j in batch]
    assert len(claimed) == len(set(claimed)) == 60


# -- budget --------------------------------------------------------------------------------------
async def test_reserve_until_the_limit_then_wait_for_the_oldest(
    store: Store, clock: FakeClock
) -> None:
    first, wait = await store.reserve("c", 600, limit=1000, window_s=100)
    assert first is not None
    assert wait == 0
    await store.confirm(first)
    clock.advance(10)
    second, _ = await store.reserve("c", 400, limit=1000, window_s=100)
    assert second is not None
    await store.confirm(second)
    assert await store.budget_used("c", 100) == 1000
    assert await store.budget_used("other", 100) == 0

    clock.advance(20)
    refused, wait = await store.reserve("c", 1, limit=1000, window_s=100)
    assert refused is None
    assert wait == 70  # the first reservation leaves the window at T0 + 100
    refused, wait = await store.reserve("c", 700, limit=1000, window_s=100)
    assert (refused, wait) == (None, 80)  # both must leave: the second at T0 + 110
    other, _ = await store.reserve("other", 1000, limit=1000, window_s=100)
    assert other is not None  # connections have separate budgets

    clock.advance(70)
    assert await store.budget_used("c", 100) == 400
    third, wait = await store.reserve("c", 600, limit=1000, window_s=100)
    assert third is not None
    assert wait == 0


async def test_a_post_in_flight_longer_than_two_windows_still_counts(
    store: Store, clock: FakeClock
) -> None:
    """An unconfirmed reservation (its POST in flight, retrying) counts until its POST can no
    longer land plus a window: `hold_s` (the longest a POST stays in flight), not two windows,
    when that is longer. Else a small window lets a late 202 land beside a full window."""
    rid, _ = await store.reserve("c", 1000, limit=1000, window_s=10, hold_s=300)
    assert rid is not None
    clock.advance(250)  # 25 windows later, the POST still retrying
    assert (await store.reserve("c", 1, 1000, 10, hold_s=300))[0] is None
    assert await store.budget_used("c", 10, hold_s=300) == 1000
    clock.advance(60)  # past hold + window: it can no longer land in the window
    assert await store.budget_used("c", 10, hold_s=300) == 0
    assert (await store.reserve("c", 1000, 1000, 10, hold_s=300))[0] is not None


async def test_release_frees_the_reservation(store: Store) -> None:
    rid, _ = await store.reserve("c", 1000, limit=1000, window_s=100)
    assert rid is not None
    assert (await store.reserve("c", 1, 1000, 100))[0] is None
    await store.release(rid)
    assert await store.budget_used("c", 100) == 0
    assert (await store.reserve("c", 1000, 1000, 100))[0] is not None


async def test_confirm_restamps_at_send_time(store: Store, clock: FakeClock) -> None:
    rid, _ = await store.reserve("c", 1000, limit=1000, window_s=100)
    assert rid is not None
    clock.advance(30)
    await store.confirm(rid)
    clock.advance(99)
    assert (await store.reserve("c", 1, 1000, 100)) == (None, 1)  # counts from T0 + 30
    clock.advance(1)
    assert (await store.reserve("c", 1, 1000, 100))[0] is not None


async def test_unconfirmed_reservation_counts_for_two_windows(
    store: Store, clock: FakeClock
) -> None:
    rid, _ = await store.reserve("c", 1000, limit=1000, window_s=100)
    assert rid is not None
    clock.advance(150)  # the POST is still in flight (or its outcome unknown)
    assert await store.reserve("c", 1, 1000, 100) == (None, 50)
    clock.advance(50)
    assert (await store.reserve("c", 1, 1000, 100))[0] is not None


async def test_reservation_larger_than_the_limit_is_an_error(store: Store) -> None:
    with pytest.raises(ValueError, match="never fit"):
        await store.reserve("c", 1001, limit=1000, window_s=100)


async def test_old_reservations_are_pruned(store: Store, clock: FakeClock) -> None:
    for _ in range(5):
        rid, _ = await store.reserve("c", 10, 1000, 100)
        assert rid is not None
        await store.confirm(rid)
    clock.advance(200)
    assert (await store.reserve("c", 10, 1000, 100))[0] is not None
    # seen through a longer window, only the newest row is left: the old ones were deleted
    assert await store.budget_used("c", 1000) == 10


async def test_concurrent_reservations_never_exceed_the_limit(store: Store) -> None:
    sizes = [37, 120, 5, 250, 64, 99, 180, 1, 333, 77] * 5
    results = await asyncio.gather(*(store.reserve("c", n, 1000, 3600) for n in sizes))
    granted = [n for n, (rid, _) in zip(sizes, results, strict=True) if rid is not None]
    refused = [n for n, (rid, _) in zip(sizes, results, strict=True) if rid is None]
    assert sum(granted) == await store.budget_used("c", 3600)
    assert sum(granted) <= 1000
    assert refused
    assert all(sum(granted) + n > 1000 for n in refused)  # nothing refused that would fit


OPS = st.lists(
    st.one_of(
        st.tuples(st.just("reserve"), st.integers(1, 100)),
        st.tuples(st.just("advance"), st.integers(0, 40)),
        st.tuples(st.just("confirm"), st.integers(0, 10)),
        st.tuples(st.just("release"), st.integers(0, 10)),
    ),
    max_size=40,
)


@settings(
    max_examples=50,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(ops=OPS)
async def test_rolling_window_never_exceeded_and_waits_are_exact(
    store: Store, clock: FakeClock, ops: list[tuple[str, int]]
) -> None:
    """Any mix of reservations, confirmations, releases and time, against a model: a
    reservation is granted exactly when it fits, a refusal's wait is exactly when it would fit,
    and the records sent (confirmed) in any window never exceed the limit."""
    window, limit = 60, 100
    conn = uuid.uuid4().hex  # a fresh connection per example; the store is shared
    rows: dict[int, tuple[int, float, bool]] = {}  # id -> (records, stamped at, confirmed)
    in_flight: list[int] = []
    sent: list[tuple[float, int]] = []  # (confirmed at, records)

    def leaves(row: tuple[int, float, bool]) -> float:
        return row[1] + (window if row[2] else 2 * window)

    async def confirm(index: int) -> None:
        rid = in_flight.pop(index)
        await store.confirm(rid)
        rows[rid] = (rows[rid][0], clock.now, True)
        sent.append((clock.now, rows[rid][0]))

    for op, arg in ops:
        if op == "reserve":
            counted = sorted((leaves(r), r[0]) for r in rows.values() if leaves(r) > clock.now)
            used = sum(n for _, n in counted)
            rid, wait = await store.reserve(conn, arg, limit, window)
            assert await store.budget_used(conn, window) == used + (arg if rid else 0)
            if used + arg <= limit:
                assert rid is not None
                assert wait == 0
                rows[rid] = (arg, clock.now, False)
                in_flight.append(rid)
                continue
            assert rid is None
            freed = 0
            for leave_at, n in counted:
                freed += n
                if used + arg - freed <= limit:
                    assert wait == leave_at - clock.now
                    break
        elif op == "advance":
            # POSTs take less than a window: confirm the ones that would otherwise outlast it
            while in_flight and clock.now + arg - rows[in_flight[0]][1] >= window:
                await confirm(0)
            clock.advance(arg)
        elif in_flight:
            if op == "confirm":
                await confirm(arg % len(in_flight))
            else:
                rid = in_flight.pop(arg % len(in_flight))
                del rows[rid]
                await store.release(rid)
    for end, _ in sent:
        assert sum(n for t, n in sent if end - window < t <= end) <= limit


# -- claims, counts, retention -------------------------------------------------------------------
async def test_a_stale_claim_cannot_overwrite_a_newer_one(store: Store, clock: FakeClock) -> None:
    """A poller whose lease ran out and whose job was claimed again stores nothing but a
    terminal state (the first terminal state stored wins)."""
    await store.add_job(new_job("job-1"), first_poll_after_s=0)
    [stale] = await store.claim_due_jobs("a", 10, 60)
    clock.advance(61)
    [newer] = await store.claim_due_jobs("b", 10, 60)
    assert not await store.record_poll(stale, JobStatus("job-1", "PENDING"), next_poll_in_s=0)
    assert not await store.record_poll(stale, None, next_poll_in_s=0, error="HTTP 503")
    [row] = await store.list_jobs()
    assert (row.owner, row.polls, row.error) == ("b", 0, None)
    assert await store.record_poll(newer, JobStatus("job-1", "PENDING"), next_poll_in_s=0)
    [third] = await store.claim_due_jobs("c", 10, 60)
    assert await store.record_poll(stale, JobStatus("job-1", "SUCCEEDED"), next_poll_in_s=0)
    assert not await store.record_poll(third, JobStatus("job-1", "PENDING"), next_poll_in_s=0)
    assert not await store.record_poll(third, JobStatus("job-1", "FAILED"), next_poll_in_s=0)
    assert await store.job_states(["job-1"]) == {"job-1": "SUCCEEDED"}
    assert await store.job_counts() == {"SUCCEEDED": 1}


async def scanned_counts(store: Store) -> dict[str, int]:
    """Jobs per state, counted the slow way (a scan), to check the kept counts against."""
    async with store._engine.connect() as conn:
        result = await conn.execute(
            select(jobs.c.state, func.count()).group_by(jobs.c.state).order_by(jobs.c.state)
        )
        return {row[0]: int(row[1]) for row in result}


async def test_job_counts_follow_adds_ends_expiry_and_deletion(
    store: Store, clock: FakeClock
) -> None:
    for i in range(6):
        await store.add_job(new_job(f"job-{i}"), first_poll_after_s=0)
    await store.add_job(new_job("job-0"), first_poll_after_s=0)  # already stored: not counted
    assert await store.job_counts() == {"PENDING": 6} == await scanned_counts(store)
    claims = await claimed(store)
    for job_id, state in [("job-0", "SUCCEEDED"), ("job-1", "FAILED"), ("job-2", "SUCCEEDED")]:
        assert await store.record_poll(claims[job_id], JobStatus(job_id, state), next_poll_in_s=0)
    await store.record_poll(claims["job-3"], JobStatus("job-3", "PENDING"), next_poll_in_s=0)
    clock.advance(100)
    assert await store.expire_jobs(max_age_s=50) == 3
    expected = {"EXPIRED": 3, "FAILED": 1, "SUCCEEDED": 2}
    assert await store.job_counts() == expected == await scanned_counts(store)
    assert await store.purge_jobs(older_than_s=50) == 3  # terminal at T0: past retention
    assert await store.job_counts() == {"EXPIRED": 3} == await scanned_counts(store)


async def test_terminal_jobs_are_deleted_after_their_retention_only(
    store: Store, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(store_mod, "_PURGE_BATCH", 2)
    for i in range(5):
        await store.add_job(new_job(f"old-{i}"), first_poll_after_s=0)
    await store.add_job(new_job("pending"), first_poll_after_s=10**9)
    claims = await claimed(store)
    for i in range(5):
        await store.record_poll(claims[f"old-{i}"], JobStatus("x", "SUCCEEDED"), next_poll_in_s=0)
    clock.advance(1000)
    await store.add_job(new_job("young"), first_poll_after_s=0)
    [young] = await store.claim_due_jobs("a", 10, 60)
    await store.record_poll(young, JobStatus("young", "FAILED"), next_poll_in_s=0)
    assert await store.purge_jobs(older_than_s=1000) == 2  # a bounded batch per call
    assert await store.purge_jobs(older_than_s=1000) == 2
    assert await store.purge_jobs(older_than_s=1000) == 1
    assert await store.purge_jobs(older_than_s=1000) == 0
    # a PENDING job is never deleted, however old; a job terminal for less than 1000 s stays
    assert {j.job_request_id for j in await store.list_jobs()} == {"pending", "young"}
    assert await store.job_counts() == {"FAILED": 1, "PENDING": 1}


async def test_upgrading_a_store_with_jobs_counts_them_and_indexes_terminal_at(
    store_db_url: str, clock: FakeClock
) -> None:
    """A store at revision 0001 (before job counts) with jobs in it, upgraded to head."""
    s = await Store.connect(store_db_url, clock=clock)
    try:

        def to_0001(sync: Connection) -> None:
            cfg = alembic_config()
            cfg.attributes["connection"] = sync
            command.upgrade(cfg, "0001")

        async with s._engine.begin() as conn:
            await conn.run_sync(to_0001)
            for i, state in enumerate(["PENDING", "PENDING", "SUCCEEDED", "FAILED", "SUCCEEDED"]):
                await conn.execute(
                    insert(jobs).values(
                        job_request_id=f"job-{i}",
                        connection_id="c",
                        audience_id=7,
                        audience="vip",
                        records=1,
                        adds=1,
                        removes=0,
                        state=state,
                        created_at=T0,
                        next_poll_at=T0,
                        polls=0,
                        invalid_records=0,
                        invalid_reasons={},
                    )
                )
        assert await s.schema_status() == ("0001", SCHEMA_REVISION)
        await s.ensure_schema(auto_upgrade=True)
        assert await s.job_counts() == {"FAILED": 1, "PENDING": 2, "SUCCEEDED": 2}
        async with s._engine.connect() as conn:
            indexes = await conn.run_sync(lambda sync: inspect(sync).get_indexes("jobs"))
        assert ["terminal_at"] in [ix["column_names"] for ix in indexes]
        await s.add_job(new_job("job-5"), first_poll_after_s=0)
        assert await s.job_counts() == {"FAILED": 1, "PENDING": 3, "SUCCEEDED": 2}
    finally:
        await s.close()


async def test_a_blocked_connection_is_recorded_with_its_cause_and_since_until_it_opens(
    store: Store, clock: FakeClock
) -> None:
    assert await store.blocked("c1") is None
    await store.set_blocked("c1", "forbidden")
    since = clock()
    clock.advance(30)
    await store.set_blocked("c1", "forbidden")  # the same cause again: since stays
    assert await store.blocked("c1") == ("forbidden", since)
    await store.set_blocked("c1", "not_found")  # another cause: since is now
    assert await store.blocked("c1") == ("not_found", clock())
    assert await store.blocked("c2") is None
    await store.set_blocked("c1", "")
    assert await store.blocked("c1") is None
    await store.set_blocked("c1", "")  # opening an open one changes nothing
    assert await store.blocked("c1") is None


async def test_a_failed_statement_names_no_parameter_in_its_error(store: Store) -> None:
    """Store errors are logged (repr, truncated): the values a statement carried (hashes, a
    consent IP) must not be in them; SQLAlchemy puts them there unless told not to."""
    secret = "canary-203.0.113.9"
    bad = text("INSERT INTO no_such_table (x) VALUES (:x)")
    with pytest.raises(DBAPIError) as written:
        await store.run_write(lambda conn, now: conn.execute(bad, {"x": secret}))
    assert "no_such_table" in str(written.value)
    assert secret not in str(written.value)
    assert secret not in repr(written.value)
    async with store._read() as conn:
        with pytest.raises(DBAPIError) as read:
            await conn.execute(text("SELECT x FROM no_such_table WHERE x = :x"), {"x": secret})
    assert secret not in str(read.value)
