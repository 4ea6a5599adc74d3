"""Amazon refusing on purpose, against real processes (broker, sandbox, `syncd run`): a setup
fault on one connection, a Retry-After longer than syncd's retry time, a 400 for some records,
an audience Amazon does not have (found by the start-up checks). Nothing of a blocked connection
is dead-lettered or lost, the other connection flows, and only the records Amazon refused are
dead-lettered."""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from syncd import synth
from syncd.localstack import (
    CONNECTION,
    DESTINATIONS,
    OTHER_CONNECTION,
    DaemonProcess,
    committed_offsets,
    end_offsets,
    produce,
    provide,
    running_sandbox,
    sqlite_daemon_config,
    wait_for,
)
from syncd.sandbox.server import RunningSandbox
from syncd.sandbox.state import SandboxSettings
from tests.harness import read_topic, waiting_members
from tests.integration.test_reliability import delivered, expected

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def audiences_of(connection: str) -> set[str]:
    return {d["audience"] for d in DESTINATIONS if d["connection_id"] == connection}


def changes_for(messages: list[tuple[bytes, bytes]], connection: str) -> set[tuple[str, str]]:
    """(externalUserId, action) of the changes the events make on `connection`'s audiences."""
    mine = audiences_of(connection)
    out = set()
    for _, value in messages:
        event = orjson.loads(value)
        for action, api in (("add", "CREATE"), ("remove", "DELETE")):
            if mine & set(event["audiences"].get(action) or ()):
                out.add((event["profile_id"], api))
    return out


def delivered_to(sandbox: Any, connection: str) -> set[tuple[str, str]]:
    return {
        (e["record"]["externalUserId"], e["record"]["action"])
        for e in sandbox.state.ledger(connection)
    }


def records_made(messages: list[tuple[bytes, bytes]]) -> int:
    """Member records the events make: one per audience an event adds to or removes from."""
    known = {d["audience"] for d in DESTINATIONS}
    total = 0
    for _, value in messages:
        audiences = orjson.loads(value)["audiences"]
        total += len(known & {*(audiences.get("add") or ()), *(audiences.get("remove") or ())})
    return total


async def all_committed(daemon: DaemonProcess, bootstrap: str, topic: str) -> None:
    ends = await end_offsets(bootstrap, topic)
    group = daemon.raw["kafka"]["group_id"]

    async def committed() -> bool:
        daemon.check_alive()
        return await committed_offsets(bootstrap, topic, group) == ends

    await wait_for(committed, 60, "every offset committed")


async def test_a_403_blocks_one_connection_the_other_flows_and_it_resumes_losing_nothing(
    kafka: Any, tmp_path: Path
) -> None:
    topic, dlq = f"forbidden-{uuid.uuid4().hex[:8]}", f"dlq-{uuid.uuid4().hex[:8]}"
    await kafka.create_topic(topic, partitions=2)
    await kafka.create_topic(dlq, partitions=1)
    before = list(synth.events(100, seed=70, id_prefix="before-"))
    during = list(synth.events(200, seed=71, id_prefix="during-"))
    settings = SandboxSettings(job_delay_s=0.2, rate_per_s=1000, burst=1000)
    async with running_sandbox(settings) as sb:
        raw = sqlite_daemon_config(
            kafka.bootstrap, sb, topic, tmp_path, batch={"max_records": 50, "linger_ms": 100}
        )
        raw["kafka"]["dead_letter_topic"] = dlq
        daemon = DaemonProcess(tmp_path, raw).start()
        await produce(kafka.bootstrap, topic, before)

        async def arrived(events: list[tuple[bytes, bytes]]) -> bool:
            daemon.check_alive()
            return expected(events) <= delivered(sb)

        await wait_for(lambda: arrived(before), 60, "the events before the fault delivered")
        # the AMC terms are withdrawn for one connection, for 30 s
        fault = {"connection_id": CONNECTION, "status": 403, "for_s": 30}
        sb.state.set_faults({"connection_status": fault})
        await produce(kafka.bootstrap, topic, during)
        forbidden = {"connection": CONNECTION, "cause": "forbidden"}

        async def other_flowed_while_blocked() -> bool:
            daemon.check_alive()
            return (
                changes_for(during, OTHER_CONNECTION) <= delivered_to(sb, OTHER_CONNECTION)
                and await daemon.metric("syncd_connection_blocked", forbidden) == 1
            )

        await wait_for(other_flowed_while_blocked, 25, "the other connection flowing, one blocked")
        assert sb.state.connection_fault(CONNECTION) is not None  # measured inside the fault
        assert not changes_for(during, CONNECTION) & delivered_to(sb, CONNECTION)
        assert await daemon.metric("syncd_events_dead_lettered_total") == 0

        async def resumed() -> bool:
            daemon.check_alive()
            return await arrived(during)

        await wait_for(resumed, 90, "the blocked connection resumed and caught up")
        assert await daemon.metric("syncd_connection_blocked", forbidden) == 0
        await all_committed(daemon, kafka.bootstrap, topic)
        assert await daemon.metric("syncd_events_dead_lettered_total") == 0
        assert await read_topic(kafka.bootstrap, dlq, 1, timeout=2.0) == []
        assert "accept the AMC terms" in daemon.logs()  # the log says what to do
        assert await daemon.terminate() == 0


