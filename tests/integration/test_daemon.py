"""`syncd run` end to end: a real broker, the sandbox over real HTTP, SQLite and PostgreSQL."""

from __future__ import annotations

import hashlib
import uuid
from collections import Counter
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
    daemon_config,
    end_offsets,
    produce,
    sqlite_daemon_config,
    wait_for,
)
from syncd.members import MemberTable
from syncd.store import Store
from tests.harness import read_topic

pytestmark = pytest.mark.integration

# Known hashes from the public vectors (spec/vectors-public.json).
E1 = "836f82db99121b3481011f16b49dfa5fbc714a0d1b1b9f784a1ebbbf5b39577f"  # John.Doe@Example.COM
P1 = "97ca0a65a57398aaab6058762b0ee050a8afe3326610887b19ce8ba492e925f6"  # +1 (206) 266-1000
Z3 = "5bbec9d03f12671bb77e1f5a2ad2452dc102c115ce339e514e888127378e9121"  # SW1A 1AA (GB)
A6 = "050a9a8a5d97863b1f57b3faa3ce8f8bde766092ffcce8a2d6eb41da65605df5"  # 10 Downing Street (GB)
E2 = "242a38329ea35f6ac84ff9ab7e21fedfbfed3d7fe013f1ec014f2ced0b00c532"  # jane.doe+promo@gmail
S1 = "6959097001d10501ac7d54c0bdb8db61420f658f2922cc26e46d536119a31126"  # California (US)


def event(profile_id: str, **fields: Any) -> bytes:
    return orjson.dumps({"profile_id": profile_id, **fields})


HAND_MADE: list[tuple[bytes, bytes]] = [
    (
        b"p-1",
        event(
            "p-1",
            country="US",
            identifiers={"email": "  John.Doe@Example.COM ", "phone": "+1 (206) 266-1000"},
            audiences={"add": ["vip"]},
            consent={
                "amzn_user_data": "GRANTED",
                "amzn_ad_storage": "DENIED",
                "tcf": "CPXxRfAPXxRfAAfKABENB-CgAAAAAAAAAAYgAAAAAAAA",
                "ip_address": "203.0.113.7",
            },
        ),
    ),
    (
        b"p-2",
        event(
            "p-2",
            country="uk",
            identifiers={"postal_code": "SW1A 1AA", "address": "10 Downing Street"},
            audiences={"remove": ["newsletter"]},
        ),
    ),
    (
        b"user@example.com",
        event(
            "user@example.com",
            identifiers={
                "email": ["John.Doe@Example.COM", "jane.doe+promo@gmail.com"],
                "state": "California",
            },
            audiences={"add": ["vip", "lapsed"]},
        ),
    ),
]
BAD: list[tuple[bytes, bytes, str]] = [
    (b"b-1", b"{not json", "not_json"),
    (
        b"b-2",
        event("", identifiers={"email": "a@example.com"}, audiences={"add": ["vip"]}),
        "no_profile_id",
    ),
    (
        b"b-3",
        event(
            "b-3", identifiers={"email": "a@example.com"}, audiences={"add": ["nobody-knows-me"]}
        ),
        "unknown_audience",
    ),
    (
        b"b-4",
        event("b-4", identifiers={"email": "not-an-email"}, audiences={"add": ["vip"]}),
        "no_usable_identifier",
    ),
    (
        b"b-5",
        event(
            "b-5",
            identifiers={"email": "b5@example.com", "phone": True},
            audiences={"add": ["vip"]},
        ),
        "bad_identifiers",
    ),
]


async def ledger(sandbox: Any) -> list[dict[str, Any]]:
    return [*sandbox.state.ledger(CONNECTION), *sandbox.state.ledger(OTHER_CONNECTION)]


def changes(messages: list[tuple[bytes, bytes]]) -> set[tuple[str, str, str]]:
    """(profile id, audience key, API action) of every change in canonical events."""
    out = set()
    for _, value in messages:
        e = orjson.loads(value)
        for key, action in (("add", "CREATE"), ("remove", "DELETE")):
            out |= {(e["profile_id"], a, action) for a in e["audiences"].get(key, [])}
    return out


