"""The operator commands' queries and reports (syncd/operate.py) on SQLite with an injected
clock: each job's idResolutionCount, the 24 h match sums per audience, the audiences that have
rows, purging one, and what `members show` says in each state of a member.
tests/integration/test_operate_postgres.py runs them again on PostgreSQL."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
from datetime import UTC, datetime
from typing import Any

import orjson
import pytest
from alembic import command
from sqlalchemy import inspect
from sqlalchemy.engine import Connection
from structlog.testing import capture_logs

from syncd import config as config_mod
from syncd.amazon.api import JobStatus
from syncd.localstack import wait_for
from syncd.members import ADD, REMOVE, MemberState, MemberTable, member_change
from syncd.model import Action, Destination, member_record
from syncd.observability.metrics import REGISTRY
from syncd.operate import (
    DEFAULT_TTL_S,
    AudienceStatus,
    BudgetUse,
    Metadata,
    audience_status,
    member_report,
    report_at_start,
    show_member,
    watch_store_size,
)
from syncd.routing import external_user_id
from syncd.store import NewJob, Store
from syncd.store.store import SCHEMA_REVISION, alembic_config
from tests.fakes import T0, FakeClock

A1 = 413642381039213536
A2 = 413642381039213537
A3 = 901234567890123456
DAY = 86400.0
VIP = Destination("vip", "conn-1", A1, "US")


def sha(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()


def change(euid: str, action: str = ADD, audience: int = A1, at: float = T0, pos: int = 0) -> Any:
    api_action = Action.REMOVE if action == REMOVE else Action.ADD
    record = member_record(euid, "US", api_action, [{"email": sha(f"{euid}@example.com")}])
    return member_change(audience, record, occurred_at=at, position=pos)


async def finish_job(
    store: Store,
    job_id: str,
    audience_id: int = A1,
    received: int | None = 100,
    matched: int | None = 42,
    state: str = "SUCCEEDED",
) -> None:
    """Track a job and record its terminal poll with these audienceSize figures."""
    await store.add_job(
        NewJob(job_id, "conn-1", audience_id, "vip", received or 1, received or 1, 0),
        first_poll_after_s=0,
    )
    [claim] = [j for j in await store.claim_due_jobs("t", 1000, 60) if j.job_request_id == job_id]
    status = JobStatus(
        job_id,
        state,
        received_record_size=received,
        id_resolution_count=matched,
        dsp_audience_size=7,
    )
    assert await store.record_poll(claim, status, next_poll_in_s=0)


# -- the jobs table: matched records and the 24 h sums -------------------------------------------
async def test_a_terminal_poll_stores_the_jobs_id_resolution_count(store: Store) -> None:
    await finish_job(store, "job-1", received=6000, matched=4211)
    job = await store.job("job-1")
    assert job is not None
    assert (job.received_records, job.matched_records) == (6000, 4211)
    assert await store.job("no-such-job") is None


async def test_recent_matches_sum_the_jobs_of_one_audience_that_ended_within_24_h(
    store: Store, clock: FakeClock
) -> None:
    await finish_job(store, "old", received=1000, matched=1000)  # ends at T0
    clock.advance(3600)
    await finish_job(store, "a", received=600, matched=252)
    await finish_job(store, "b", received=400, matched=168)
    await finish_job(store, "other-audience", audience_id=A2, received=10, matched=10)
    await finish_job(store, "no-match-figure", received=500, matched=None)
    await finish_job(store, "failed", received=None, matched=None, state="FAILED")
    await store.add_job(NewJob("pending", "conn-1", A1, "vip", 9, 9, 0), first_poll_after_s=60)
    clock.advance(DAY - 3600)  # "old" ended exactly 24 h ago: still counted
    assert await store.recent_matches(A1, DAY) == (2000, 1420)
    clock.advance(1)  # now it is older
    assert await store.recent_matches(A1, DAY) == (1000, 420)
    assert await store.recent_matches(A2, DAY) == (10, 10)
    assert await store.recent_matches(A3, DAY) == (0, 0)


async def test_upgrading_a_0003_store_with_jobs_adds_matched_records_and_its_index(
    store_db_url: str, clock: FakeClock
) -> None:
    s = await Store.connect(store_db_url, clock=clock)
    try:

        def to_0003(sync: Connection) -> None:
            cfg = alembic_config()
            cfg.attributes["connection"] = sync
            command.upgrade(cfg, "0003")

        async with s._engine.begin() as conn:
            await conn.run_sync(to_0003)
        assert await s.schema_status() == ("0003", SCHEMA_REVISION)
        await s.ensure_schema(auto_upgrade=True)
        async with s._engine.connect() as conn:
            indexes = await conn.run_sync(lambda sync: inspect(sync).get_indexes("jobs"))
        assert ["audience_id", "terminal_at"] in [ix["column_names"] for ix in indexes]
        await finish_job(s, "job-1", received=5, matched=2)
        assert await s.recent_matches(A1, DAY) == (5, 2)
    finally:
        await s.close()


# -- the member table: audiences with rows, purge ------------------------------------------------
async def test_audience_ids_lists_each_audience_with_rows_once(table: MemberTable) -> None:
    assert await table.audience_ids() == []
    await table.record_changes(
        [change(f"u{i}", audience=A3) for i in range(30)]
        + [change("u1", audience=A1), change("u2", audience=A2, action=REMOVE)]
    )
    assert await table.audience_ids() == [A1, A2, A3]


async def test_purge_audience_deletes_its_rows_in_short_transactions_and_keeps_tombstones(
    table: MemberTable, monkeypatch: pytest.MonkeyPatch
) -> None:
    await table.record_changes([change(f"u{i:02}", audience=A2) for i in range(10)])
    await table.record_changes([change("keep-1"), change("keep-2")])
    await table.erase(["u00"], [A2], occurred_at=T0 + 1, position=1)
    await table.mark_reconciled(A2, T0 + 100)
    deleted_per_transaction: list[int] = []
    transaction = table._transaction

    async def counted(op: Any) -> Any:
        deleted = await transaction(op)
        deleted_per_transaction.append(deleted)
        return deleted

    monkeypatch.setattr(table, "_transaction", counted)
    assert await table.purge_audience(A2, batch=3) == 10
    assert deleted_per_transaction == [3, 3, 3, 1, 0]
    assert await table.counts(A2) == {"member": 0, "pending": 0, "removed": 0, "invalid": 0}
    assert (await table.counts(A1))["pending"] == 2
    assert await table.audience_ids() == [A1]
    assert await table.tombstone(A2, "u00") == T0 + 1  # an erased profile stays erased
    assert await table.purge_audience(A2) == 0
    # the audience's reconcile time went with it: a change older than it applies again
    assert (await table.record_changes([change("u01", audience=A2, at=T0 + 50)])).recorded == 1


# -- syncd audiences status ----------------------------------------------------------------------
def no_credentials_config(*destinations: Destination) -> config_mod.Config:
    raw = {
        "destinations": [
            {
                "audience": d.audience,
                "connection_id": "5a523424-e8b3-4da5-9a32-24a861aea576",
                "audience_id": d.audience_id,
                "country_code": d.country_code,
            }
            for d in destinations
        ]
    }
    return config_mod.from_mapping(raw, {})


async def test_status_per_destination_and_the_audiences_no_destination_names(
    store: Store, table: MemberTable
) -> None:
    await table.record_changes([change("u1"), change("u2", audience=A3)])
    await finish_job(store, "j", received=50, matched=21)
    cfg = no_credentials_config(VIP, Destination("lapsed", "c", A2, "US"))
    statuses, orphans = await audience_status(cfg, store)
    assert [s.destination.audience for s in statuses] == ["vip", "lapsed"]
    vip, lapsed = (s.to_json() for s in statuses)
    assert vip["audience_id"] == A1
    assert (vip["received"], vip["matched"], vip["match_ratio"]) == (50, 21, 0.42)
    assert vip["members"] == {"member": 0, "pending": 1, "removed": 0, "invalid": 0}
    # no credentials: Amazon's figures are unknown, and say why
    assert (vip["ttl"], vip["dsp_audience_size"]) == (None, None)
    assert "amazon.client_id" in vip["metadata_error"]
    assert (lapsed["received"], lapsed["match_ratio"]) == (0, None)
    assert orphans == {A3: {"member": 0, "pending": 1, "removed": 0, "invalid": 0}}


def test_status_json_holds_the_contract_keys_with_exactly_four_member_states() -> None:
    status = AudienceStatus(
        VIP,
        Metadata.of({"metadata": {"ttl": 3600, "audienceSize": {"dspAudienceSize": 120000}}}),
        received=6000,
        matched=4211,
        members={"member": 5, "pending": 1, "removed": 2, "invalid": 3},
    )
    doc = orjson.loads(orjson.dumps(status.to_json()))
    contract = {"audience", "audience_id", "ttl", "received", "matched", "match_ratio"}
    assert contract | {"dsp_audience_size", "members"} <= doc.keys()
    assert doc["audience_id"] == A1
    assert isinstance(doc["audience_id"], int)
    assert doc["ttl"] == 3600
    assert doc["match_ratio"] == pytest.approx(4211 / 6000)
    assert doc["dsp_audience_size"] == 120000
    assert doc["amazon_received"] is None  # absent from the metadata
    assert set(doc["members"]) == {"member", "pending", "removed", "invalid"}
    # Amazon may resolve more ids than records received (several identifiers per record):
    # the ratio stays within 0..1
    over = AudienceStatus(VIP, Metadata(), received=10, matched=12, members={})
    assert over.to_json()["match_ratio"] == 1.0


@pytest.mark.parametrize(
    "metadata",
    [
        {},
        {"metadata": None},
        {"metadata": {"ttl": -1, "audienceSize": 12}},
        {"metadata": {"ttl": True, "audienceSize": {"dspAudienceSize": "12"}}},
        {"metadata": {"ttl": DEFAULT_TTL_S + 1, "audienceSize": {"dspAudienceSize": -3}}},
        {"metadata": {"ttl": "60"}},
        {"metadata": {"ttl": float("nan")}},
    ],
)
def test_odd_metadata_reads_as_unknown(metadata: dict[str, Any]) -> None:
    assert Metadata.of(metadata) == Metadata()


@pytest.mark.parametrize("ttl", [60.0, 1.5, 0, DEFAULT_TTL_S])
def test_a_ttl_reads_as_the_daemon_reads_it(ttl: float) -> None:
    """`syncd run` refreshes on any number of 0..34300800 seconds, a fraction too: the commands
    showed a float ttl as unknown (the default), and the next refresh wrongly."""
    assert Metadata.of({"metadata": {"ttl": ttl}}).ttl == ttl


# -- syncd members show --------------------------------------------------------------------------
def dumped(doc: dict[str, Any]) -> str:
    return orjson.dumps(doc).decode()


def keys(doc: Any) -> set[str]:
    """Every key at any depth of a JSON document."""
    if isinstance(doc, dict):
        return set(doc) | {k for v in doc.values() for k in keys(v)}
    if isinstance(doc, list):
        return {k for v in doc for k in keys(v)}
    return set()


async def show(store: Store, profile_id: str) -> dict[str, Any]:
    return await show_member(no_credentials_config(VIP), store, VIP, profile_id)


async def test_show_follows_a_member_from_recorded_to_confirmed(
    store: Store, table: MemberTable, clock: FakeClock
) -> None:
    absent = await show(store, "u1")
    assert absent["state"] == "absent"
    assert absent["desired"] is None
    assert absent["waiting"] == []

    await table.record_changes([change("u1")])
    due = await show(store, "u1")
    assert due["state"] == "pending"
    assert due["desired"] == {"action": "add", "occurred_at": "2027-01-15T08:00:00Z"}
    assert due["sent"] is None
    assert due["waiting"] == [
        "due since 2027-01-15T08:00:00Z (a live change), waiting to be claimed by a sender",
        "the connection's budget has room (0 of 15,000,000 records in the last 3600 s): "
        "it waits behind the backlog",
    ]

    claims = await table.claim_due([A1], 10, 60, "sender-a")
    [claimed] = (await show(store, "u1"))["waiting"]
    assert claimed == "claimed by sender-a until 2027-01-15T08:01:00Z: sending"
    clock.advance(70)  # the lease ran out: due again, for any sender
    assert "due since" in (await show(store, "u1"))["waiting"][0]
    reservation, _ = await store.reserve("conn-1", 15_000_000, 15_000_000, 3600)
    assert reservation is not None
    assert (await show(store, "u1"))["waiting"][1] == (
        "the connection's budget is used up (15,000,000 of 15,000,000 records in the last "
        "3600 s): it waits for the window to roll"
    )
    await store.release(reservation)

    await table.mark_sent(claims, "job-1")  # nobody took it over: the send still counts
    await store.add_job(NewJob("job-1", "conn-1", A1, "vip", 1, 1, 0), first_poll_after_s=30)
    pending = await show(store, "u1")
    assert pending["state"] == "pending"
    assert pending["sent"] == {
        "action": "add",
        "sent_at": "2027-01-15T08:01:10Z",
        "same_as_desired": True,
    }
    assert pending["job"]["job_request_id"] == "job-1"
    assert pending["job"]["state"] == "PENDING"
    assert pending["waiting"] == ["its job job-1 is pending at Amazon"]

    await table.apply_job_outcome("job-1", "SUCCEEDED")
    member = await show(store, "u1")
    assert member["state"] == "member"
    assert member["job"] is None
    assert member["outcome"] == {
        "outcome": "confirmed",
        "reason": None,
        "accepted_at": "2027-01-15T08:01:10Z",
        "failed_attempts": 0,
    }
    assert member["waiting"] == []
    assert member["ttl"] == {"seconds": DEFAULT_TTL_S, "known": False}
    refresh = T0 + 70 + 0.8 * DEFAULT_TTL_S  # [members] refresh_at's default
    assert member["next_refresh_at"] == member_report_iso(refresh)
    assert member["expires_at"] == member_report_iso(T0 + 70 + DEFAULT_TTL_S)
    for doc in (due, pending, member):  # never the record's hashes, nor a digest
        assert sha("u1@example.com") not in dumped(doc)
        assert not {"record", "digest", "sent_digest"} & keys(doc)


def member_report_iso(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


async def test_show_says_why_a_member_waits_after_a_refusal_or_failures(
    store: Store, table: MemberTable
) -> None:
    await table.record_changes([change("bad"), change("flaky")])
    claims = await table.claim_due([A1], 10, 60, "s")
    await table.mark_sent(claims, "job-1")
    await table.apply_job_outcome("job-1", "PARTIALLYSUCCEEDED", {"bad": "invalid_pii"})
    refused = await show(store, "bad")
    assert refused["state"] == "invalid"
    assert refused["waiting"] == [
        "Amazon refused it (invalid_pii): not sent again until it changes"
    ]
    assert refused["next_refresh_at"] is None

    await table.erase(["flaky"], [A1], occurred_at=T0 + 6, position=2)  # a DELETE is due now
    claims = await table.claim_due([A1], 10, 60, "s")
    await table.mark_sent(claims, "job-2")
    await table.apply_job_outcome("job-2", "FAILED", reason="server_error")
    failing = await show(store, "flaky")
    assert failing["state"] == "pending"
    assert failing["desired"]["action"] == "remove"
    assert failing["erased_at"] == "2027-01-15T08:00:06Z"
    assert failing["waiting"][-1] == "1 failed attempts so far (last: server_error)"
    claims = await table.claim_due([A1], 10, 60, "s")
    await table.mark_sent(claims, "job-3")
    await table.apply_job_outcome("job-3", "FAILED")  # Amazon gave no reason
    failing = await show(store, "flaky")
    assert failing["waiting"][-1] == "2 failed attempts so far"


async def test_show_finds_a_profile_by_the_external_user_id_ingest_gives_it(
    store: Store, table: MemberTable
) -> None:
    profile = "jane doe/7"  # does not fit Amazon's pattern: ingest uses its SHA-256
    euid = external_user_id(profile)
    assert euid != profile
    await table.record_changes([change(euid)])
    doc = await show(store, profile)
    assert doc["state"] == "pending"
    # the SHA-256 of a profile id (an email, say) is not shown: "never hashes"
    assert (doc["external_user_id"], doc["external_user_id_hashed"]) == (None, True)
    assert euid not in orjson.dumps(doc).decode()


def test_a_member_withdrawn_before_it_was_ever_sent_shows_as_removed_as_counted() -> None:
    """`members show` and `audiences status` (MemberTable.counts) name one state alike: a
    row with no outcome and nothing due is removed (a reconcile withdrew its unsent add)."""
    unsent = state(action=REMOVE, outcome=None, sent_action=None, sent_at=None, accepted_at=None)
    doc = member_report(VIP, "u1", unsent, None, None, 60, 0.5, now=T0)
    assert doc["state"] == "removed"
    assert (doc["external_user_id"], doc["external_user_id_hashed"]) == ("u1", False)


def state(**values: Any) -> MemberState:
    defaults: dict[str, Any] = {
        "audience_id": A1,
        "external_user_id": "u1",
        "action": ADD,
        "occurred_at": T0,
        "due_since": None,
        "refresh": False,
        "sent_action": ADD,
        "sent_at": T0,
        "job_request_id": None,
        "accepted_at": T0,
        "outcome": "confirmed",
        "reason": None,
        "attempts": 0,
        "claimed_by": None,
        "claimed_until": None,
        "in_sync": True,
    }
    return MemberState(**(defaults | values))


@pytest.mark.parametrize(
    ("ttl", "refresh_at", "next_refresh", "expires"),
    [
        (60, 0.5, T0 + 30, T0 + 60),
        (None, 0.8, T0 + 0.8 * DEFAULT_TTL_S, T0 + DEFAULT_TTL_S),
        (0, 0.8, None, None),  # ttl 0: Amazon holds no member, nothing to refresh
        (60, 0.0, None, T0 + 60),  # refresh_at 0: never refreshed
    ],
)
def test_next_refresh_follows_the_ttl_and_refresh_at(
    ttl: int | None, refresh_at: float, next_refresh: float | None, expires: float | None
) -> None:
    doc = member_report(VIP, "u1", state(), None, None, ttl, refresh_at, now=T0)
    assert doc["next_refresh_at"] == (
        None if next_refresh is None else member_report_iso(next_refresh)
    )
    assert doc["expires_at"] == (None if expires is None else member_report_iso(expires))


def test_a_live_claim_and_a_refresh_are_named() -> None:
    claimed = state(due_since=T0, claimed_by="replica-2", claimed_until=T0 + 60)
    doc = member_report(VIP, "u1", claimed, None, None, 60, 0.5, now=T0 + 1)
    assert doc["waiting"] == ["claimed by replica-2 until 2027-01-15T08:01:00Z: sending"]
    refresh = state(due_since=T0, refresh=True)
    [why] = member_report(VIP, "u1", refresh, None, None, 60, 0.5, now=T0 + 1)["waiting"]
    assert "TTL refresh" in why
    assert "live changes go first" in why


def test_a_claim_waiting_for_the_connections_budget_is_named() -> None:
    """A sender holds its claim while its batch waits for budget: not "sending"."""
    claimed = state(due_since=T0, claimed_by="replica-2", claimed_until=T0 + 60)
    used_up = BudgetUse(used=100, limit=100, window_s=3600, batch=100)
    doc = member_report(VIP, "u1", claimed, None, None, 60, 0.5, now=T0 + 1, budget=used_up)
    assert doc["waiting"] == [
        "claimed by replica-2 until 2027-01-15T08:01:00Z: its batch waits for the connection's "
        "budget",
        "the connection's budget is used up (100 of 100 records in the last 3600 s): it waits "
        "for the window to roll",
    ]
    short = BudgetUse(used=97, limit=100, window_s=3600, batch=100)
    doc = member_report(VIP, "u1", claimed, None, None, 60, 0.5, now=T0 + 1, budget=short)
    assert doc["waiting"] == [
        "claimed by replica-2 until 2027-01-15T08:01:00Z: sending",
        "the connection's budget has room for 3 more records (97 of 100 in the last 3600 s): "
        "a larger batch waits for the window to roll",
    ]
    roomy = BudgetUse(used=0, limit=100, window_s=3600, batch=100)
    doc = member_report(VIP, "u1", claimed, None, None, 60, 0.5, now=T0 + 1, budget=roomy)
    assert doc["waiting"] == ["claimed by replica-2 until 2027-01-15T08:01:00Z: sending"]


async def test_show_says_a_member_waits_because_its_destination_is_paused(
    store: Store, table: MemberTable
) -> None:
    await table.record_changes([change("u1")])
    paused = dataclasses.replace(VIP, paused=True)
    doc = await show_member(no_credentials_config(VIP), store, paused, "u1")
    assert doc["state"] == "pending"
    [why] = doc["waiting"]
    assert "destination is paused" in why
    assert "budget" not in why


# -- syncd run: the start-up report and the store's size ------------------------------------------
def gauge(name: str, **labels: str) -> float | None:
    return REGISTRY.get_sample_value(name, labels)


async def test_start_up_reports_paused_destinations_and_audiences_no_destination_names(
    table: MemberTable,
) -> None:
    await table.record_changes([change("u1"), change("o1", audience=A3), change("o2", audience=A3)])
    paused = Destination("lapsed", "conn-1", A2, "US", paused=True)
    with capture_logs() as logs:
        await report_at_start([VIP, paused], table)
    assert gauge("syncd_destination_paused", audience="vip") == 0
    assert gauge("syncd_destination_paused", audience="lapsed") == 1
    assert gauge("syncd_orphaned_members", audience_id=str(A3)) == 2
    assert gauge("syncd_orphaned_members", audience_id=str(A1)) is None
    [orphan] = [e for e in logs if e.get("audience_id") == A3]
    assert (orphan["members"], orphan["pending"], orphan["log_level"]) == (2, 2, "warning")
    assert "syncd members purge" in orphan["event"]
    assert any(e.get("audience") == "lapsed" and "paused" in e["event"] for e in logs)


async def test_the_store_size_is_exported_and_follows_the_database(
    store: Store, table: MemberTable
) -> None:
    empty = await store.size_bytes()
    assert empty > 0
    await table.record_changes([change(f"u{i}") for i in range(3000)])
    assert await store.size_bytes() > empty
    stop = asyncio.Event()
    task = asyncio.create_task(watch_store_size(store, stop, every_s=3600))

    async def exported() -> bool:  # the first round runs at once
        return gauge("syncd_store_bytes") == await store.size_bytes()

    await wait_for(exported, 10, "syncd_store_bytes exported")
    stop.set()
    await asyncio.wait_for(task, timeout=10)  # a stop ends the wait between rounds