async def test_a_retry_after_longer_than_the_retry_time_is_waited_out(
    kafka: Any, tmp_path: Path
) -> None:
    """Amazon asks for 12 s, syncd may retry for 2 s: the connection pauses for the whole
    Retry-After (visible as blocked, cause throttled) instead of re-POSTing every few seconds
    under a new reservation; then everything is delivered, within the budget."""
    topic = f"retry-after-{uuid.uuid4().hex[:8]}"
    await kafka.create_topic(topic, partitions=1)
    # one connection only (vip, lapsed), one POST at a time: every records 429 is its own
    events = list(synth.events(200, seed=72, audiences=("vip", "lapsed")))
    budget = records_made(events)
    settings = SandboxSettings(job_delay_s=0.2, rate_per_s=1000, burst=1000, window_budget=budget)
    async with running_sandbox(settings) as sb:
        raw = sqlite_daemon_config(
            kafka.bootstrap,
            sb,
            topic,
            tmp_path,
            amazon={"max_retry_time_s": 2.0, "max_concurrency": 1},
            budget={"records_per_hour": budget},
            batch={"max_records": 50, "linger_ms": 100},
        )
        daemon = DaemonProcess(tmp_path, raw).start()
        await daemon.wait_ready()
        fault = {"connection_id": CONNECTION, "status": 429, "for_s": 12, "retry_after_s": 12}
        sb.state.set_faults({"connection_status": fault})
        await produce(kafka.bootstrap, topic, events)
        throttled = {"connection": CONNECTION, "cause": "throttled"}

        async def paused() -> bool:
            daemon.check_alive()
            return await daemon.metric("syncd_connection_blocked", throttled) == 1

        await wait_for(paused, 30, "the connection paused for the Retry-After")

        async def arrived() -> bool:
            daemon.check_alive()
            return expected(events) <= delivered(sb)

        await wait_for(arrived, 60, "every event delivered after the Retry-After")
        stats = sb.state.stats()
        # one 429, waited out: not a re-POST every 5 s (which would have met the fault twice more)
        assert stats["requests"].get("POST /amc/audiences/records 429") == 1
        assert stats["budget_exceeded"] == {}
        assert stats["max_window_records"][CONNECTION] <= budget
        assert await daemon.metric("syncd_connection_blocked", throttled) == 0
        assert await daemon.terminate() == 0


