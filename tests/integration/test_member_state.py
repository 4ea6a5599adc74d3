"""The member table end to end (`syncd run`, tansu, the sandbox, an SQLite store): a replay costs
no records, an older event read after a newer one changes nothing, a SIGKILL resends at most
what was in flight, an erase removes a profile everywhere for good, and members of an audience
with a short ttl stay members without new events."""

from __future__ import annotations

import uuid
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import pytest

from syncd import synth
from syncd.localstack import (
    CONNECTION,
    DESTINATIONS,
    OTHER_CONNECTION,
    DaemonProcess,
    committed_offsets,
    produce,
    sqlite_daemon_config,
    wait_for,
)
from syncd.members import MemberTable
from syncd.store import Store

AUDIENCE_IDS = {d["audience"]: d["audience_id"] for d in DESTINATIONS}
VIP = AUDIENCE_IDS["vip"]


async def _settled(store_url: str) -> bool:
    """Nothing due and no job pending in the store."""
    store = await Store.connect(store_url)
    try:
        due = await MemberTable(store).waiting([d["audience_id"] for d in DESTINATIONS])
        return due == 0 and "PENDING" not in await store.job_counts()
    finally:
        await store.close()


async def test_a_replay_by_a_new_consumer_group_sends_nothing(
    kafka: Any, sandbox: Any, tmp_path: Path
) -> None:
    topic = f"replay-{uuid.uuid4().hex[:8]}"
    await kafka.create_topic(topic, partitions=2)
    events = list(synth.events(300, seed=21, audiences=("vip", "lapsed")))
    await produce(kafka.bootstrap, topic, events)
    raw = sqlite_daemon_config(kafka.bootstrap, sandbox, topic, tmp_path)
    store_url = raw["store"]["url"]
    daemon = DaemonProcess(tmp_path, raw, name="first").start()
    want = {orjson.loads(v)["profile_id"] for _, v in events}

    async def delivered_and_confirmed() -> bool:
        daemon.check_alive()
        got = {e["record"]["externalUserId"] for e in sandbox.state.ledger(CONNECTION)}
        return want <= got and await _settled(store_url)

    await wait_for(delivered_and_confirmed, 60, "every event delivered and its job succeeded")
    assert await daemon.terminate() == 0
    sent = sandbox.state.stats()["records"].get(CONNECTION)
    assert sent
    # the same topic again, from the start, by a new consumer group
    raw["kafka"]["group_id"] = f"replay-{uuid.uuid4().hex[:8]}"
    daemon = DaemonProcess(tmp_path, raw, name="replay").start()

    async def all_read_again() -> bool:
        daemon.check_alive()
        committed = await committed_offsets(kafka.bootstrap, topic, raw["kafka"]["group_id"])
        return sum(committed.values()) >= len(events) and await _settled(store_url)

    await wait_for(all_read_again, 60, "the replay read, recorded and committed")
    recorded = await daemon.metric("syncd_member_changes_total", {"outcome": "recorded"})
    # the same change again is not newer than what the member holds
    again = await daemon.metric("syncd_member_changes_total", {"outcome": "superseded"})
    assert await daemon.terminate() == 0
    assert sandbox.state.stats()["records"].get(CONNECTION) == sent  # not one record more
    assert recorded == 0
    assert again >= len(events)  # each event's change (per audience it names), superseded


