"""The member table on SQLite with an injected clock. tests/integration/test_members_postgres.py
runs the same tests against PostgreSQL by overriding the `store_db_url` fixture."""

from __future__ import annotations

import hashlib
import itertools
import time
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import event, insert, select, text

from syncd.members import (
    ADD,
    BACKGROUND,
    REMOVE,
    UPDATE,
    Claim,
    MemberChange,
    MemberTable,
    RecordCounts,
    dead_letter_value,
    delete_record,
    member_change,
    without_consent_ip,
)
from syncd.model import Action, Consent, member_record, record_digest
from syncd.store import NewJob
from syncd.store.schema import members, tombstones
from tests.fakes import T0, FakeClock
from tests.fixtures.store import migrate

A1 = 413642381039213536  # real audience ids have 18 digits
A2 = 413642381039213537
LEASE = 60.0
_fresh_audience = itertools.count(900_000_000_000_000_000)


def sha(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()


def change(
    euid: str = "u1",
    action: str = ADD,
    email: str = "a",
    at: float = T0,
    pos: int = 0,
    audience: int = A1,
    country: str = "US",
) -> MemberChange:
    api_action = Action.REMOVE if action == REMOVE else Action.ADD
    record = member_record(euid, country, api_action, [{"email": sha(email)}])
    return member_change(
        audience, record, occurred_at=at, position=pos, identifiers_only=action == UPDATE
    )


async def send(
    table: MemberTable, audience: int = A1, job: str = "job-1", limit: int = 1000
) -> list[Claim]:
    """Claim what is due in `audience` and record it sent as `job`."""
    claims = await table.claim_due([audience], limit, LEASE, "sender")
    if claims:
        assert await table.mark_sent(claims, job) == []
    return claims


def due_keys(claims: list[Claim]) -> set[tuple[int, str]]:
    return {(c.audience_id, c.external_user_id) for c in claims}


# -- digest ---------------------------------------------------------------------------------------
def test_digest_covers_content_not_order_action_or_ip() -> None:
    def rec(
        pii: list[dict[str, str]],
        consent: Consent | None = None,
        action: Action = Action.ADD,
        country: str = "DE",
    ) -> bytes:
        return member_record("u1", country, action, pii, consent).json

    consent = Consent(amzn_user_data="GRANTED", amzn_ad_storage="GRANTED")
    base = rec([{"email": sha("a"), "phone": sha("p")}, {"email": sha("b")}], consent=consent)
    same = [
        rec([{"email": sha("b"), "phone": sha("p")}, {"email": sha("a")}], consent=consent),
        rec(
            [{"email": sha("a"), "phone": sha("p")}, {"email": sha("b")}],
            consent=consent,
            action=Action.REMOVE,
        ),
    ]
    with_ip = orjson.loads(base)
    with_ip["userConsent"]["geo"] = {"ipAddress": "203.0.113.7"}
    same.append(orjson.dumps(with_ip))
    for other in same:
        assert record_digest(other) == record_digest(base)
    different = [
        rec(
            [{"email": sha("a"), "phone": sha("p")}, {"email": sha("b")}],
            consent=consent,
            country="FR",
        ),
        rec([{"email": sha("a"), "phone": sha("p")}], consent=consent),
        rec([{"email": sha("a"), "phone": sha("p")}, {"email": sha("b")}]),
        rec(
            [{"email": sha("a"), "phone": sha("p")}, {"email": sha("b")}],
            consent=Consent(amzn_user_data="DENIED", amzn_ad_storage="GRANTED"),
        ),
    ]
    with_geo = orjson.loads(base)
    with_geo["userConsent"]["geo"] = {"countryCode": "FR", "ipAddress": "203.0.113.7"}
    different.append(orjson.dumps(with_geo))
    digests = {record_digest(r) for r in different}
    assert len(digests) == len(different)
    assert record_digest(base) not in digests
    assert len(record_digest(base)) == 32


def test_delete_record_keeps_the_hashes() -> None:
    record = member_record("u1", "US", Action.ADD, [{"email": sha("a")}]).json
    deleted = orjson.loads(delete_record(record))
    assert deleted == {**orjson.loads(record), "action": "DELETE"}


# -- record_changes -------------------------------------------------------------------------------
async def test_unknown_member_is_due_a_remove_included(table: MemberTable) -> None:
    counts = await table.record_changes([change("u1", ADD), change("u2", REMOVE)])
    assert counts == RecordCounts(recorded=2)
    claims = await table.claim_due([A1], 10, LEASE, "s")
    assert {(c.external_user_id, c.action, c.api_action) for c in claims} == {
        ("u1", ADD, Action.ADD),
        ("u2", REMOVE, Action.REMOVE),
    }
    by_id = {c.external_user_id: c for c in claims}
    assert orjson.loads(by_id["u2"].record)["action"] == "DELETE"
    assert by_id["u1"].record == change("u1", ADD).record
    assert by_id["u1"].digest == record_digest(by_id["u1"].record)


async def test_older_change_never_overwrites_a_newer_one(table: MemberTable) -> None:
    await table.record_changes([change(action=ADD, at=T0 + 2)])
    counts = await table.record_changes([change(action=REMOVE, at=T0 + 1, pos=99)])
    assert counts == RecordCounts(superseded=1)
    [claim] = await table.claim_due([A1], 10, LEASE, "s")
    assert claim.action == ADD


async def test_a_tie_goes_to_the_later_position(table: MemberTable) -> None:
    await table.record_changes([change(action=ADD, pos=7)])
    assert await table.record_changes([change(action=REMOVE, pos=6)]) == RecordCounts(superseded=1)
    assert await table.record_changes([change(action=REMOVE, pos=8)]) == RecordCounts(recorded=1)
    [claim] = await table.claim_due([A1], 10, LEASE, "s")
    assert claim.action == REMOVE


async def test_same_chunk_keeps_the_newest_change_per_member(table: MemberTable) -> None:
    counts = await table.record_changes(
        [
            change(action=REMOVE, at=T0 + 3),
            change(action=ADD, at=T0 + 1),
            change(action=ADD, email="b", at=T0 + 2),
        ]
    )
    assert counts == RecordCounts(recorded=1, superseded=2)
    [claim] = await table.claim_due([A1], 10, LEASE, "s")
    assert claim.action == REMOVE


async def test_change_equal_to_what_amazon_holds_is_a_noop(table: MemberTable) -> None:
    await table.record_changes([change(at=T0)])
    await send(table)
    await table.apply_job_outcome("job-1", "SUCCEEDED")
    # the same content, newer (e.g. a replayed event with a new offset, or an unrelated update)
    assert await table.record_changes([change(at=T0 + 5, pos=3)]) == RecordCounts(noop=1)
    # the very same change again
    assert await table.record_changes([change(at=T0 + 5, pos=3)]) == RecordCounts(superseded=1)
    assert await table.claim_due([A1], 10, LEASE, "s") == []
    state = await table.member(A1, "u1")
    assert state is not None
    assert state.in_sync
    assert state.occurred_at == T0 + 5  # held: an older change still cannot overwrite it
    assert await table.record_changes([change(action=REMOVE, at=T0 + 4)]) == RecordCounts(
        superseded=1
    )


async def test_change_while_a_job_is_pending_waits_for_its_outcome(table: MemberTable) -> None:
    await table.record_changes([change(email="a")])
    await send(table)
    counts = await table.record_changes([change(email="b", at=T0 + 1)])
    assert counts == RecordCounts(recorded=1)
    assert await table.claim_due([A1], 10, LEASE, "s") == []  # one job per member at a time
    assert (await table.counts(A1))["pending"] == 1
    await table.apply_job_outcome("job-1", "SUCCEEDED")
    [claim] = await table.claim_due([A1], 10, LEASE, "s")
    assert claim.record == change(email="b").record


async def test_change_back_to_what_was_sent_settles_when_confirmed(table: MemberTable) -> None:
    await table.record_changes([change(email="a")])
    await send(table)
    await table.record_changes([change(email="b", at=T0 + 1)])
    await table.record_changes([change(email="a", at=T0 + 2)])
    await table.apply_job_outcome("job-1", "SUCCEEDED")
    assert await table.claim_due([A1], 10, LEASE, "s") == []


async def test_identifiers_only_change_applies_to_adds_only(table: MemberTable) -> None:
    assert await table.record_changes([change("nobody", UPDATE)]) == RecordCounts(not_member=1)
    assert await table.member(A1, "nobody") is None
    await table.record_changes([change("in", ADD), change("out", REMOVE)])
    await send(table)
    await table.apply_job_outcome("job-1", "SUCCEEDED")
    counts = await table.record_changes(
        [change("in", UPDATE, email="new", at=T0 + 1), change("out", UPDATE, at=T0 + 1)]
    )
    assert counts == RecordCounts(recorded=1, not_member=1)
    [claim] = await table.claim_due([A1], 10, LEASE, "s")
    assert (claim.external_user_id, claim.action) == ("in", ADD)
    assert orjson.loads(claim.record)["action"] == "CREATE"
    assert claim.record == change("in", ADD, email="new").record
    # an update not newer than what the member holds does nothing
    assert await table.record_changes([change("in", UPDATE, email="x", at=T0)]) == RecordCounts(
        superseded=1
    )


async def test_members_among_are_the_keys_whose_desired_action_is_add(
    table: MemberTable,
) -> None:
    await table.record_changes(
        [change("in", ADD), change("out", REMOVE), change("other", ADD, audience=A2)]
    )
    keys = [(A1, "in"), (A1, "out"), (A1, "nobody"), (A2, "in"), (A2, "other"), (A1, "in")]
    assert await table.members_among(keys) == {(A1, "in"), (A2, "other")}
    assert await table.members_among([]) == set()


async def test_identifiers_only_change_in_one_chunk_follows_time_order(
    table: MemberTable,
) -> None:
    """Within one chunk, an UPDATE applies as if the chunk's changes were applied in time order:
    after an ADD it updates it; after a REMOVE it does nothing; after an older ADD that the row
    outranks, only what the row holds decides."""
    await table.record_changes([change("r", REMOVE, at=T0 + 3), change("k", ADD, at=T0 + 3)])
    counts = await table.record_changes(
        [
            change("n", UPDATE, email="u", at=T0 + 2),
            change("n", ADD, email="a", at=T0 + 1),  # -> n is an add holding the update's record
            change("r", ADD, at=T0 + 2),  # older than the row's remove
            change("r", UPDATE, at=T0 + 4),  # the row is still a remove: not a member
            change("k", REMOVE, at=T0 + 2),  # older than the row's add
            change("k", UPDATE, email="k2", at=T0 + 4),  # the row is an add: applies
        ]
    )
    assert counts == RecordCounts(recorded=3, superseded=2, not_member=1)
    claims = {c.external_user_id: c for c in await table.claim_due([A1], 10, LEASE, "s")}
    assert claims["n"].action == ADD
    assert claims["n"].record == change("n", ADD, email="u").record
    assert claims["r"].action == REMOVE
    assert claims["k"].record == change("k", ADD, email="k2").record


async def test_an_update_routed_to_destinations_sharing_an_audience_keeps_its_country(
    table: MemberTable,
) -> None:
    """Two destinations name one audience_id with different country_codes: an identifiers-only
    event routes an UPDATE to each (the same member, the same time). The member takes the one
    of its own country, whichever destination is listed last; with none of its country, the
    last listed (the destination's country changed, say) applies as before."""
    await table.record_changes([change("us", country="US"), change("de", country="DE")])
    at = T0 + 1
    for listed in (("US", "DE"), ("DE", "US")):
        counts = await table.record_changes(
            [
                change(euid, UPDATE, email=f"{euid}-{country}", at=at, country=country)
                for euid in ("us", "de")
                for country in listed
            ]
        )
        assert counts == RecordCounts(recorded=2, superseded=2)
        for euid, country in (("us", "US"), ("de", "DE")):
            record = await stored_record(table, euid)
            assert record == change(euid, email=f"{euid}-{country}", country=country).record
        at += 1
    await table.record_changes(
        [change("us", UPDATE, email="x", at=at, country=c) for c in ("FR", "GB")]
    )
    assert await stored_record(table, "us") == change("us", email="x", country="GB").record


async def test_unknown_action_is_refused(table: MemberTable) -> None:
    bad = MemberChange(A1, "u1", "CREATE", b"{}", b"0" * 32, T0, 0)
    with pytest.raises(ValueError, match="unknown member action"):
        await table.record_changes([bad])


# -- claims ---------------------------------------------------------------------------------------
async def test_claim_leases_and_fences(table: MemberTable, clock: FakeClock) -> None:
    await table.record_changes([change("u1"), change("u2")])
    first = await table.claim_due([A1], 10, LEASE, "s1")
    assert len(first) == 2
    assert await table.claim_due([A1], 10, LEASE, "s2") == []  # leased
    state = await table.member(A1, "u1")
    assert state is not None
    assert state.claimed_by == "s1"
    assert state.claimed_until == T0 + LEASE
    clock.advance(LEASE)
    second = await table.claim_due([A1], 10, LEASE, "s2")  # lease ran out: taken over
    assert due_keys(second) == due_keys(first)
    assert second[0].token != first[0].token
    assert await table.renew(first, LEASE) == first
    assert await table.mark_sent(first, "job-late") == first  # fenced: nothing written
    assert await table.mark_sent(second, "job-2") == []
    state = await table.member(A1, "u1")
    assert state is not None
    assert state.job_request_id == "job-2"
    assert state.claimed_by is None


async def test_renew_keeps_a_claim(table: MemberTable, clock: FakeClock) -> None:
    await table.record_changes([change()])
    claims = await table.claim_due([A1], 10, LEASE, "s1")
    clock.advance(LEASE - 1)
    assert await table.renew(claims, LEASE) == []
    clock.advance(LEASE - 1)
    assert await table.claim_due([A1], 10, LEASE, "s2") == []
    assert await table.mark_sent(claims, "job-1") == []


async def test_released_claims_are_due_again(table: MemberTable) -> None:
    await table.record_changes([change("u1"), change("u2")])
    claims = await table.claim_due([A1], 10, LEASE, "s1")
    await table.release(claims[:1])
    again = await table.claim_due([A1], 10, LEASE, "s2")
    assert due_keys(again) == due_keys(claims[:1])


async def test_mark_sent_stores_what_was_sent_not_what_changed_since(
    table: MemberTable,
) -> None:
    await table.record_changes([change(email="a")])
    claims = await table.claim_due([A1], 10, LEASE, "s")
    await table.record_changes([change(email="b", at=T0 + 1)])  # while the POST is on its way
    assert await table.mark_sent(claims, "job-1") == []
    await table.apply_job_outcome("job-1", "SUCCEEDED")
    [claim] = await table.claim_due([A1], 10, LEASE, "s")  # "b" was never sent
    assert claim.record == change(email="b").record


async def test_store_job_writes_the_job_row_and_the_sent_state_in_one_go(
    table: MemberTable, clock: FakeClock
) -> None:
    """The job row is stored whatever happened to the claims; members only where the lease
    still holds (a sender whose lease ran out leaves the members to their new claimant)."""
    await table.record_changes([change("u1"), change("u2")])
    first = await table.claim_due([A1], 10, LEASE, "s1")
    assert [c.occurred_at for c in first] == [T0, T0]
    job = NewJob("job-1", "conn", A1, "vip", 2, 2, 0)
    assert await table.store_job(first, job, first_poll_after_s=5) == []
    [row] = await table._store.list_jobs()
    assert (row.job_request_id, row.state, row.next_poll_at) == ("job-1", "PENDING", T0 + 5)
    state = await table.member(A1, "u1")
    assert state is not None
    assert (state.job_request_id, state.sent_at, state.in_sync) == ("job-1", T0, True)
    # a lost lease: job row stored, the members untouched
    await table.record_changes([change("u3")])
    late = await table.claim_due([A1], 10, LEASE, "s1")
    clock.advance(LEASE)
    taken = await table.claim_due([A1], 10, LEASE, "s2")
    job2 = NewJob("job-2", "conn", A1, "vip", 1, 1, 0)
    assert await table.store_job(late, job2, first_poll_after_s=5) == late
    assert await table._store.job_states(["job-2"]) == {"job-2": "PENDING"}
    u3 = await table.member(A1, "u3")
    assert u3 is not None
    assert (u3.job_request_id, u3.claimed_by) == (None, "s2")
    assert due_keys(taken) == due_keys(late)


async def test_refused_members_are_invalid_until_they_change(table: MemberTable) -> None:
    await table.record_changes([change("u1", email="a"), change("u2", email="a")])
    claims = await table.claim_due([A1], 10, LEASE, "s")
    # u2 changes while its POST is refused: the new state is due, the refused one is not
    await table.record_changes([change("u2", email="b", at=T0 + 1)])
    assert await table.refuse(claims, "invalid_pii") == []
    u1 = await table.member(A1, "u1")
    assert u1 is not None
    assert (u1.outcome, u1.reason, u1.due_since, u1.in_sync) == (
        "invalid",
        "invalid_pii",
        None,
        True,
    )
    [again] = await table.claim_due([A1], 10, LEASE, "s")
    assert (again.external_user_id, again.record) == ("u2", change("u2", email="b").record)
    # the same change again is not sent again; a different one is
    counts = await table.record_changes([change("u1", email="a", at=T0 + 2)])
    assert counts == RecordCounts(noop=1)
    counts = await table.record_changes([change("u1", email="c", at=T0 + 3)])
    assert counts == RecordCounts(recorded=1)
    assert await table.waiting([A1]) == 2  # u1 again, and u2 (claimed: due until sent)
    assert await table.waiting([A2]) == 0


async def test_refuse_is_fenced_on_the_claim(table: MemberTable, clock: FakeClock) -> None:
    await table.record_changes([change("u1")])
    first = await table.claim_due([A1], 10, LEASE, "s1")
    clock.advance(LEASE)
    second = await table.claim_due([A1], 10, LEASE, "s2")
    assert await table.refuse(first, "other") == first
    state = await table.member(A1, "u1")
    assert state is not None
    assert (state.outcome, state.claimed_by) == (None, "s2")
    assert await table.mark_sent(second, "job-1") == []


async def test_claims_share_a_connection_fairly_between_audiences(table: MemberTable) -> None:
    await table.record_changes([change(f"a{i:03}", audience=A1) for i in range(100)])
    await table.record_changes([change(f"b{i:03}", audience=A2) for i in range(10)])
    claims = await table.claim_due([A1, A2], 40, LEASE, "s")
    per_audience = {a: sum(c.audience_id == a for c in claims) for a in (A1, A2)}
    assert per_audience == {A1: 30, A2: 10}  # A2 had fewer: its share went to A1
    claims = await table.claim_due([A1, A2], 40, LEASE, "s")
    assert {c.audience_id for c in claims} == {A1}
    assert len(claims) == 40
    await table.record_changes([change(f"c{i:03}", audience=A2) for i in range(50)])
    claims = await table.claim_due([A1, A2], 40, LEASE, "s")
    per_audience = {a: sum(c.audience_id == a for c in claims) for a in (A1, A2)}
    assert per_audience == {A1: 20, A2: 20}


async def test_claims_take_the_oldest_due_first(table: MemberTable, clock: FakeClock) -> None:
    for i in range(5):
        await table.record_changes([change(f"u{4 - i}")])
        clock.advance(1)
    claims = await table.claim_due([A1], 2, LEASE, "s")
    assert [c.external_user_id for c in claims] == ["u3", "u4"]


async def test_claims_take_live_changes_before_refreshes(
    table: MemberTable, clock: FakeClock
) -> None:
    await table.record_changes([change(f"old{i}") for i in range(3)])
    await send(table)
    await table.apply_job_outcome("job-1", "SUCCEEDED")
    clock.advance(100)
    assert await table.due_for_refresh(A1, 50, 10) == 3
    await table.record_changes([change("live", audience=A2)])
    await table.record_changes([change("later")])
    claims = await table.claim_due([A1, A2], 3, LEASE, "s")
    assert [(c.external_user_id, c.refresh) for c in claims] == [
        ("later", False),
        ("live", False),
        ("old0", True),
    ]


async def test_claim_only_the_given_audiences(table: MemberTable) -> None:
    await table.record_changes([change("u1", audience=A1), change("u2", audience=A2)])
    assert due_keys(await table.claim_due([A2], 10, LEASE, "s")) == {(A2, "u2")}
    assert await table.claim_due([], 10, LEASE, "s") == []
    assert await table.claim_due([A1], 0, LEASE, "s") == []


# -- job outcomes ---------------------------------------------------------------------------------
async def test_success_confirms_and_starts_the_ttl_clock_at_the_202(
    table: MemberTable, clock: FakeClock
) -> None:
    await table.record_changes([change("u1", ADD), change("u2", REMOVE)])
    claims = await table.claim_due([A1], 10, LEASE, "s")
    clock.advance(5)
    await table.mark_sent(claims, "job-1")
    clock.advance(500)
    outcome = await table.apply_job_outcome("job-1", "COMPLETED")
    assert outcome.confirmed == 2
    added, removed = await table.member(A1, "u1"), await table.member(A1, "u2")
    assert added is not None
    assert removed is not None
    assert (added.outcome, added.accepted_at, added.job_request_id) == ("confirmed", T0 + 5, None)
    assert removed.accepted_at is None  # nothing to refresh
    assert await table.counts(A1) == {"member": 1, "pending": 0, "removed": 1, "invalid": 0}


async def test_a_huge_invalid_records_list_costs_a_few_statements(table: MemberTable) -> None:
    """A job's invalidRecords may list anything (50,000 ids the job never held, repeated, a
    thousand of its own): the outcome is written by a few statements, not one per entry (one
    per entry held a SQLite store's write lock for minutes)."""
    await table.record_changes([change(f"m{i}", pos=i) for i in range(1500)])
    await send(table, limit=1500)
    invalid = {f"stranger{i}": "invalid_pii" for i in range(50_000)}
    invalid |= {f"m{i}": "invalid_pii" if i % 2 else "consent" for i in range(1000)}
    ran: list[str] = []

    def seen(_conn: object, _cursor: object, statement: str, *_: object) -> None:
        ran.append(statement)

    engine = table._store._sync_engine or table._store._engine.sync_engine  # where writes run
    event.listen(engine, "before_cursor_execute", seen)
    try:
        outcome = await table.apply_job_outcome("job-1", "PARTIALLYSUCCEEDED", invalid)
    finally:
        event.remove(engine, "before_cursor_execute", seen)
    assert outcome.confirmed == 500
    assert sorted(d.external_user_id for d in outcome.invalid) == sorted(
        f"m{i}" for i in range(1000)
    )
    assert {d.reason for d in outcome.invalid if d.external_user_id == "m1"} == {"invalid_pii"}
    assert {d.reason for d in outcome.invalid if d.external_user_id == "m2"} == {"consent"}
    assert await table.counts(A1) == {"member": 500, "pending": 0, "removed": 0, "invalid": 1000}
    assert len(ran) <= 20


async def test_partial_success_marks_the_refused_invalid(table: MemberTable) -> None:
    await table.record_changes([change("ok"), change("bad"), change("bad2", email="z")])
    await send(table)
    await table.record_changes([change("bad2", email="y", at=T0 + 1)])  # changed meanwhile
    outcome = await table.apply_job_outcome(
        "job-1", "PARTIALLYSUCCEEDED", {"bad": "invalid_hash", "bad2": "x" * 500}
    )
    assert outcome.confirmed == 1
    dead = {d.external_user_id: d for d in outcome.invalid}
    assert dead["bad"].record == change("bad").record
    assert (dead["bad"].action, dead["bad"].reason) == (ADD, "invalid_hash")
    assert dead["bad2"].record is None  # the refused bytes were replaced
    assert len(dead["bad2"].reason) == 64
    assert await table.counts(A1) == {"member": 1, "pending": 1, "removed": 0, "invalid": 1}
    [claim] = await table.claim_due([A1], 10, LEASE, "s")
    assert claim.external_user_id == "bad2"
    # the refused record again is not sent again; a changed one is
    assert await table.record_changes([change("bad", at=T0 + 2)]) == RecordCounts(noop=1)
    assert await table.record_changes([change("bad", email="fixed", at=T0 + 3)]) == RecordCounts(
        recorded=1
    )


async def test_failed_jobs_retry_then_give_up(table: MemberTable) -> None:
    await table.record_changes([change()])
    for attempt in range(1, 3):
        await send(table, job=f"job-{attempt}")
        outcome = await table.apply_job_outcome(
            f"job-{attempt}", "FAILED", max_attempts=3, reason="amazon_failed"
        )
        assert (outcome.retried, outcome.dead) == (1, [])
        state = await table.member(A1, "u1")
        assert state is not None
        assert (state.attempts, state.outcome, state.reason) == (attempt, "failed", "amazon_failed")
    await send(table, job="job-3")
    outcome = await table.apply_job_outcome("job-3", "FAILED", max_attempts=3)
    assert outcome.retried == 0
    [dead] = outcome.dead
    assert (dead.external_user_id, dead.reason, dead.record) == ("u1", "failed", change().record)
    assert await table.claim_due([A1], 10, LEASE, "s") == []
    assert (await table.counts(A1))["invalid"] == 1
    # a new change of the member is sent again, with a fresh count of attempts
    assert await table.record_changes([change(at=T0 + 1)]) == RecordCounts(recorded=1)
    await send(table, job="job-4")
    assert (await table.apply_job_outcome("job-4", "FAILED", max_attempts=3)).retried == 1


async def test_expired_jobs_send_the_same_again(table: MemberTable) -> None:
    await table.record_changes([change()])
    await send(table)
    outcome = await table.apply_job_outcome("job-1", "EXPIRED")
    assert outcome.retried == 1
    [claim] = await table.claim_due([A1], 10, LEASE, "s")
    assert claim.action == ADD


async def test_outcome_of_an_unknown_state_is_refused(table: MemberTable) -> None:
    with pytest.raises(ValueError, match="PENDING"):
        await table.apply_job_outcome("job-1", "PENDING")


async def test_outcome_of_an_unknown_job_changes_nothing(table: MemberTable) -> None:
    await table.record_changes([change()])
    outcome = await table.apply_job_outcome("nope", "SUCCEEDED")
    assert outcome.confirmed == 0
    assert len(await table.claim_due([A1], 10, LEASE, "s")) == 1


# -- TTL refresh ----------------------------------------------------------------------------------
async def test_refresh_marks_old_confirmed_adds_due(table: MemberTable, clock: FakeClock) -> None:
    await table.record_changes([change(f"u{i}") for i in range(5)] + [change("gone", REMOVE)])
    await send(table)
    await table.apply_job_outcome("job-1", "SUCCEEDED")
    clock.advance(10)
    await table.record_changes([change("young")])
    await send(table, job="job-2")
    await table.apply_job_outcome("job-2", "SUCCEEDED")
    clock.advance(5)
    assert await table.due_for_refresh(A1, 12, 3) == 3
    assert await table.due_for_refresh(A1, 12, 3) == 2  # "young" and "gone" are not stale
    assert await table.due_for_refresh(A1, 12, 3) == 0
    claims = await table.claim_due([A1], 10, LEASE, "s")
    assert {c.external_user_id for c in claims} == {f"u{i}" for i in range(5)}
    assert all(c.refresh and c.action == ADD for c in claims)
    await table.mark_sent(claims, "job-3")
    await table.apply_job_outcome("job-3", "SUCCEEDED")
    state = await table.member(A1, "u0")
    assert state is not None
    assert state.accepted_at == T0 + 15  # the TTL clock restarted
    assert state.due_since is None
    clock.advance(10)
    assert await table.due_for_refresh(A1, 12, 10) == 1  # only "young" is stale now
    [claim] = await table.claim_due([A1], 10, LEASE, "s")
    assert claim.external_user_id == "young"


async def test_refresh_uses_background_rank_for_reconcile_too(table: MemberTable) -> None:
    await table.record_changes([change("r")], rank=BACKGROUND)
    await table.record_changes([change("l")])
    claims = await table.claim_due([A1], 10, LEASE, "s")
    assert [(c.external_user_id, c.refresh) for c in claims] == [("l", False), ("r", True)]


# -- erasure --------------------------------------------------------------------------------------
async def test_erase_deletes_everywhere_then_keeps_only_a_tombstone(
    table: MemberTable, clock: FakeClock
) -> None:
    await table.record_changes([change(audience=A1), change(audience=A2, email="b")])
    await send(table, A1, "job-1")
    await send(table, A2, "job-2")
    await table.apply_job_outcome("job-1", "SUCCEEDED")
    await table.apply_job_outcome("job-2", "SUCCEEDED")
    assert await table.erase(["u1"], [A1, A2], occurred_at=T0 + 10, position=5) == 2
    claims = await table.claim_due([A1, A2], 10, LEASE, "s")
    assert {(c.audience_id, c.action) for c in claims} == {(A1, REMOVE), (A2, REMOVE)}
    for c in claims:
        assert c.record == delete_record(
            change(audience=c.audience_id, email="a" if c.audience_id == A1 else "b").record
        )
    await table.mark_sent([c for c in claims if c.audience_id == A1], "del-1")
    await table.mark_sent([c for c in claims if c.audience_id == A2], "del-2")
    assert (await table.apply_job_outcome("del-1", "SUCCEEDED")).erased == 1
    assert (await table.apply_job_outcome("del-2", "FAILED")).erased == 0  # retried
    assert await table.member(A1, "u1") is None
    assert await table.member(A2, "u1") is not None
    assert await table.tombstone(A1, "u1") == T0 + 10
    # a late or replayed change not newer than the erase cannot bring it back
    late = await table.record_changes([change(audience=A1, at=T0 + 10, pos=5)])
    assert late == RecordCounts(erased=1)
    assert await table.member(A1, "u1") is None
    await send(table, A2, "del-3")
    assert (await table.apply_job_outcome("del-3", "SUCCEEDED")).erased == 1
    assert await table.counts(A2) == {"member": 0, "pending": 0, "removed": 0, "invalid": 0}
    # tombstones stay tombstone_days, then go
    clock.advance(86400)
    assert await table.purge_tombstones(86400 + 1) == 0
    clock.advance(20)  # the erase (T0 + 10) is now more than 86401 s old
    assert await table.purge_tombstones(86400 + 1) == 2
    assert await table.tombstone(A1, "u1") is None


async def test_tombstones_are_purged_in_short_transactions(
    table: MemberTable, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Tombstones due at once (every one an upgrade to revision 0010 found counts from it) go in
    batches, a transaction each, not in one statement that holds the write lock (or outlasts
    store.statement_timeout_s) for millions of rows."""
    await table.erase([f"u{i}" for i in range(7)], [A1], occurred_at=T0, position=1)
    transactions = 0
    transaction = table._transaction

    async def counted(op: Any) -> Any:
        nonlocal transactions
        transactions += 1
        return await transaction(op)

    monkeypatch.setattr(table, "_transaction", counted)
    clock.advance(100)
    assert await table.purge_tombstones(10, batch=3) == 7
    assert transactions == 3  # 3 + 3 + 1
    assert [await table.tombstone(A1, f"u{i}") for i in range(7)] == [None] * 7


async def test_dead_letters_wait_in_the_store_until_sent_and_an_erase_drops_them(
    table: MemberTable, clock: FakeClock
) -> None:
    """A job's refused members are queued with its outcome (Amazon's message beside), leased to
    one sender at a time (taken again once the lease runs out) and forgotten once sent; an
    erase drops those of its profile (no row of an erased profile stays)."""
    await table.record_changes([change("u1"), change("u2", email="b"), change("u3", email="c")])
    await send(table)
    outcome = await table.apply_job_outcome(
        "job-1",
        "PARTIALLYSUCCEEDED",
        {"u1": "invalid_pii", "u2": "invalid_pii"},
        details={"u1": "INVALID_HASHED_PII: " + "x" * 400},
    )
    assert sorted(d.external_user_id for d in outcome.invalid) == ["u1", "u2"]
    u1, u2 = await table.lease_dead_letters(10, 60)
    assert (u1.member, u2.member) == tuple(outcome.invalid)
    assert (u1.detail, u2.detail) == ("INVALID_HASHED_PII: " + "x" * 280, "")
    assert await table.lease_dead_letters(10, 60) == []  # leased
    clock.advance(61)
    assert [x.id for x in await table.lease_dead_letters(1, 60)] == [u1.id]  # the lease ran out
    await table.dead_letters_sent([u1.id])
    await table.erase(["u2"], [A1], occurred_at=T0 + 1, position=0)
    clock.advance(61)
    assert await table.lease_dead_letters(10, 60) == []


async def test_change_newer_than_the_erase_applies(table: MemberTable) -> None:
    await table.erase(["u1"], [A1], occurred_at=T0, position=0)  # no row: a tombstone only
    assert await table.member(A1, "u1") is None
    assert await table.record_changes([change(at=T0)]) == RecordCounts(erased=1)
    assert await table.record_changes([change(at=T0 + 1)]) == RecordCounts(recorded=1)
    assert len(await table.claim_due([A1], 10, LEASE, "s")) == 1


async def test_erase_older_than_the_member_leaves_it(table: MemberTable) -> None:
    await table.record_changes([change(at=T0 + 5)])
    assert await table.erase(["u1"], [A1], occurred_at=T0, position=0) == 0
    [claim] = await table.claim_due([A1], 10, LEASE, "s")
    assert claim.action == ADD


async def test_erase_of_a_member_amazon_already_removed_drops_it_at_once(
    table: MemberTable, clock: FakeClock
) -> None:
    await table.record_changes([change(action=REMOVE)])
    await send(table)
    await table.apply_job_outcome("job-1", "SUCCEEDED")
    assert await table.erase(["u1"], [A1], occurred_at=T0 + 1, position=0) == 0
    assert await table.member(A1, "u1") is None
    clock.advance(100)
    assert await table.purge_tombstones(50) == 1


async def test_erase_while_a_job_is_pending_waits_for_it(table: MemberTable) -> None:
    await table.record_changes([change()])
    await send(table)
    assert await table.erase(["u1"], [A1], occurred_at=T0 + 1, position=0) == 1
    assert await table.claim_due([A1], 10, LEASE, "s") == []
    await table.apply_job_outcome("job-1", "SUCCEEDED")  # the add; the erase is due now
    assert await table.member(A1, "u1") is not None
    [claim] = await send(table, job="job-2")
    assert claim.action == REMOVE
    assert (await table.apply_job_outcome("job-2", "SUCCEEDED")).erased == 1


async def test_an_erase_whose_delete_keeps_failing_is_retried_past_the_attempt_limit(
    table: MemberTable,
) -> None:
    """A failed erase is retried (the contract): unlike a change, an erase's DELETE is never
    given up after `max_attempts` FAILED jobs, since the profile would stay in the audience."""
    await table.record_changes([change()])
    await send(table)
    await table.apply_job_outcome("job-1", "SUCCEEDED")
    await table.erase(["u1"], [A1], occurred_at=T0 + 1, position=0)
    for attempt in range(4):
        [claim] = await send(table, job=f"del-{attempt}")
        assert claim.action == REMOVE
        outcome = await table.apply_job_outcome(f"del-{attempt}", "FAILED", max_attempts=2)
        assert outcome.dead == []
    [claim] = await send(table, job="del-ok")
    assert (await table.apply_job_outcome("del-ok", "SUCCEEDED")).erased == 1
    assert await table.member(A1, "u1") is None


async def test_tombstone_keeps_while_its_delete_waits(table: MemberTable, clock: FakeClock) -> None:
    await table.record_changes([change()])
    await table.erase(["u1"], [A1], occurred_at=T0 + 1, position=0)
    clock.advance(1000)
    assert await table.purge_tombstones(10) == 0
    assert await table.tombstone(A1, "u1") == T0 + 1


async def test_a_tombstone_is_kept_tombstone_days_after_its_erase_was_recorded(
    table: MemberTable, clock: FakeClock
) -> None:
    """An erase may be read long after it happened (a lagging consumer, a topic replayed from
    further back). Its tombstone guards against a replay of the member's older events for
    tombstone_days from when it was recorded, as any erase's does, not from when it happened
    (it went as soon as its DELETE was confirmed, and the replay brought the member back)."""
    keep_s = 30 * 86400.0
    long_ago = T0 - keep_s - 100
    await table.record_changes([change(at=long_ago - 100)])
    await send(table)
    await table.apply_job_outcome("job-1", "SUCCEEDED")
    assert await table.erase(["u1"], [A1], occurred_at=long_ago, position=0) == 1  # read now
    await send(table, job="del")
    assert (await table.apply_job_outcome("del", "SUCCEEDED")).erased == 1
    assert await table.purge_tombstones(keep_s) == 0
    replayed = await table.record_changes([change(at=long_ago - 100)])
    assert replayed == RecordCounts(erased=1)
    assert await table.member(A1, "u1") is None
    clock.advance(keep_s + 1)
    assert await table.purge_tombstones(keep_s) == 1
    assert await table.tombstone(A1, "u1") is None


async def test_tombstones_stored_before_revision_0010_count_from_the_upgrade(
    table: MemberTable,
) -> None:
    """When a tombstone stored before revision 0010 was recorded is not known: it is kept
    tombstone_days from the upgrade on. A downgrade keeps the tombstones."""

    async def recorded_at() -> list[float | None]:
        async with table._store._read() as conn:
            return list((await conn.execute(select(tombstones.c.recorded_at))).scalars())

    async with table._store._engine.begin() as conn:
        await conn.run_sync(migrate("0009", down=True))
        await conn.execute(
            insert(tombstones).values(audience_id=A1, external_user_id="u1", erased_at=T0)
        )
    before = time.time()
    async with table._store._engine.begin() as conn:
        await conn.run_sync(migrate("head"))
    [upgraded_at] = await recorded_at()
    assert upgraded_at is not None
    assert before <= upgraded_at <= time.time()
    assert await table.tombstone(A1, "u1") == T0
    async with table._store._engine.begin() as conn:
        await conn.run_sync(migrate("0009", down=True))
        kept = await conn.execute(text("SELECT erased_at FROM tombstones"))
        assert list(kept.scalars()) == [T0]
        await conn.run_sync(migrate("head"))


# -- counts ---------------------------------------------------------------------------------------
async def test_counts_by_state(table: MemberTable) -> None:
    await table.record_changes(
        [change("m"), change("r", REMOVE), change("i"), change("p"), change("x", audience=A2)]
    )
    claims = await table.claim_due([A1], 10, LEASE, "s")
    await table.mark_sent([c for c in claims if c.external_user_id != "p"], "job-1")
    await table.apply_job_outcome("job-1", "PARTIALLYSUCCEEDED", {"i": "bad"})
    assert await table.counts(A1) == {"member": 1, "pending": 1, "removed": 1, "invalid": 1}
    assert await table.counts(12345) == {"member": 0, "pending": 0, "removed": 0, "invalid": 0}


# -- properties -----------------------------------------------------------------------------------
MEMBERS = ("m1", "m2", "m3")
CHANGES = st.lists(
    st.tuples(
        st.sampled_from(MEMBERS),
        st.sampled_from((ADD, REMOVE)),
        st.sampled_from(("a", "b")),
        st.integers(0, 5),  # occurred_at offset: ties are common
    ),
    min_size=1,
    max_size=12,
)


def numbered(raw: list[tuple[str, str, str, int]], audience: int) -> list[MemberChange]:
    """The changes with distinct positions (a topic's offsets)."""
    return [
        change(euid, action, email, T0 + at, pos, audience)
        for pos, (euid, action, email, at) in enumerate(raw)
    ]


@settings(
    max_examples=40,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(raw=CHANGES, data=st.data())
async def test_any_delivery_order_ends_at_the_newest_change(
    table: MemberTable, raw: list[tuple[str, str, str, int]], data: st.DataObject
) -> None:
    """For any delivery order and chunking of a set of changes, each member's desired state is
    its newest change's; once that is confirmed, replaying every change sends nothing."""
    audience = next(_fresh_audience)
    changes = numbered(raw, audience)
    delivered = data.draw(st.permutations(changes))
    cuts = sorted(data.draw(st.sets(st.integers(1, len(delivered)), max_size=4)))
    total = RecordCounts()
    for start, end in itertools.pairwise([0, *cuts, len(delivered)]):
        if start < end:
            counts = await table.record_changes(delivered[start:end])
            total.recorded += counts.recorded
            total.superseded += counts.superseded
            assert counts.noop == counts.erased == counts.not_member == 0
    assert total.recorded + total.superseded == len(changes)
    newest = {c.external_user_id: c for c in sorted(changes, key=lambda c: c.order)}
    claims = await table.claim_due([audience], 100, LEASE, "s")
    assert {c.external_user_id: (c.action, c.record) for c in claims} == {
        e: (c.action, c.record) for e, c in newest.items()
    }
    await table.mark_sent(claims, f"job-{audience}")
    await table.apply_job_outcome(f"job-{audience}", "SUCCEEDED")
    replay = await table.record_changes(data.draw(st.permutations(changes)))
    assert replay.recorded == 0
    assert await table.claim_due([audience], 100, LEASE, "s") == []


@settings(
    max_examples=40,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    raw=st.lists(
        st.tuples(
            st.sampled_from(MEMBERS),
            st.sampled_from((ADD, REMOVE, UPDATE)),
            st.sampled_from(("a", "b", "c")),
            st.integers(0, 5),
        ),
        min_size=1,
        max_size=12,
    ),
    data=st.data(),
)
async def test_chunks_with_updates_match_one_by_one_in_time_order(
    table: MemberTable, raw: list[tuple[str, str, str, int]], data: st.DataObject
) -> None:
    """Chunks of changes with identifiers-only updates end where applying each chunk's changes
    one by one in time order would: an update applies to a member whose desired action is add
    at that moment and that it is newer than."""
    audience = next(_fresh_audience)
    changes = data.draw(st.permutations(numbered(raw, audience)))
    cuts = sorted(data.draw(st.sets(st.integers(1, len(changes)), max_size=3)))
    model: dict[str, MemberChange] = {}
    for start, end in itertools.pairwise([0, *cuts, len(changes)]):
        chunk = changes[start:end]
        if not chunk:
            continue
        await table.record_changes(chunk)
        for c in sorted(chunk, key=lambda c: c.order):
            held = model.get(c.external_user_id)
            if held is not None and c.order <= held.order:
                continue
            if c.action != UPDATE:
                model[c.external_user_id] = c
            elif held is not None and held.action == ADD:
                model[c.external_user_id] = MemberChange(
                    audience, c.external_user_id, ADD, c.record, c.digest, *c.order
                )
    claims = await table.claim_due([audience], 100, LEASE, "s")
    assert {c.external_user_id: (c.action, c.record) for c in claims} == {
        e: (c.action, c.record) for e, c in model.items()
    }
    for e, c in model.items():
        state = await table.member(audience, e)
        assert state is not None
        assert state.occurred_at == c.occurred_at


@settings(
    max_examples=30,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    ops=st.lists(
        st.tuples(
            st.sampled_from(("change", "send", "succeed", "fail", "expire", "refresh")),
            st.sampled_from(MEMBERS),
            st.sampled_from((ADD, REMOVE)),
            st.sampled_from(("a", "b")),
        ),
        max_size=25,
    )
)
async def test_every_recorded_change_reaches_amazon_and_then_settles(
    table: MemberTable, clock: FakeClock, ops: list[tuple[str, str, str, str]]
) -> None:
    """Any interleaving of changes, sends and job outcomes: a member is never claimed while its
    job is pending, and once every job succeeds, Amazon's view (the last confirmed send per
    member) equals the newest change of every member, and nothing is left due."""
    audience = next(_fresh_audience)
    newest: dict[str, MemberChange] = {}
    amazon: dict[str, tuple[str, bytes]] = {}
    pending: dict[str, list[Claim]] = {}
    jobs = itertools.count()

    async def send_all() -> None:
        claims = await table.claim_due([audience], 100, LEASE, "s")
        pending_ids = {c.external_user_id for cs in pending.values() for c in cs}
        assert not pending_ids & {c.external_user_id for c in claims}
        if claims:
            job = f"job-{audience}-{next(jobs)}"
            assert await table.mark_sent(claims, job) == []
            pending[job] = claims

    async def finish(state: str) -> None:
        if pending:
            job = next(iter(pending))
            claims = pending.pop(job)
            await table.apply_job_outcome(job, state)
            if state == "SUCCEEDED":
                amazon.update({c.external_user_id: (c.action, c.record) for c in claims})

    for pos, (op, euid, action, email) in enumerate(ops):
        clock.advance(1)
        if op == "change":
            c = change(euid, action, email, clock.now, pos, audience)
            await table.record_changes([c])
            newest[euid] = c
        elif op == "send":
            await send_all()
        elif op == "succeed":
            await finish("SUCCEEDED")
        elif op == "fail":
            await finish("FAILED")
        elif op == "expire":
            await finish("EXPIRED")
        else:
            await table.due_for_refresh(audience, 0, 100)
    for _ in range(len(ops) + 2):  # drain: send and succeed until nothing is due
        await send_all()
        while pending:
            await finish("SUCCEEDED")
    assert await table.claim_due([audience], 100, LEASE, "s") == []
    assert {e: amazon.get(e) for e in newest} == {
        e: (c.action, c.record) for e, c in newest.items()
    }


async def test_a_key_re_pointed_to_another_audience_starts_fresh_there(
    table: MemberTable,
) -> None:
    """Rows are keyed by audience_id: a destination whose audience_id changes finds none of the
    old audience's rows, so a change equal to what the old audience holds is sent to the new
    one (not taken for a no-op), and the old audience's rows are left as they were."""
    await table.record_changes([change(at=T0)])
    await send(table)
    await table.apply_job_outcome("job-1", "SUCCEEDED")
    assert await table.record_changes([change(at=T0 + 5, pos=3)]) == RecordCounts(noop=1)
    # the key now points at A2: the same content, the same time
    assert await table.record_changes([change(at=T0 + 5, pos=3, audience=A2)]) == RecordCounts(
        recorded=1
    )
    [claim] = await table.claim_due([A2], 10, LEASE, "s")
    assert (claim.audience_id, claim.external_user_id, claim.action) == (A2, "u1", ADD)
    old = await table.member(A1, "u1")
    assert old is not None
    assert old.in_sync
    assert old.due_since is None


async def test_chunks_of_any_size_are_written_by_a_few_distinct_statements(
    table: MemberTable,
) -> None:
    """Ingest chunks vary in size. The drivers keep prepared statements by their SQL text (sqlite3
    128 per connection, asyncpg 100): one multi-row INSERT per distinct row count filled those
    caches with statements of up to 1,000 rows and grew the daemon by tens of MB. Row counts come
    from a fixed set of sizes instead."""
    texts: set[str] = set()

    def seen(_conn: object, _cursor: object, statement: str, *_: object) -> None:
        if statement.lstrip().upper().startswith("INSERT INTO MEMBERS"):
            texts.add(statement)

    engine = table._store._sync_engine or table._store._engine.sync_engine  # where writes run
    event.listen(engine, "before_cursor_execute", seen)
    try:
        position = 0
        for size in range(1, 130):
            changes = [change(f"s{size}-{i}", pos=position + i) for i in range(size)]
            position += size
            counts = await table.record_changes(changes)
            assert counts.recorded == size
    finally:
        event.remove(engine, "before_cursor_execute", seen)
    assert 0 < len(texts) <= 11


async def stored_record(table: MemberTable, euid: str, audience: int = A1) -> bytes:
    async with table._store._read() as conn:
        record = await conn.scalar(
            select(members.c.record).where(
                members.c.audience_id == audience, members.c.external_user_id == euid
            )
        )
    assert isinstance(record, bytes)
    return record


async def test_a_consent_ip_is_kept_only_until_its_change_is_accepted(table: MemberTable) -> None:
    """The contract: the store keeps a consent IP only until the change that carried it is
    accepted; then the record keeps `geo.countryCode` alone (what refreshes send). A newer
    change recorded meanwhile keeps its own IP until it is accepted in turn."""

    def with_ip(email: str, ip: str, at: float, pos: int) -> MemberChange:
        consent = Consent(amzn_user_data="GRANTED", ip_address=ip)
        record = member_record("u1", "DE", Action.ADD, [{"email": sha(email)}], consent=consent)
        return member_change(A1, record, occurred_at=at, position=pos)

    await table.record_changes([with_ip("a", "203.0.113.7", T0, 0)])
    [claim] = await table.claim_due([A1], 10, LEASE, "sender")
    assert b"203.0.113.7" in claim.record
    assert await table.mark_sent([claim], "job-1") == []
    stored = await stored_record(table, "u1")
    assert orjson.loads(stored)["userConsent"]["geo"] == {"countryCode": "DE"}
    assert record_digest(stored) == claim.digest

    await table.record_changes([with_ip("b", "192.0.2.1", T0 + 1, 1)])
    await table.apply_job_outcome("job-1", "SUCCEEDED")
    [claim] = await table.claim_due([A1], 10, LEASE, "sender")
    await table.record_changes([with_ip("c", "198.51.100.9", T0 + 2, 2)])  # newer, not sent
    await table.mark_sent([claim], "job-2")
    assert b"198.51.100.9" in await stored_record(table, "u1")


async def test_members_sent_together_forget_only_the_ips_they_carried(table: MemberTable) -> None:
    """One POST of members with and without a consent IP: each row keeps its own record, the
    IP alone dropped; a member refused alike."""
    geo = Consent(amzn_user_data="GRANTED", ip_address="203.0.113.7")
    changes = [
        member_change(
            A1,
            member_record(euid, "DE", Action.ADD, [{"email": sha(euid)}], consent=consent),
            occurred_at=T0,
            position=0,
        )
        for euid, consent in [("u1", geo), ("u2", None), ("u3", geo), ("u4", None)]
    ]
    await table.record_changes(changes)
    records = {c.external_user_id: c.record for c in changes}
    claims = await table.claim_due([A1], 10, LEASE, "sender")
    assert await table.mark_sent([c for c in claims if c.external_user_id < "u3"], "job-1") == []
    assert await table.refuse([c for c in claims if c.external_user_id >= "u3"], "invalid") == []
    for euid, record in records.items():
        stored = await stored_record(table, euid)
        assert stored == without_consent_ip(record)
        assert (stored == record) == (b"203.0.113.7" not in record)


def test_a_member_dead_letter_holds_the_hashed_record_without_the_consent_ip() -> None:
    """A dead letter outlives the change in the topic: the consent IP (personal data, kept only
    until its change is accepted) stays out of it; the rest of the record is as it was sent."""
    consent = Consent(amzn_user_data="GRANTED", ip_address="203.0.113.77")
    record = member_record("u1", "FR", Action.ADD, [{"email": sha("a@x.io")}], consent)
    value = orjson.loads(dead_letter_value("vip", 7, "u1", ADD, record.json))
    assert b"203.0.113.77" not in orjson.dumps(value)
    assert value["record"] == orjson.loads(without_consent_ip(record.json))
    assert value["record"]["userConsent"]["geo"] == {"countryCode": "FR"}
