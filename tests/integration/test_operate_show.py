"""`syncd members show` against real processes (tansu, the sandbox, `syncd run`, an SQLite store):
while the daemon runs, it explains a member waiting for its connection's budget, one held by a
job still pending at Amazon, one Amazon refused, and one erased. Each is read as JSON and as
text; neither ever holds the member's email or its hash."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import pytest

from syncd.localstack import (
    CONNECTION,
    DESTINATIONS,
    OTHER_CONNECTION,
    DaemonProcess,
    produce,
    running_sandbox,
    sqlite_daemon_config,
    wait_for,
)
from syncd.members import MemberState, MemberTable
from syncd.pii.hashing import hash_field
from syncd.sandbox.server import RunningSandbox
from syncd.sandbox.state import SandboxSettings
from syncd.store import Store
from tests.harness import run_syncd

pytestmark = pytest.mark.integration

VIP_DEST = next(d for d in DESTINATIONS if d["audience"] == "vip")
NEWSLETTER_DEST = next(d for d in DESTINATIONS if d["audience"] == "newsletter")  # GB
VIP = int(VIP_DEST["audience_id"])
NEWSLETTER = int(NEWSLETTER_DEST["audience_id"])


def email(profile: str) -> str:
    return f"{profile}@example.com"


def add(profile: str, at: str, audience: str = "vip") -> tuple[bytes, bytes]:
    doc = {
        "profile_id": profile,
        "identifiers": {"email": email(profile)},
        "audiences": {"add": [audience]},
        "occurred_at": at,
    }
    return profile.encode(), orjson.dumps(doc)


def iso(at: str) -> str:
    """An event's occurred_at as `members show` prints times."""
    return datetime.fromisoformat(at).astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


async def member(store_url: str, audience_id: int, profile: str) -> MemberState | None:
    store = await Store.connect(store_url)
    try:
        return await MemberTable(store).member(audience_id, profile)
    finally:
        await store.close()


async def show(
    daemon: DaemonProcess, audience: str, profile: str, country: str = "US"
) -> tuple[dict[str, Any], str]:
    """`syncd members show` of the profile with the daemon's config: (the --json document, the
    text for people). Neither holds the profile's email nor its hash."""
    base = ("members", "show", "--config", str(daemon.config_path))
    base += ("--audience", audience, "--profile", profile)
    code, out, err = await run_syncd(*base, "--json")
    assert code == 0, err
    code, human, err = await run_syncd(*base)
    assert code == 0, err
    hashed = hash_field("email", email(profile), country)
    assert hashed is not None
    for text in (out, human):
        assert email(profile) not in text
        assert hashed[1] not in text
    return orjson.loads(out), human


async def start(
    kafka: Any, sandbox: RunningSandbox, tmp_path: Path, name: str, **sections: Any
) -> tuple[DaemonProcess, str]:
    """A ready `syncd run` (its store's schema made) on a fresh one-partition topic; returns it
    and the topic."""
    topic = f"{name}-{uuid.uuid4().hex[:8]}"
    await kafka.create_topic(topic, partitions=1)
    raw = sqlite_daemon_config(kafka.bootstrap, sandbox, topic, tmp_path, **sections)
    daemon = DaemonProcess(tmp_path, raw, name=name).start()
    await daemon.wait_ready()
    return daemon, topic


def sent_to(sandbox: RunningSandbox, connection: str, profile: str) -> list[dict[str, Any]]:
    """The sandbox's ledger entries of `profile` on `connection`, in order."""
    return [e for e in sandbox.state.ledger(connection) if e["record"]["externalUserId"] == profile]


async def test_show_says_a_member_waits_for_the_connections_budget(
    kafka: Any, sandbox: RunningSandbox, tmp_path: Path
) -> None:
    """A budget of 2 records an hour: two members are sent, the third change is recorded and
    claimed but its batch waits for the window to roll. `members show` says so, and that
    nothing was sent."""
    daemon, topic = await start(
        kafka,
        sandbox,
        tmp_path,
        "budget",
        destinations=[VIP_DEST],
        budget={"records_per_hour": 2, "window_seconds": 3600},
    )
    store_url = daemon.raw["store"]["url"]
    at = "2026-11-22T10:00:01Z"
    await produce(kafka.bootstrap, topic, [add("b-1", at), add("b-2", at)])

    async def budget_spent() -> bool:
        daemon.check_alive()
        return len(sandbox.state.ledger(CONNECTION)) == 2

    await wait_for(budget_spent, 60, "the two records of the budget sent")
    await produce(kafka.bootstrap, topic, [add("b-3", "2026-11-22T10:00:02Z")])

    async def waits_for_budget() -> bool:
        daemon.check_alive()
        row = await member(store_url, VIP, "b-3")
        paused = await daemon.metric("syncd_budget_paused", {"connection": CONNECTION})
        return row is not None and paused == 1

    await wait_for(waits_for_budget, 60, "b-3 recorded and its batch waiting for budget")
    doc, human = await show(daemon, "vip", "b-3")
    assert sent_to(sandbox, CONNECTION, "b-3") == []
    assert doc["state"] == "pending"
    assert doc["desired"] == {"action": "add", "occurred_at": "2026-11-22T10:00:02Z"}
    assert (doc["sent"], doc["job"], doc["outcome"]) == (None, None, None)
    waiting = " / ".join(doc["waiting"])
    assert "budget is used up (2 of 2 records in the last 3600 s)" in waiting
    assert "waits for the window to roll" in waiting
    assert "sending" not in waiting  # claimed, but not on its way to Amazon
    assert "budget is used up" in human
    assert "last sent" not in human
    assert await daemon.terminate() == 0