async def test_an_older_event_read_after_a_newer_one_changes_nothing(
    kafka: Any, sandbox: Any, tmp_path: Path
) -> None:
    """One profile: a remove at 10:00:05 is read first, then an add at 10:00:01 (an older
    event, later in the topic). Amazon gets the remove, and nothing after it."""
    topic = f"order-{uuid.uuid4().hex[:8]}"
    await kafka.create_topic(topic, partitions=1)

    def event(action: str, at: str) -> tuple[bytes, bytes]:
        doc = {
            "profile_id": "late-1",
            "identifiers": {"email": "late@example.com"},
            "audiences": {action: ["vip"]},
            "occurred_at": at,
        }
        return b"late-1", orjson.dumps(doc)

    raw = sqlite_daemon_config(kafka.bootstrap, sandbox, topic, tmp_path)
    daemon = DaemonProcess(tmp_path, raw).start()
    await daemon.wait_ready()
    await produce(kafka.bootstrap, topic, [event("remove", "2026-11-22T10:00:05Z")])

    async def removed() -> bool:
        daemon.check_alive()
        return await _settled(raw["store"]["url"]) and bool(sandbox.state.ledger(CONNECTION))

    await wait_for(removed, 60, "the remove delivered and confirmed")
    await produce(kafka.bootstrap, topic, [event("add", "2026-11-22T10:00:01Z")])

    async def read_and_recorded() -> bool:
        daemon.check_alive()
        committed = await committed_offsets(kafka.bootstrap, topic, raw["kafka"]["group_id"])
        return sum(committed.values()) >= 2

    await wait_for(read_and_recorded, 60, "the older add read and committed")
    superseded = await daemon.metric("syncd_member_changes_total", {"outcome": "superseded"})
    assert await daemon.terminate() == 0
    assert [e["record"]["action"] for e in sandbox.state.ledger(CONNECTION)] == ["DELETE"]
    assert superseded == 1
    store = await Store.connect(raw["store"]["url"])
    try:
        member = await MemberTable(store).member(VIP, "late-1")
    finally:
        await store.close()
    assert member is not None
    assert (member.action, member.in_sync, member.due_since) == ("remove", True, None)


async def test_a_sigkill_resends_at_most_what_was_in_flight(
    kafka: Any, sandbox: Any, tmp_path: Path
) -> None:
    """SIGKILL mid-run, then restart: every profile arrives, and a record is sent twice only if
    its POST was accepted and its job not stored when the process died: at most the batches
    under way, `max_concurrency` per connection (2 here) of `max_records` (50) each."""
    topic = f"kill-{uuid.uuid4().hex[:8]}"
    await kafka.create_topic(topic, partitions=2)
    events = list(synth.events(2000, seed=31, audiences=("vip",)))
    await produce(kafka.bootstrap, topic, events)
    raw = sqlite_daemon_config(
        kafka.bootstrap,
        sandbox,
        topic,
        tmp_path,
        amazon={"max_concurrency": 2, "max_retry_time_s": 2.0, "request_timeout_s": 1.0},
        batch={"max_records": 50, "linger_ms": 0},
    )
    daemon = DaemonProcess(tmp_path, raw, name="killed").start()

    async def some_sent() -> bool:
        daemon.check_alive()
        return len(sandbox.state.ledger(CONNECTION)) >= 500

    await wait_for(some_sent, 60, "a quarter sent")
    daemon.kill()
    daemon = DaemonProcess(tmp_path, raw, name="restarted").start()
    want = {orjson.loads(v)["profile_id"] for _, v in events}

    async def everything() -> bool:
        daemon.check_alive()
        return want <= {e["record"]["externalUserId"] for e in sandbox.state.ledger(CONNECTION)}

    await wait_for(everything, 120, "every profile delivered after the restart")
    assert await daemon.terminate() == 0
    counts = Counter(e["record"]["externalUserId"] for e in sandbox.state.ledger(CONNECTION))
    assert set(counts) == want  # one event per profile: each sent once, but for the in-flight
    assert sum(n - 1 for n in counts.values()) <= 2 * 50


def _live(sandbox: Any, audience_id: int) -> set[str]:
    """The audience's live members as the sandbox holds them (none for an unknown audience)."""
    view = sandbox.state.members_view(audience_id)
    return {m["externalUserId"] for m in view["members"]} if view else set()


def _records_of(sandbox: Any, connection: str, profile: str) -> list[tuple[int, str]]:
    """(audienceId, action) of every record of `profile` Amazon accepted, in arrival order."""
    return [
        (e["audienceId"], e["record"]["action"])
        for e in sandbox.state.ledger(connection)
        if e["record"]["externalUserId"] == profile
    ]


