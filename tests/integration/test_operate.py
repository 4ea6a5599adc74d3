"""The operator commands as users run them (`python -m syncd ...` processes) against a store filled
through MemberTable/Store calls with real sandbox jobs: `syncd audiences status` prints the
member counts, Amazon's figures and the 24 h match ratio (the sandbox resolves 42 % of
members), `syncd members show` explains one member, `syncd members purge` drops an audience no
destination names any more. Then the same figures from a running `syncd run`: its /metrics and
the status show the sandbox's match ratio and audience size."""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import pytest

from syncd import config as config_mod
from syncd import synth
from syncd.amazon.api import JobStatus, records_body
from syncd.amazon.client import AmazonClient
from syncd.localstack import (
    DESTINATIONS,
    DaemonProcess,
    free_port,
    produce,
    running_sandbox,
    sqlite_daemon_config,
    to_toml,
    wait_for,
)
from syncd.members import ADD, REMOVE, MemberChange, MemberTable, member_change
from syncd.model import Action, member_record
from syncd.sandbox.server import RunningSandbox
from syncd.sandbox.state import SandboxSettings
from syncd.store import NewJob, Store
from syncd.store.reasons import classify_invalid_reason
from tests.harness import run_syncd

pytestmark = pytest.mark.integration

TTL_S = 86_400
ORPHAN = 555_000_000_000_000_555  # rows left by a destination removed from the config
MISSING = 123_456_789  # an audience Amazon does not have