async def test_show_names_the_pending_job_that_holds_a_member(kafka: Any, tmp_path: Path) -> None:
    """Amazon keeps every job PENDING for 10 minutes: the member was sent, and its next change
    waits for that job. `members show` names the job and says the member waits for it."""
    settings = SandboxSettings(job_delay_s=600, rate_per_s=1000, burst=1000)
    async with running_sandbox(settings) as sb:
        daemon, topic = await start(kafka, sb, tmp_path, "pending", destinations=[VIP_DEST])
        store_url = daemon.raw["store"]["url"]
        await produce(kafka.bootstrap, topic, [add("h-1", "2026-11-22T10:00:01Z")])

        async def sent_and_stored() -> bool:
            daemon.check_alive()
            row = await member(store_url, VIP, "h-1")
            return row is not None and row.job_request_id is not None and row.sent_at is not None

        await wait_for(sent_and_stored, 60, "h-1 sent and its job stored")
        [entry] = sent_to(sb, CONNECTION, "h-1")
        job_id = entry["jobRequestId"]
        doc, human = await show(daemon, "vip", "h-1")
        assert doc["state"] == "pending"
        assert doc["sent"]["action"] == "add"
        assert doc["sent"]["same_as_desired"] is True
        assert doc["job"]["job_request_id"] == job_id
        assert doc["job"]["state"] == "PENDING"
        assert doc["job"]["terminal_at"] is None
        assert doc["outcome"] is None
        assert doc["waiting"] == [f"its job {job_id} is pending at Amazon"]
        assert doc["next_refresh_at"] is None  # not a member until the job confirms it
        assert f"{job_id}: PENDING" in human
        assert f"its job {job_id} is pending at Amazon" in human

        # a newer change of the member is recorded, and waits for the job too
        remove = orjson.dumps(
            {
                "profile_id": "h-1",
                "identifiers": {"email": email("h-1")},
                "audiences": {"remove": ["vip"]},
                "occurred_at": "2026-11-22T10:00:09Z",
            }
        )
        await produce(kafka.bootstrap, topic, [(b"h-1", remove)])

        async def change_recorded() -> bool:
            daemon.check_alive()
            row = await member(store_url, VIP, "h-1")
            return row is not None and row.action == "remove"

        await wait_for(change_recorded, 60, "h-1's removal recorded")
        doc, human = await show(daemon, "vip", "h-1")
        assert doc["desired"]["action"] == "remove"
        assert doc["sent"]["same_as_desired"] is False
        assert doc["waiting"] == [
            f"its job {job_id} is pending at Amazon",
            "changed since that send: sent again once the job has ended",
        ]
        assert "differs from what is wanted" in human
        assert len(sent_to(sb, CONNECTION, "h-1")) == 1  # held: not sent again meanwhile
        assert await daemon.terminate() == 0


async def test_show_says_a_member_waits_for_its_blocked_connection(
    kafka: Any, sandbox: RunningSandbox, tmp_path: Path
) -> None:
    """The newsletter audience does not exist at Amazon: `syncd run`'s start-up checks block its
    connection (not_found). `members show` says the member waits for that setup fault, and that
    it goes out by itself once the fault clears; after the audience is created it is a member."""
    sandbox.state.terms_accepted = True
    sandbox.state.provide_connection(OTHER_CONNECTION)  # the connection, not the audience
    topic = f"blocked-{uuid.uuid4().hex[:8]}"
    await kafka.create_topic(topic, partitions=1)
    raw = sqlite_daemon_config(
        kafka.bootstrap, sandbox, topic, tmp_path, destinations=[NEWSLETTER_DEST]
    )
    daemon = DaemonProcess(tmp_path, raw, name="blocked", provide=False).start()
    await daemon.wait_ready()
    store_url = raw["store"]["url"]
    at = "2026-11-22T10:00:01Z"
    await produce(kafka.bootstrap, topic, [add("x-1", at, "newsletter")])
    blocked = {"connection": OTHER_CONNECTION, "cause": "not_found"}

    async def waits_blocked() -> bool:
        daemon.check_alive()
        row = await member(store_url, NEWSLETTER, "x-1")
        return row is not None and await daemon.metric("syncd_connection_blocked", blocked) == 1

    await wait_for(waits_blocked, 60, "x-1 recorded, its connection blocked")
    doc, human = await show(daemon, "newsletter", "x-1", country="GB")
    assert sent_to(sandbox, OTHER_CONNECTION, "x-1") == []
    assert doc["state"] == "pending"
    waiting = " / ".join(doc["waiting"])
    assert f"connection {OTHER_CONNECTION} is blocked (not_found) since " in waiting
    assert "resumes by itself once the fault clears" in waiting
    assert "blocked (not_found)" in human

    sandbox.state.provide_audience(NEWSLETTER, OTHER_CONNECTION)

    async def delivered() -> bool:
        daemon.check_alive()
        row = await member(store_url, NEWSLETTER, "x-1")
        return row is not None and row.outcome == "confirmed"

    await wait_for(delivered, 90, "x-1 delivered once its audience exists")
    doc, human = await show(daemon, "newsletter", "x-1", country="GB")
    assert doc["state"] == "member"
    assert doc["waiting"] == []
    assert "blocked" not in human
    assert await daemon.terminate() == 0