def by_member(entries: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for e in entries:
        out.setdefault(e["record"]["externalUserId"], []).append(e)
    return out


@pytest.fixture
def topics(kafka: Any) -> tuple[str, str]:
    return f"changes-{uuid.uuid4().hex[:8]}", f"dlq-{uuid.uuid4().hex[:8]}"


async def test_every_valid_change_arrives_as_the_contract_says(
    kafka: Any, sandbox: Any, store_url: str, tmp_path: Path, topics: tuple[str, str]
) -> None:
    topic, dlq = topics
    await kafka.create_topic(topic, partitions=3)
    await kafka.create_topic(dlq, partitions=1)
    synthetic = list(synth.events(300, seed=3, audiences=("vip", "newsletter")))
    tombstone = (b"t-1", None)  # a compacted topic's deleted key: filtered, not dead-lettered
    await produce(
        kafka.bootstrap, topic, [*HAND_MADE, *[(k, v) for k, v, _ in BAD], tombstone, *synthetic]
    )
    raw = daemon_config(
        bootstrap=kafka.bootstrap,
        topic=topic,
        dlq=dlq,
        sandbox_url=sandbox.url,
        token_url=sandbox.token_url,
        store_url=store_url,
    )
    daemon = DaemonProcess(tmp_path, raw).start()
    audience_ids = {d["audience"]: d["audience_id"] for d in DESTINATIONS}
    want = {(m, audience_ids[a], action) for m, a, action in changes(synthetic)}
    mapped = hashlib.sha256(b"user@example.com").hexdigest()  # id outside the API's pattern
    want |= {
        ("p-1", audience_ids["vip"], "CREATE"),
        ("p-2", audience_ids["newsletter"], "DELETE"),
        (mapped, audience_ids["vip"], "CREATE"),
        (mapped, audience_ids["lapsed"], "CREATE"),
    }

    async def all_delivered() -> bool:
        daemon.check_alive()
        got = {
            (e["record"]["externalUserId"], e["audienceId"], e["record"]["action"])
            for e in await ledger(sandbox)
        }
        return want <= got

    await wait_for(all_delivered, 60, "every valid change in the sandbox ledger")
    members = by_member(await ledger(sandbox))

    [p1] = members["p-1"]
    assert p1["audienceId"] == 413642381039213536
    assert p1["connectionId"] == CONNECTION
    assert p1["record"] == {
        "externalUserId": "p-1",
        "countryCode": "US",
        "action": "CREATE",
        "hashedPII": [{"email": E1, "phone": P1}],
        "userConsent": {
            "consent": {
                "amzn": {"amznAdStorage": "DENIED", "amznUserData": "GRANTED"},
                "tcf": "CPXxRfAPXxRfAAfKABENB-CgAAAAAAAAAAYgAAAAAAAA",
            },
            "geo": {"countryCode": "US", "ipAddress": "203.0.113.7"},
        },
    }
    [p2] = members["p-2"]
    assert p2["connectionId"] == OTHER_CONNECTION
    assert p2["record"]["countryCode"] == "GB"  # UK is an alias of GB
    assert p2["record"]["action"] == "DELETE"
    assert p2["record"]["hashedPII"] == [{"address": A6, "postal": Z3}]
    assert sorted(e["audienceId"] for e in members[mapped]) == [347891, 413642381039213536]
    for e in members[mapped]:
        assert e["record"]["countryCode"] == "US"  # no country: the destination's
        assert e["record"]["hashedPII"] == [{"email": E1, "state": S1}, {"email": E2}]
    assert "user@example.com" not in orjson.dumps(await ledger(sandbox)).decode()

    dead = await read_topic(kafka.bootstrap, dlq, len(BAD))
    reasons = {m.key: dict(m.headers)["syncd-reason"].decode() for m in dead}
    assert reasons == {k: r for k, _, r in BAD}
    assert {m.key: m.value for m in dead} == {k: v for k, v, _ in BAD}  # original bytes
    # the detail names the field (never its value)
    details = {m.key: dict(m.headers).get("syncd-detail", b"") for m in dead}
    assert details[b"b-5"] == b"identifiers.phone holds a value of type boolean"
    assert details[b"b-1"] == b"line 1 column 2"
    assert not any(b"example.com" in d for d in details.values())

    async def all_terminal() -> bool:
        store = await Store.connect(store_url)
        try:
            counts = await store.job_counts()
        finally:
            await store.close()
        return bool(counts) and "PENDING" not in counts

    await wait_for(all_terminal, 60, "every job terminal in the store")
    # what routing counted in the transform worker is published by the daemon
    assert await daemon.metric("syncd_records_default_country_total", {"audience": "lapsed"}) >= 1
    assert await daemon.metric("syncd_pii_values_dropped_total", {"field": "email"}) >= 1
    assert await daemon.metric("syncd_events_filtered_total", {"reason": "tombstone"}) == 1
    assert await daemon.metric("syncd_events_dead_lettered_total", {"reason": "not_json"}) == 1
    assert await daemon.terminate() == 0
    assert sandbox.state.stats()["terminal_polls"] == 0
    ends = await end_offsets(kafka.bootstrap, topic)
    assert await committed_offsets(kafka.bootstrap, topic, raw["kafka"]["group_id"]) == ends


async def test_batches_respect_max_records_and_max_bytes(
    kafka: Any, sandbox: Any, store_url: str, tmp_path: Path, topics: tuple[str, str]
) -> None:
    topic, _ = topics
    await kafka.create_topic(topic, partitions=2)
    await produce(kafka.bootstrap, topic, list(synth.events(1200, seed=5, audiences=("vip",))))
    raw = daemon_config(
        bootstrap=kafka.bootstrap,
        topic=topic,
        sandbox_url=sandbox.url,
        token_url=sandbox.token_url,
        store_url=store_url,
        batch={"max_records": 100, "max_bytes": 60_000, "linger_ms": 1000},
    )
    daemon = DaemonProcess(tmp_path, raw).start()

    async def delivered() -> bool:
        daemon.check_alive()
        return len(sandbox.state.ledger(CONNECTION)) >= 1200

    await wait_for(delivered, 60, "1200 records delivered")
    assert await daemon.terminate() == 0
    jobs: dict[str, list[dict[str, Any]]] = {}
    for e in sandbox.state.ledger(CONNECTION):
        jobs.setdefault(e["jobRequestId"], []).append(e["record"])
    sizes = [len(r) for r in jobs.values()]
    assert max(sizes) <= 100
    for records in jobs.values():
        body = orjson.dumps(
            {
                "audienceId": 413642381039213536,
                "targetResource": {"connectionId": CONNECTION},
                "records": records,
            }
        )
        assert len(body) <= 60_000
    assert max(sizes) > 1  # batching did happen


async def test_reading_never_waits_for_sending_and_a_lingering_claim_goes_out_at_shutdown(
    kafka: Any, sandbox: Any, tmp_path: Path, topics: tuple[str, str]
) -> None:
    """Ingest and sending meet only in the member table: with an hour-long linger and fewer
    members due than max_records, every event is read and recorded (far more events than
    `kafka.max_pending_events`) while nothing is sent; the shutdown sends what lingers, one
    batch per audience."""
    topic, _ = topics
    cap = 400
    await kafka.create_topic(topic, partitions=2)
    events = list(synth.events(1600, seed=8, audiences=("vip", "lapsed")))
    assert all(b'"vip"' in value or b'"lapsed"' in value for _, value in events)
    await produce(kafka.bootstrap, topic, events)
    raw = sqlite_daemon_config(
        kafka.bootstrap,
        sandbox,
        topic,
        tmp_path,
        kafka={"max_pending_events": cap},
        batch={"max_records": 6000, "linger_ms": 3_600_000},
    )
    daemon = DaemonProcess(tmp_path, raw).start()
    await daemon.wait_ready()

    async def all_recorded() -> bool:
        daemon.check_alive()
        return (
            await daemon.metric("syncd_events_consumed_total") >= len(events)
            and await daemon.metric("syncd_pending_events") == 0
        )

    await wait_for(all_recorded, 60, "every event read and recorded")
    assert sandbox.state.ledger(CONNECTION) == []  # lingering: nothing sent yet
    assert await daemon.terminate() == 0
    ledger = sandbox.state.ledger(CONNECTION)
    assert {e["record"]["externalUserId"] for e in ledger} == {
        orjson.loads(value)["profile_id"] for _, value in events
    }
    jobs = Counter(e["jobRequestId"] for e in ledger)
    assert len(jobs) == 2  # one batch per audience


async def test_restart_resumes_without_loss_and_commits_never_pass_unrecorded_events(
    kafka: Any, sandbox: Any, store_url: str, tmp_path: Path, topics: tuple[str, str]
) -> None:
    """At-least-once into the store: a committed offset only covers events whose member is in
    the member table. A clean restart sends nothing of the first run again and delivers the
    rest."""
    topic, _ = topics
    await kafka.create_topic(topic, partitions=2)
    first = list(synth.events(600, seed=11, audiences=("vip",)))
    await produce(kafka.bootstrap, topic, first)
    raw = daemon_config(
        bootstrap=kafka.bootstrap,
        topic=topic,
        sandbox_url=sandbox.url,
        token_url=sandbox.token_url,
        store_url=store_url,
    )
    [vip] = [d["audience_id"] for d in raw["destinations"] if d["audience"] == "vip"]
    daemon = DaemonProcess(tmp_path, raw, name="first").start()
    group = raw["kafka"]["group_id"]
    # offsets -> member, to check that committed offsets only cover recorded events
    consumer_view = await _offset_members(kafka.bootstrap, topic)
    store = await Store.connect(store_url)
    table = MemberTable(store)
    checked: set[tuple[int, int]] = set()

    async def all_recorded() -> bool:
        daemon.check_alive()
        committed = await committed_offsets(kafka.bootstrap, topic, group)
        for (p, o), member in consumer_view.items():
            if (p, o) not in checked and o < committed.get(p, 0):
                assert await table.member(vip, member) is not None, (
                    f"offset {p}/{o} committed before its change was recorded"
                )
                checked.add((p, o))
        return sum(committed.values()) >= len(first)

    try:
        await wait_for(all_recorded, 60, "every event of the first run committed")
    finally:
        await store.close()
    assert await daemon.terminate() == 0
    sent_first = len(sandbox.state.ledger(CONNECTION))
    second = list(synth.events(600, seed=12, audiences=("vip",), id_prefix="second-"))
    await produce(kafka.bootstrap, topic, second)
    daemon = DaemonProcess(tmp_path, raw, name="second").start()
    want = {orjson.loads(v)["profile_id"] for _, v in [*first, *second]}

    async def everything() -> bool:
        daemon.check_alive()
        got = {e["record"]["externalUserId"] for e in sandbox.state.ledger(CONNECTION)}
        return want <= got

    await wait_for(everything, 90, "every event of both runs delivered")
    assert await daemon.terminate() == 0
    firsts = {orjson.loads(v)["profile_id"] for _, v in first}
    resent = [
        e
        for e in sandbox.state.ledger(CONNECTION)[sent_first:]
        if e["record"]["externalUserId"] in firsts
    ]
    # a first-run member the first run sent is not sent again (the second run has no change
    # of it); those it left unsent (released at its shutdown) are sent once
    assert len(Counter(e["record"]["externalUserId"] for e in resent)) == len(resent)
    sent_before = {
        e["record"]["externalUserId"] for e in sandbox.state.ledger(CONNECTION)[:sent_first]
    }
    assert not sent_before & {e["record"]["externalUserId"] for e in resent}


async def _offset_members(bootstrap: str, topic: str) -> dict[tuple[int, int], str]:
    from aiokafka import AIOKafkaConsumer

    consumer = AIOKafkaConsumer(
        topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest", enable_auto_commit=False
    )
    await consumer.start()
    out: dict[tuple[int, int], str] = {}
    try:
        while True:
            batch = await consumer.getmany(timeout_ms=1000)
            if not batch:
                return out
            for tp, msgs in batch.items():
                for m in msgs:
                    out[(tp.partition, m.offset)] = orjson.loads(m.value)["profile_id"]
    finally:
        await consumer.stop()