async def test_an_erase_removes_the_profile_everywhere_and_an_older_add_does_not_bring_it_back(
    kafka: Any, sandbox: Any, tmp_path: Path
) -> None:
    """A profile in vip and newsletter (two connections) is erased: a DELETE reaches each
    audience, the sandbox holds it nowhere, and once the DELETEs' jobs succeeded the store keeps
    only its tombstones (one per configured audience). A replayed add older than the erase then
    changes nothing. A bystander in vip stays a member throughout."""
    topic = f"erase-{uuid.uuid4().hex[:8]}"
    await kafka.create_topic(topic, partitions=1)
    vip, lapsed, newsletter = (AUDIENCE_IDS[k] for k in ("vip", "lapsed", "newsletter"))

    def add(profile: str, at: str) -> tuple[bytes, bytes]:
        doc = {
            "profile_id": profile,
            "identifiers": {"email": f"{profile}@example.com"},
            "audiences": {"add": ["vip", "newsletter"]},
            "occurred_at": at,
        }
        return profile.encode(), orjson.dumps(doc)

    erase = orjson.dumps(
        {"profile_id": "gone-1", "erase": True, "occurred_at": "2026-11-22T10:00:05Z"}
    )
    raw = sqlite_daemon_config(kafka.bootstrap, sandbox, topic, tmp_path)
    store_url = raw["store"]["url"]
    daemon = DaemonProcess(tmp_path, raw).start()
    await produce(
        kafka.bootstrap,
        topic,
        [add("gone-1", "2026-11-22T10:00:01Z"), add("stays-1", "2026-11-22T10:00:01Z")],
    )

    async def members_everywhere() -> bool:
        daemon.check_alive()
        both = {"gone-1", "stays-1"}
        return (
            both <= _live(sandbox, vip)
            and both <= _live(sandbox, newsletter)
            and await _settled(store_url)
        )

    await wait_for(members_everywhere, 60, "both profiles members of vip and newsletter")
    await produce(kafka.bootstrap, topic, [(b"gone-1", erase)])

    async def member_rows(profile: str) -> list[Any]:
        store = await Store.connect(store_url)
        try:
            table = MemberTable(store)
            return [await table.member(a, profile) for a in (vip, lapsed, newsletter)]
        finally:
            await store.close()

    async def erased() -> bool:
        daemon.check_alive()
        gone = "gone-1" not in _live(sandbox, vip) | _live(sandbox, newsletter)
        return gone and await member_rows("gone-1") == [None, None, None]

    await wait_for(erased, 60, "gone-1 removed from both audiences and its rows deleted")
    assert _records_of(sandbox, CONNECTION, "gone-1") == [(vip, "CREATE"), (vip, "DELETE")]
    assert _records_of(sandbox, OTHER_CONNECTION, "gone-1") == [
        (newsletter, "CREATE"),
        (newsletter, "DELETE"),
    ]
    store = await Store.connect(store_url)
    try:
        table = MemberTable(store)
        tombstones = [await table.tombstone(a, "gone-1") for a in (vip, lapsed, newsletter)]
        assert "PENDING" not in await store.job_counts()
    finally:
        await store.close()
    erased_at = datetime(2026, 11, 22, 10, 0, 5, tzinfo=UTC).timestamp()
    assert tombstones == [erased_at] * 3

    # a replay of an add older than the erase
    await produce(kafka.bootstrap, topic, [add("gone-1", "2026-11-22T10:00:03Z")])

    async def replay_read() -> bool:
        daemon.check_alive()
        committed = await committed_offsets(kafka.bootstrap, topic, raw["kafka"]["group_id"])
        return sum(committed.values()) >= 4 and await _settled(store_url)

    await wait_for(replay_read, 60, "the older add read, recorded and committed")
    held_back = await daemon.metric("syncd_member_changes_total", {"outcome": "erased"})
    assert await daemon.terminate() == 0
    assert held_back == 2  # its change of vip and of newsletter, each older than the erase
    assert _records_of(sandbox, CONNECTION, "gone-1") == [(vip, "CREATE"), (vip, "DELETE")]
    assert _records_of(sandbox, OTHER_CONNECTION, "gone-1") == [
        (newsletter, "CREATE"),
        (newsletter, "DELETE"),
    ]
    assert _live(sandbox, vip) == _live(sandbox, newsletter) == {"stays-1"}
    assert await member_rows("gone-1") == [None, None, None]