async def test_only_the_records_amazon_refuses_are_dead_lettered_and_the_rest_delivered(
    kafka: Any, tmp_path: Path
) -> None:
    topic, dlq = f"refused-{uuid.uuid4().hex[:8]}", f"dlq-{uuid.uuid4().hex[:8]}"
    await kafka.create_topic(topic, partitions=2)
    await kafka.create_topic(dlq, partitions=1)
    good = list(synth.events(400, seed=73, id_prefix="ok-"))
    bad = list(synth.events(6, seed=74, id_prefix="refuse-"))
    messages = good[:100] + bad[:2] + good[100:250] + bad[2:] + good[250:]
    settings = SandboxSettings(job_delay_s=0.2, rate_per_s=1000, burst=1000)
    async with running_sandbox(settings) as sb:
        sb.state.set_faults({"refuse_records_prefix": "refuse-"})
        raw = sqlite_daemon_config(
            kafka.bootstrap, sb, topic, tmp_path, batch={"max_records": 100, "linger_ms": 200}
        )
        raw["kafka"]["dead_letter_topic"] = dlq
        daemon = DaemonProcess(tmp_path, raw).start()
        await produce(kafka.bootstrap, topic, messages)

        async def good_arrived() -> bool:
            daemon.check_alive()
            return expected(good) <= delivered(sb)

        await wait_for(good_arrived, 90, "every record Amazon does not refuse delivered")
        refused = records_made(bad)
        dead = await read_topic(kafka.bootstrap, dlq, refused)
        ids = sorted(orjson.loads(m.value)["externalUserId"] for m in dead)
        assert len(dead) == refused
        assert set(ids) == {orjson.loads(v)["profile_id"] for _, v in bad}
        # member dead letters: the hashed record, a bounded reason class, Amazon's message
        assert {dict(m.headers)["syncd-kind"] for m in dead} == {b"member"}
        assert {dict(m.headers)["syncd-reason"].decode() for m in dead} == {"invalid_id"}
        assert all(b"externalUserId is not valid" in dict(m.headers)["syncd-detail"] for m in dead)
        for m in dead:
            value = orjson.loads(m.value)
            assert set(value) == {"audience", "audience_id", "externalUserId", "action", "record"}
            assert value["record"]["externalUserId"] == value["externalUserId"]
            assert isinstance(value["audience_id"], int)
        assert not any(pid.startswith("refuse-") for pid, _ in delivered(sb))
        await all_committed(daemon, kafka.bootstrap, topic)
        assert await read_topic(kafka.bootstrap, dlq, refused + 1, timeout=2.0) == dead
        assert await daemon.terminate() == 0


async def test_a_destination_whose_audience_amazon_lacks_is_blocked_at_start_until_created(
    kafka: Any, sandbox: RunningSandbox, tmp_path: Path
) -> None:
    """`syncd run` checks each destination at start, as `check-config --online` does: the
    newsletter audience was never created at Amazon, so its connection is blocked before any
    POST (metric and log naming the destination), its changes are recorded and wait, vip flows;
    once the audience exists the waiting changes go out, without a restart."""
    topic = f"startup-{uuid.uuid4().hex[:8]}"
    await kafka.create_topic(topic, partitions=2)
    events = list(synth.events(200, seed=75, audiences=("vip", "newsletter")))
    want_vip, want_newsletter = (changes_for(events, c) for c in (CONNECTION, OTHER_CONNECTION))
    assert want_vip
    assert want_newsletter
    destinations = [d for d in DESTINATIONS if d["audience"] in ("vip", "newsletter")]
    vip, newsletter = destinations
    provide(sandbox.state, [vip])  # terms, vip's connection and audience
    sandbox.state.provide_connection(OTHER_CONNECTION)  # the connection, not the audience
    raw = sqlite_daemon_config(kafka.bootstrap, sandbox, topic, tmp_path, destinations=destinations)
    daemon = DaemonProcess(tmp_path, raw, provide=False).start()
    await produce(kafka.bootstrap, topic, events)
    blocked = {"connection": OTHER_CONNECTION, "cause": "not_found"}
    store_url = raw["store"]["url"]

    async def vip_delivered_newsletter_waiting() -> bool:
        daemon.check_alive()
        return (
            delivered_to(sandbox, CONNECTION) >= want_vip
            and await daemon.metric("syncd_connection_blocked", blocked) == 1
            and await waiting_members(store_url, newsletter["audience_id"]) == len(want_newsletter)
        )

    await wait_for(vip_delivered_newsletter_waiting, 60, "vip delivered, newsletter blocked")
    await all_committed(daemon, kafka.bootstrap, topic)  # recorded: the offsets commit
    assert sandbox.state.ledger(OTHER_CONNECTION) == []  # nothing sent for it...
    assert not any(
        route.startswith("POST /amc/audiences/records ") and not route.endswith(" 202")
        for route in sandbox.state.stats()["requests"]
    )  # ...not even a POST that Amazon refused
    assert newsletter["audience_id"] not in sandbox.state.audiences
    assert await daemon.metric("syncd_connection_blocked", {"connection": CONNECTION}) == 0
    [report] = [
        orjson.loads(line)
        for line in daemon.logs().splitlines()
        if line.startswith("{") and "connection blocked (not_found)" in line
    ]
    assert report["connection"] == OTHER_CONNECTION
    assert f"destination 'newsletter' (audience_id {newsletter['audience_id']})" in report["error"]
    assert "404" in report["error"]
    logs = daemon.logs()
    assert not {pid for pid, _ in want_newsletter | want_vip if pid in logs}  # no member ids

    # the advertiser creates the audience (with the id the config names): no restart
    async with aiohttp.ClientSession() as http:
        body = {
            "audiences": [
                {"audienceId": newsletter["audience_id"], "connectionId": OTHER_CONNECTION}
            ]
        }
        async with http.post(f"{sandbox.url}/_sandbox/provide", json=body) as answer:
            assert answer.status == 200, await answer.text()

    async def newsletter_caught_up() -> bool:
        daemon.check_alive()
        return (
            delivered_to(sandbox, OTHER_CONNECTION) >= want_newsletter
            and await daemon.metric("syncd_connection_blocked", blocked) == 0
        )

    await wait_for(newsletter_caught_up, 60, "the newsletter changes delivered once it exists")
    daemon.check_alive()  # the same process throughout
    assert delivered_to(sandbox, OTHER_CONNECTION) == want_newsletter
    assert "connection resumed" in daemon.logs()
    assert await daemon.metric("syncd_events_dead_lettered_total") == 0
    assert await daemon.terminate() == 0