async def test_show_says_amazon_refused_a_member(kafka: Any, tmp_path: Path) -> None:
    """Amazon requires consent of UK members: a GB add without it ends in the job's
    invalidRecords. `members show` says Amazon refused it, why, and that it is not sent again
    until it changes."""
    settings = SandboxSettings(job_delay_s=0.2, require_consent_in=True, rate_per_s=1000)
    async with running_sandbox(settings) as sb:
        daemon, topic = await start(kafka, sb, tmp_path, "refused", destinations=[NEWSLETTER_DEST])
        store_url = daemon.raw["store"]["url"]
        at = "2026-11-22T10:00:01Z"
        await produce(kafka.bootstrap, topic, [add("r-1", at, "newsletter")])

        async def refused() -> bool:
            daemon.check_alive()
            row = await member(store_url, NEWSLETTER, "r-1")
            return row is not None and row.outcome == "invalid"

        await wait_for(refused, 60, "r-1 refused by Amazon and marked invalid")
        [entry] = sent_to(sb, OTHER_CONNECTION, "r-1")
        doc, human = await show(daemon, "newsletter", "r-1", country="GB")
        assert doc["state"] == "invalid"
        assert doc["desired"] == {"action": "add", "occurred_at": iso(at)}
        assert doc["sent"]["action"] == "add"
        assert doc["sent"]["same_as_desired"] is True
        assert doc["outcome"]["outcome"] == "invalid"
        assert doc["outcome"]["reason"] == "consent"
        assert doc["outcome"]["accepted_at"] is None
        assert doc["waiting"] == ["Amazon refused it (consent): not sent again until it changes"]
        assert (doc["next_refresh_at"], doc["expires_at"]) == (None, None)
        assert "invalid (consent)" in human
        assert "Amazon refused it (consent)" in human
        assert "next TTL refresh" not in human
        assert entry["jobRequestId"] not in human  # the job is done: nothing waits for it
        assert await daemon.terminate() == 0


async def test_show_reports_the_tombstone_of_an_erased_member(
    kafka: Any, sandbox: RunningSandbox, tmp_path: Path
) -> None:
    """A member of vip is erased: its DELETE job succeeds, its row is deleted and only the
    tombstone stays. `members show` reports the erase, and nothing of the member."""
    daemon, topic = await start(kafka, sandbox, tmp_path, "erased", destinations=[VIP_DEST])
    store_url = daemon.raw["store"]["url"]
    await produce(kafka.bootstrap, topic, [add("e-1", "2026-11-22T10:00:01Z")])

    async def confirmed() -> bool:
        daemon.check_alive()
        row = await member(store_url, VIP, "e-1")
        return row is not None and row.outcome == "confirmed"

    await wait_for(confirmed, 60, "e-1 added and confirmed")
    doc, _ = await show(daemon, "vip", "e-1")
    assert doc["state"] == "member"
    erased_at = "2026-11-22T10:00:05Z"
    erase = orjson.dumps({"profile_id": "e-1", "erase": True, "occurred_at": erased_at})
    await produce(kafka.bootstrap, topic, [(b"e-1", erase)])

    async def erased() -> bool:
        daemon.check_alive()
        live = {m for m, _ in sandbox.state.membership(VIP).live(0, 10**12)}
        return "e-1" not in live and await member(store_url, VIP, "e-1") is None

    await wait_for(erased, 60, "e-1's DELETE confirmed and its row deleted")
    actions = [e["record"]["action"] for e in sent_to(sandbox, CONNECTION, "e-1")]
    assert actions == ["CREATE", "DELETE"]
    doc, human = await show(daemon, "vip", "e-1")
    assert doc["state"] == "erased"
    assert doc["erased_at"] == erased_at
    for key in ("desired", "sent", "job", "outcome", "next_refresh_at", "expires_at"):
        assert doc[key] is None, key
    assert doc["waiting"] == []
    assert f"tombstone of the erase of {erased_at}" in human
    assert "erased" in human
    assert await daemon.terminate() == 0