TTL_S = 60
QUIET_S = 300  # five ttls without a single new event


@pytest.mark.slow
async def test_members_of_a_short_ttl_audience_stay_members_without_new_events(
    kafka: Any, sandbox: Any, tmp_path: Path
) -> None:
    """An audience whose ttl is 60 s (Amazon drops a member 60 s after its last CREATE) and
    `refresh_at = 0.5`: members added once stay live in the sandbox through five minutes without
    a new event, each CREATE re-sent at least once a ttl, and members removed stay removed
    (nothing is sent for them after their DELETE)."""
    topic = f"ttl-{uuid.uuid4().hex[:8]}"
    await kafka.create_topic(topic, partitions=1)
    audience = sandbox.state.create_audience(
        {
            "name": "shortTtlAudience",
            "countryCode": "US",
            "targetResource": {"connectionId": CONNECTION},
            "metadata": {"ttl": TTL_S},
        }
    )["audienceId"]
    destination = {
        "audience": "short",
        "connection_id": CONNECTION,
        "audience_id": audience,
        "country_code": "US",
    }
    kept = {f"kept-{i}" for i in range(20)}
    removed = {f"removed-{i}" for i in range(5)}

    def event(profile: str, action: str) -> tuple[bytes, bytes]:
        doc = {
            "profile_id": profile,
            "identifiers": {"email": f"{profile}@example.com"},
            "audiences": {action: ["short"]},
        }
        return profile.encode(), orjson.dumps(doc)

    raw = sqlite_daemon_config(
        kafka.bootstrap,
        sandbox,
        topic,
        tmp_path,
        members={"refresh_at": 0.5},
        destinations=[destination],
    )
    store_url = raw["store"]["url"]
    daemon = DaemonProcess(tmp_path, raw).start()
    await produce(kafka.bootstrap, topic, [event(p, "add") for p in sorted(kept | removed)])

    async def all_added() -> bool:
        daemon.check_alive()
        return _live(sandbox, audience) == kept | removed and await _settled(store_url)

    await wait_for(all_added, 60, "every profile a member")
    await produce(kafka.bootstrap, topic, [event(p, "remove") for p in sorted(removed)])

    async def some_removed() -> bool:
        daemon.check_alive()
        return _live(sandbox, audience) == kept and await _settled(store_url)

    await wait_for(some_removed, 60, "the removed profiles removed")
    quiet_until = sandbox.state.now() + QUIET_S

    async def quiet_period_over() -> bool:
        """Every check of the quiet period sees exactly the kept profiles live."""
        daemon.check_alive()
        live = _live(sandbox, audience)
        assert live == kept, f"lapsed: {sorted(kept - live)}, back: {sorted(live - kept)}"
        return sandbox.state.now() >= quiet_until

    await wait_for(quiet_period_over, QUIET_S + 60, "five minutes without events", interval=1.0)
    refreshed = await daemon.metric("syncd_members_refreshed_total")
    assert await daemon.terminate() == 0
    sent = Counter(
        (e["record"]["externalUserId"], e["record"]["action"])
        for e in sandbox.state.ledger(CONNECTION)
    )
    # live through QUIET_S needs a CREATE at least every ttl: the first and QUIET_S / TTL_S more
    assert {p: sent[p, "CREATE"] for p in kept if sent[p, "CREATE"] <= QUIET_S // TTL_S} == {}
    assert {p for p, action in sent if action == "DELETE"} == removed
    for profile in removed:  # its add, its remove, and nothing after
        assert _records_of(sandbox, CONNECTION, profile) == [
            (audience, "CREATE"),
            (audience, "DELETE"),
        ]
    assert refreshed >= len(kept) * QUIET_S // TTL_S