def sha(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()


def change(euid: str, audience_id: int, action: str = ADD, country: str = "US") -> MemberChange:
    api_action = Action.REMOVE if action == REMOVE else Action.ADD
    record = member_record(euid, country, api_action, [{"email": sha(f"{euid}@example.com")}])
    at = 1000.0 if action == ADD else 2000.0
    return member_change(audience_id, record, occurred_at=at, position=0)


@dataclass
class Filled:
    """A config naming two destinations ("vip": a sandbox audience with members, "lapsed": an
    audience Amazon does not have) and the statuses of the sandbox jobs that filled "vip"."""

    config: Path
    store_url: str
    audience_id: int
    statuses: list[JobStatus]
    sandbox: RunningSandbox


@pytest.fixture
async def match_sandbox() -> AsyncIterator[RunningSandbox]:
    settings = SandboxSettings(
        job_delay_s=0.0,
        match_rate=0.42,
        seed=7,  # which members resolve is drawn from the seed: the same figures every run
        require_consent_in=True,  # GB members without consent are refused: invalid
        rate_per_s=1000,
        burst=1000,
    )
    async with running_sandbox(settings) as sb:
        yield sb


async def send_due(
    table: MemberTable, store: Store, client: AmazonClient, audience_id: int, connection: str
) -> JobStatus:
    """What a sender and the poller do: claim, POST, store the job and the members' sent state,
    poll the job once it is terminal, apply its outcome to the members."""
    claims = await table.claim_due([audience_id], 6000, 60, "test-sender")
    body = records_body(audience_id, connection, [orjson.loads(c.record) for c in claims])
    job_id = await client.post_records(orjson.dumps(body), connection_id=connection)
    assert await table.mark_sent(claims, job_id) == []
    adds = sum(c.action == ADD for c in claims)
    job = NewJob(job_id, connection, audience_id, "vip", len(claims), adds, len(claims) - adds)
    await store.add_job(job, first_poll_after_s=0)
    [claim] = await store.claim_due_jobs("test-poller", 1, 60)
    status = await client.get_job(job_id)
    assert status.terminal
    assert await store.record_poll(claim, status, next_poll_in_s=0)
    invalid = {
        r.external_id: classify_invalid_reason(r.error)
        for r in status.invalid_records
        if r.external_id
    }
    await table.apply_job_outcome(job_id, status.job_state, invalid)
    return status


@pytest.fixture
async def filled(match_sandbox: RunningSandbox, tmp_path: Path) -> Filled:
    """vip: 1000 US members added and confirmed (in two jobs), 7 GB members refused (no
    consent), then 10 of the US members removed (a third job), then 5 more adds not sent yet.
    The orphan audience holds 3 rows."""
    state = match_sandbox.state
    state.terms_accepted = True
    connection = state.create_connection({"amcInstanceId": "amcinstance01"})
    audience_id = state.create_audience(
        {
            "name": "syncdoperatevip",
            "targetResource": {"connectionId": connection},
            "metadata": {"ttl": TTL_S},
        }
    )["audienceId"]
    destinations = [
        {"audience": key, "connection_id": connection, "audience_id": a, "country_code": "US"}
        for key, a in (("vip", audience_id), ("lapsed", MISSING))
    ]
    raw = sqlite_daemon_config(
        "127.0.0.1:1", match_sandbox, "t", tmp_path, destinations=destinations
    )
    path = tmp_path / "syncd.toml"
    path.write_text(to_toml(raw))
    cfg = config_mod.from_mapping(raw)

    store = await Store.connect(cfg.store.url)
    await store.ensure_schema(auto_upgrade=True)
    table = MemberTable(store)
    statuses = []
    try:
        async with AmazonClient(cfg.amazon) as client:
            await table.record_changes([change(f"u{i:04}", audience_id) for i in range(600)])
            statuses.append(await send_due(table, store, client, audience_id, connection))
            await table.record_changes(
                [change(f"u{i:04}", audience_id) for i in range(600, 1000)]
                + [change(f"g{i}", audience_id, country="GB") for i in range(7)]
            )
            statuses.append(await send_due(table, store, client, audience_id, connection))
            await table.record_changes([change(f"u{i:04}", audience_id, REMOVE) for i in range(10)])
            statuses.append(await send_due(table, store, client, audience_id, connection))
        await table.record_changes([change(f"p{i}", audience_id) for i in range(5)])
        await table.record_changes([change(f"o{i}", ORPHAN) for i in range(3)])
    finally:
        await store.close()
    return Filled(path, cfg.store.url, audience_id, statuses, match_sandbox)


# -- syncd audiences status ----------------------------------------------------------------------
async def test_status_json_per_destination_with_the_match_ratio_of_the_jobs(
    filled: Filled,
) -> None:
    code, out, err = await run_syncd(
        "audiences", "status", "--config", str(filled.config), "--json"
    )
    assert code == 0, err
    vip, lapsed = orjson.loads(out)
    received = sum(s.received_record_size or 0 for s in filled.statuses)
    matched = sum(s.id_resolution_count or 0 for s in filled.statuses)
    assert received == 1017  # every record of the three jobs
    assert vip["audience"] == "vip"
    assert vip["audience_id"] == filled.audience_id
    assert (vip["received"], vip["matched"]) == (received, matched)
    assert vip["match_ratio"] == matched / received
    assert abs(vip["match_ratio"] - 0.42) < 0.05  # the sandbox's match rate
    assert vip["members"] == {"member": 990, "pending": 5, "removed": 10, "invalid": 7}
    assert vip["ttl"] == TTL_S
    assert vip["dsp_audience_size"] == 990  # Amazon's figure, from the metadata
    assert vip["metadata_error"] is None
    # an audience whose metadata cannot be read: unknown, and why; no crash
    assert lapsed["audience_id"] == MISSING
    assert (lapsed["ttl"], lapsed["dsp_audience_size"], lapsed["match_ratio"]) == (None,) * 3
    assert "404" in lapsed["metadata_error"]
    assert lapsed["members"] == {"member": 0, "pending": 0, "removed": 0, "invalid": 0}
    # the orphaned audience: on stderr, never in the contract's list
    assert str(ORPHAN) not in out
    assert str(ORPHAN) in err
    assert "syncd members purge" in err


async def test_status_table_for_people(filled: Filled) -> None:
    code, out, err = await run_syncd("audiences", "status", "--config", str(filled.config))
    assert code == 0, err
    received = sum(s.received_record_size or 0 for s in filled.statuses)
    matched = sum(s.id_resolution_count or 0 for s in filled.statuses)
    vip_rows = [line for line in out.splitlines() if " vip " in line]
    assert len(vip_rows) == 2  # one per table
    amazon_row, members_row = vip_rows
    assert "86,400" in amazon_row
    assert "990" in amazon_row
    for figure in ("990", "5", "10", "7", f"{received:,}", f"{matched:,}"):
        assert f" {figure} " in members_row
    assert f"{matched / received:.1%}" in members_row
    lapsed_row = next(line for line in out.splitlines() if " lapsed " in line)
    assert lapsed_row.split()[1:] == [str(MISSING), *["unknown"] * 4]
    assert "lapsed: metadata unreadable:" in out
    assert str(ORPHAN) in err


async def test_status_when_amazon_cannot_be_reached_still_shows_the_store(
    filled: Filled, tmp_path: Path
) -> None:
    closed = f"http://127.0.0.1:{free_port()}"
    code, out, err = await run_syncd(
        "audiences",
        "status",
        "--config",
        str(filled.config),
        "--json",
        SYNCD_AMAZON__API_URL=closed,
        SYNCD_AMAZON__TOKEN_URL=closed + "/auth/o2/token",
    )
    assert code == 0, err
    vip, _ = orjson.loads(out)
    assert vip["ttl"] is None
    assert vip["dsp_audience_size"] is None
    assert vip["metadata_error"]
    assert vip["members"]["member"] == 990
    assert vip["received"] == 1017


# -- syncd members show --------------------------------------------------------------------------
async def member_show(filled: Filled, profile: str, *flags: str) -> tuple[int, str, str]:
    config = str(filled.config)
    return await run_syncd(
        "members", "show", "--config", config, "--audience", "vip", "--profile", profile, *flags
    )


async def test_show_a_confirmed_member_with_its_next_ttl_refresh(filled: Filled) -> None:
    store = await Store.connect(filled.store_url)
    try:
        held = await MemberTable(store).member(filled.audience_id, "u0100")
    finally:
        await store.close()
    assert held is not None
    assert held.accepted_at is not None
    code, out, err = await member_show(filled, "u0100", "--json")
    assert code == 0, err
    doc = orjson.loads(out)
    assert doc["state"] == "member"
    assert doc["desired"]["action"] == "add"
    assert doc["sent"]["same_as_desired"] is True
    assert doc["outcome"]["outcome"] == "confirmed"
    assert doc["waiting"] == []
    assert doc["ttl"] == {"seconds": TTL_S, "known": True}  # from the sandbox's metadata
    assert doc["next_refresh_at"] == iso(held.accepted_at + 0.8 * TTL_S)
    assert doc["expires_at"] == iso(held.accepted_at + TTL_S)
    code, human, err = await member_show(filled, "u0100")
    assert code == 0, err
    assert "next TTL refresh" in human
    assert iso(held.accepted_at + 0.8 * TTL_S) in human
    for text in (out, human):  # never the record's hashes
        assert sha("u0100@example.com") not in text


async def test_show_explains_why_members_wait(filled: Filled) -> None:
    code, out, err = await member_show(filled, "g3", "--json")
    assert code == 0, err
    refused = orjson.loads(out)
    assert refused["state"] == "invalid"
    assert refused["outcome"]["reason"] == "consent"
    assert refused["waiting"] == ["Amazon refused it (consent): not sent again until it changes"]

    code, out, err = await member_show(filled, "p2", "--json")
    assert code == 0, err
    due = orjson.loads(out)
    assert due["state"] == "pending"
    assert due["sent"] is None
    assert "waiting to be claimed" in due["waiting"][0]
    assert due["waiting"][1].startswith("the connection's budget has room (0 of 15,000,000")

    code, out, err = await member_show(filled, "u0003", "--json")
    assert code == 0, err
    assert orjson.loads(out)["state"] == "removed"

    code, out, err = await member_show(filled, "nobody", "--json")
    assert code == 0, err
    assert orjson.loads(out)["state"] == "absent"


async def test_show_names_an_unknown_audience_flag(filled: Filled) -> None:
    config = str(filled.config)
    code, _, err = await run_syncd(
        "members", "show", "--config", config, "--audience", "nope", "--profile", "u1"
    )
    assert code == 2
    assert "--audience 'nope'" in err


# -- syncd members purge -------------------------------------------------------------------------
async def test_purge_drops_an_orphaned_audience_only_when_asked_and_not_a_named_one(
    filled: Filled,
) -> None:
    config = str(filled.config)
    code, _, err = await run_syncd(
        "members", "purge", "--config", config, "--audience-id", str(ORPHAN)
    )
    assert code == 2
    assert "--yes" in err
    named = str(filled.audience_id)
    code, _, err = await run_syncd(
        "members", "purge", "--config", config, "--audience-id", named, "--yes"
    )
    assert code == 2
    assert "--audience-id" in err
    assert "'vip'" in err

    code, out, err = await run_syncd(
        "members", "purge", "--config", config, "--audience-id", str(ORPHAN), "--yes"
    )
    assert code == 0, err
    assert f"dropped 3 member rows of audience_id {ORPHAN}" in out
    code, out, err = await run_syncd("audiences", "status", "--config", config, "--json")
    assert code == 0, err
    assert str(ORPHAN) not in err
    assert orjson.loads(out)[0]["members"]["member"] == 990  # the named audience is untouched


def iso(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# -- a running daemon: the match ratio and Amazon's size on /metrics and in the status ----------
async def test_a_running_daemon_and_the_status_show_the_match_ratio_and_amazons_size(
    kafka: Any, tmp_path: Path
) -> None:
    """`syncd run` against a sandbox resolving 42 % of members: /metrics (the audience's job
    records, matched / received) and `syncd audiences status` (text and --json) show the match
    ratio the sandbox reports, near 0.42, and its audience size (Amazon's metadata, read at
    start: a second start reads it once everything is delivered)."""
    settings = SandboxSettings(
        job_delay_s=0.0, match_rate=0.42, seed=7, rate_per_s=1000, burst=1000
    )
    topic = f"match-{uuid.uuid4().hex[:8]}"
    await kafka.create_topic(topic, partitions=2)
    events = list(synth.events(500, seed=78, audiences=("vip",), remove_ratio=0.0))
    [vip] = [d for d in DESTINATIONS if d["audience"] == "vip"]
    async with running_sandbox(settings) as sb:
        raw = sqlite_daemon_config(kafka.bootstrap, sb, topic, tmp_path, destinations=[vip])
        daemon = DaemonProcess(tmp_path, raw, name="first").start()
        await produce(kafka.bootstrap, topic, events)
        await daemon.wait_ready()
        labels = {"audience": "vip", "kind": "received"}

        async def polled() -> bool:
            daemon.check_alive()
            return await daemon.metric("syncd_audience_job_records_total", labels) == len(events)

        await wait_for(polled, 90, "every member sent and its job polled")
        size = sb.state.audience_view(vip["audience_id"])["metadata"]["audienceSize"]
        received, matched = size["receivedRecordSize"], size["idResolutionCount"]
        members = sb.state.members_view(vip["audience_id"])
        assert members is not None
        assert received == len(events)  # each member once
        assert size["dspAudienceSize"] == members["size"] == len(events)  # every add is live
        expected = matched / received
        assert abs(expected - 0.42) < 0.05  # the sandbox resolves 42 % of members, per member
        # /metrics: the audience's job records, as Amazon's job statuses gave them
        matched_labels = {"audience": "vip", "kind": "matched"}
        assert await daemon.metric("syncd_audience_job_records_total", matched_labels) == matched
        assert await daemon.terminate() == 0

        daemon = DaemonProcess(tmp_path, raw, name="second").start()
        await daemon.wait_ready()
        gauges = {"dsp": members["size"], "received": received, "matched": matched}

        async def sizes_read() -> bool:
            daemon.check_alive()
            for kind, value in gauges.items():
                labels = {"audience": "vip", "kind": kind}
                if await daemon.metric("syncd_audience_size", labels) != value:
                    return False
            return True

        await wait_for(sizes_read, 60, "Amazon's audienceSize figures on /metrics")

        config = str(daemon.config_path)
        code, out, err = await run_syncd("audiences", "status", "--config", config, "--json")
        assert code == 0, err
        [status] = orjson.loads(out)
        assert status["match_ratio"] == expected
        assert (status["received"], status["matched"]) == (received, matched)
        assert (status["amazon_received"], status["amazon_matched"]) == (received, matched)
        assert status["dsp_audience_size"] == members["size"]
        assert status["members"]["member"] == len(events)

        code, out, err = await run_syncd("audiences", "status", "--config", config)
        assert code == 0, err
        amazon_row, members_row = [line for line in out.splitlines() if " vip " in line]
        assert f" {members['size']:,} " in amazon_row
        assert f" {expected:.1%}" in members_row
        assert await daemon.terminate() == 0