async def test_no_verdict_at_start_blocks_nothing_and_the_daemon_runs_on(
    kafka: Any, tmp_path: Path
) -> None:
    """Amazon answers every API call 5xx while `syncd run` starts: the start-up checks give up
    (no verdict), nothing is blocked and the daemon stays up; once Amazon answers, every change
    is delivered."""
    topic = f"startup-5xx-{uuid.uuid4().hex[:8]}"
    await kafka.create_topic(topic, partitions=1)
    events = list(synth.events(60, seed=76))
    settings = SandboxSettings(job_delay_s=0.2, rate_per_s=1000, burst=1000, error_rate=1.0)
    async with running_sandbox(settings) as sb:
        raw = sqlite_daemon_config(
            kafka.bootstrap, sb, topic, tmp_path, amazon={"max_retry_time_s": 2.0}
        )
        daemon = DaemonProcess(tmp_path, raw).start()
        await produce(kafka.bootstrap, topic, events)

        async def gave_up() -> bool:
            daemon.check_alive()
            return "start-up checks got no verdict from amazon; nothing blocked" in daemon.logs()

        await wait_for(gave_up, 60, "the start-up checks given up")
        for cause in ("unauthorized", "forbidden", "not_found", "bad_request"):  # setup faults
            assert await daemon.metric("syncd_connection_blocked", {"cause": cause}) == 0
        sb.state.set_faults({"error_rate": 0.0})

        async def arrived() -> bool:
            daemon.check_alive()
            return expected(events) <= delivered(sb)

        await wait_for(arrived, 60, "every change delivered once Amazon answers")
        assert "connection blocked (not_found)" not in daemon.logs()
        assert await daemon.terminate() == 0


