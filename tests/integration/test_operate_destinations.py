"""Operating destinations end to end (`syncd run`, tansu, the sandbox, an SQLite store): a paused
destination sends nothing and loses nothing while another flows, and catches up once a restart
unpauses it; a destination removed from the config keeps its rows, which the next start reports
and `syncd members purge` drops."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import orjson

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
from tests.harness import run_syncd, waiting_members

NEWSLETTER = next(d["audience_id"] for d in DESTINATIONS if d["audience"] == "newsletter")
VIP = next(d["audience_id"] for d in DESTINATIONS if d["audience"] == "vip")


def produced(events: list[tuple[bytes, bytes]], audience: str) -> set[tuple[str, str]]:
    """(profile id, CREATE/DELETE) of each event naming `audience` (one event per profile)."""
    out = set()
    for _, value in events:
        event = orjson.loads(value)
        for action, keys in event["audiences"].items():
            if audience in keys:
                out.add((event["profile_id"], "CREATE" if action == "add" else "DELETE"))
    return out


def ledger(sandbox: Any, connection: str) -> set[tuple[str, str]]:
    return {
        (e["record"]["externalUserId"], e["record"]["action"])
        for e in sandbox.state.ledger(connection)
    }


async def test_a_paused_destination_waits_and_catches_up_once_unpaused(
    kafka: Any, sandbox: Any, tmp_path: Path
) -> None:
    topic = f"paused-{uuid.uuid4().hex[:8]}"
    await kafka.create_topic(topic, partitions=2)
    events = list(synth.events(200, seed=5, audiences=("vip", "newsletter")))
    await produce(kafka.bootstrap, topic, events)
    want_vip, want_newsletter = produced(events, "vip"), produced(events, "newsletter")
    assert want_vip
    assert want_newsletter
    # newsletter is the only destination of OTHER_CONNECTION: that connection sends nothing
    paused = [{**d, "paused": d["audience"] == "newsletter"} for d in DESTINATIONS]
    raw = sqlite_daemon_config(kafka.bootstrap, sandbox, topic, tmp_path, destinations=paused)
    store_url, group = raw["store"]["url"], raw["kafka"]["group_id"]
    daemon = DaemonProcess(tmp_path, raw, name="paused").start()

    async def vip_sent_and_all_recorded() -> bool:
        daemon.check_alive()
        committed = await committed_offsets(kafka.bootstrap, topic, group)
        return (
            ledger(sandbox, CONNECTION) >= want_vip
            and sum(committed.values()) >= len(events)
            and await waiting_members(store_url, VIP) == 0
        )

    await wait_for(vip_sent_and_all_recorded, 60, "vip delivered, every event recorded")
    assert await daemon.metric("syncd_destination_paused", {"audience": "newsletter"}) == 1
    assert await daemon.metric("syncd_destination_paused", {"audience": "vip"}) == 0
    assert await daemon.terminate() == 0
    assert ledger(sandbox, CONNECTION) == want_vip
    assert sandbox.state.ledger(OTHER_CONNECTION) == []  # nothing sent...
    assert await waiting_members(store_url, NEWSLETTER) == len(want_newsletter)  # ...nothing lost
    assert "destination paused" in daemon.logs()

    # unpaused: the same consumer group (its offsets are committed: nothing is read again)
    raw["destinations"] = DESTINATIONS
    daemon = DaemonProcess(tmp_path, raw, name="unpaused").start()

    async def newsletter_caught_up() -> bool:
        daemon.check_alive()
        return ledger(sandbox, OTHER_CONNECTION) >= want_newsletter

    await wait_for(newsletter_caught_up, 60, "the newsletter backlog sent")
    assert await daemon.metric("syncd_member_changes_total", {"outcome": "recorded"}) == 0
    assert await daemon.terminate() == 0
    assert ledger(sandbox, OTHER_CONNECTION) == want_newsletter
    assert len(sandbox.state.ledger(OTHER_CONNECTION)) == len(want_newsletter)  # each once
    members = {m for m, _ in sandbox.state.membership(NEWSLETTER).live(0, 10**9)}
    assert members == {p for p, action in want_newsletter if action == "CREATE"}


async def test_a_removed_destination_is_reported_at_start_up_and_purged(
    kafka: Any, sandbox: Any, tmp_path: Path
) -> None:
    topic = f"removed-{uuid.uuid4().hex[:8]}"
    await kafka.create_topic(topic, partitions=1)
    events = list(synth.events(60, seed=9, audiences=("vip", "newsletter")))
    await produce(kafka.bootstrap, topic, events)
    newsletter = len(produced(events, "newsletter"))
    raw = sqlite_daemon_config(kafka.bootstrap, sandbox, topic, tmp_path)
    group = raw["kafka"]["group_id"]
    daemon = DaemonProcess(tmp_path, raw, name="before").start()

    async def all_recorded() -> bool:
        daemon.check_alive()
        committed = await committed_offsets(kafka.bootstrap, topic, group)
        return sum(committed.values()) >= len(events)

    await wait_for(all_recorded, 60, "every event recorded")
    assert await daemon.terminate() == 0

    raw["destinations"] = [d for d in DESTINATIONS if d["audience"] != "newsletter"]
    daemon = DaemonProcess(tmp_path, raw, name="after").start()
    await daemon.wait_ready()
    labels = {"audience_id": str(NEWSLETTER)}

    async def reported() -> bool:
        daemon.check_alive()
        return await daemon.metric("syncd_orphaned_members", labels) == newsletter

    await wait_for(reported, 60, "the removed destination's rows reported")
    assert await daemon.terminate() == 0
    [line] = [
        orjson.loads(x)
        for x in daemon.logs().splitlines()
        if x.startswith("{") and "no destination names" in x
    ]
    assert (line["audience_id"], line["members"]) == (NEWSLETTER, newsletter)

    config = str(daemon.config_path)
    code, out, err = await run_syncd(
        "members", "purge", "--config", config, "--audience-id", str(NEWSLETTER), "--yes"
    )
    assert code == 0, err
    assert f"dropped {newsletter} member rows" in out
    store = await Store.connect(raw["store"]["url"])
    try:
        table = MemberTable(store)
        assert NEWSLETTER not in await table.audience_ids()
        assert VIP in await table.audience_ids()  # the other destinations keep theirs
    finally:
        await store.close()