async def test_each_record_a_job_lists_as_invalid_reaches_the_dead_letter_topic(
    kafka: Any, tmp_path: Path
) -> None:
    """Amazon accepts the POSTs but lists about a fifth of the records in their jobs'
    invalidRecords: each one reaches the dead-letter topic once, as a member dead letter with its
    externalUserId, audience, hashed record and Amazon's message; nothing else is dead-lettered."""
    topic, dlq = f"invalid-{uuid.uuid4().hex[:8]}", f"dlq-{uuid.uuid4().hex[:8]}"
    await kafka.create_topic(topic, partitions=2)
    await kafka.create_topic(dlq, partitions=1)
    events = list(synth.events(300, seed=77))
    settings = SandboxSettings(
        job_delay_s=0.2, rate_per_s=1000, burst=1000, invalid_record_rate=0.2, seed=77
    )
    async with running_sandbox(settings) as sb:
        raw = sqlite_daemon_config(
            kafka.bootstrap, sb, topic, tmp_path, batch={"max_records": 50, "linger_ms": 200}
        )
        raw["kafka"]["dead_letter_topic"] = dlq
        daemon = DaemonProcess(tmp_path, raw).start()
        await produce(kafka.bootstrap, topic, events)
        want = changes_for(events, CONNECTION) | changes_for(events, OTHER_CONNECTION)

        async def every_job_seen_to_its_end() -> bool:
            daemon.check_alive()
            jobs = list(sb.state.jobs.values())
            sent = delivered_to(sb, CONNECTION) | delivered_to(sb, OTHER_CONNECTION)
            return sent >= want and bool(jobs) and all(j.observed_terminal for j in jobs)

        await wait_for(every_job_seen_to_its_end, 90, "every change sent, every job polled")
        invalid = [
            (job.audience_id, entry["externalId"], entry["error"])
            for job in sb.state.jobs.values()
            for entry in job.invalid_records
        ]
        assert len(invalid) > 20  # the seeded rate refused a fair share
        dead = await read_topic(kafka.bootstrap, dlq, len(invalid) + 1, timeout=15)
        names = {d["audience_id"]: d["audience"] for d in DESTINATIONS}
        got = []
        for message in dead:
            headers = dict(message.headers)
            assert headers["syncd-kind"] == b"member"
            assert headers["syncd-reason"] == b"invalid_pii"
            value = orjson.loads(message.value)
            assert value["audience"] == names[value["audience_id"]]
            assert value["record"]["externalUserId"] == value["externalUserId"]
            assert all(len(h) == 64 for pii in value["record"]["hashedPII"] for h in pii.values())
            got.append((value["audience_id"], value["externalUserId"], headers["syncd-detail"]))
        assert sorted((a, e) for a, e, _ in got) == sorted((a, e) for a, e, _ in invalid)
        assert all(detail.decode().startswith("INVALID_HASHED_PII") for _, _, detail in got)
        assert await daemon.terminate() == 0


async def test_dead_letters_a_crash_left_waiting_on_the_broker_are_sent_after_a_restart(
    own_broker: Any, tmp_path: Path
) -> None:
    """The broker goes away while jobs end with invalid records: syncd stores the jobs terminal
    (never polled again) and its dead letters wait for the broker; syncd is killed there. Started
    again with the broker back, it sends every one of them: they waited in the store."""
    topic, dlq = f"crash-{uuid.uuid4().hex[:8]}", f"dlq-{uuid.uuid4().hex[:8]}"
    await own_broker.create_topic(topic, partitions=1)
    await own_broker.create_topic(dlq, partitions=1)
    events = list(synth.events(200, seed=78))
    settings = SandboxSettings(
        job_delay_s=600, rate_per_s=1000, burst=1000, invalid_record_rate=0.2, seed=78
    )
    async with running_sandbox(settings) as sb:
        raw = sqlite_daemon_config(
            own_broker.bootstrap, sb, topic, tmp_path, batch={"max_records": 50, "linger_ms": 200}
        )
        raw["kafka"]["dead_letter_topic"] = dlq
        daemon = DaemonProcess(tmp_path, raw).start()
        await produce(own_broker.bootstrap, topic, events)
        want = changes_for(events, CONNECTION) | changes_for(events, OTHER_CONNECTION)

        async def every_change_sent() -> bool:
            daemon.check_alive()
            return delivered_to(sb, CONNECTION) | delivered_to(sb, OTHER_CONNECTION) >= want

        await wait_for(every_change_sent, 60, "every change sent")
        own_broker.stop()
        for job in sb.state.jobs.values():  # every job ends now, with the broker away
            job.ready_at = time.monotonic()

        async def every_job_stored_terminal() -> bool:
            daemon.check_alive()
            jobs = list(sb.state.jobs.values())
            finished = await daemon.metric("syncd_jobs_finished_total")
            return all(j.observed_terminal for j in jobs) and finished == len(jobs)

        await wait_for(every_job_stored_terminal, 60, "every job stored terminal")
        invalid = sorted(
            (job.audience_id, entry["externalId"])
            for job in sb.state.jobs.values()
            for entry in job.invalid_records
        )
        assert len(invalid) > 10  # the seeded rate refused a fair share
        daemon.kill()
        own_broker.start()  # its memory storage forgot both topics
        await own_broker.create_topic(topic, partitions=1)
        await own_broker.create_topic(dlq, partitions=1)
        again = DaemonProcess(tmp_path, raw, name="again").start()
        dead = await read_topic(own_broker.bootstrap, dlq, len(invalid), timeout=60)
        got = sorted(
            (value["audience_id"], value["externalUserId"])
            for value in (orjson.loads(message.value) for message in dead)
        )
        assert got == invalid
        assert await again.terminate() == 0
