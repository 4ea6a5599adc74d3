"""Break things on purpose: hostile input, Amazon faults, crashes. Nothing valid may be lost,
nothing may leak (PII, secrets), nothing may stall."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import random
import re
import signal
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from syncd import synth
from syncd.config import AmazonConfig
from syncd.localstack import (
    CONNECTION,
    OTHER_CONNECTION,
    DaemonProcess,
    child_processes,
    committed_offsets,
    daemon_config,
    end_offsets,
    is_transform_worker,
    produce,
    running_sandbox,
    sqlite_daemon_config,
    wait_for,
)
from syncd.sandbox.state import SandboxSettings
from syncd.store import Store
from tests.harness import alive, read_topic

pytestmark = [pytest.mark.integration, pytest.mark.slow]
PENDING = 400


async def holds_for(
    condition: Callable[[], Awaitable[bool]], seconds: float, what: str, interval: float = 0.2
) -> None:
    """Check that an observable condition holds at every look for `seconds` (a measurement
    window, not a synchronization point: the test asserts something over time)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not await condition():
            raise AssertionError(f"stopped holding before {seconds}s were over: {what}")
        await asyncio.sleep(interval)  # cadence of the measurement
    if not await condition():
        raise AssertionError(f"stopped holding at the end of {seconds}s: {what}")


def delivered(sandbox: Any) -> set[tuple[str, str]]:
    return {
        (e["record"]["externalUserId"], e["record"]["action"])
        for conn in (CONNECTION, OTHER_CONNECTION)
        for e in sandbox.state.ledger(conn)
    }


def expected(messages: list[tuple[bytes, bytes]]) -> set[tuple[str, str]]:
    out = set()
    for _, value in messages:
        event = orjson.loads(value)
        for action, api in (("add", "CREATE"), ("remove", "DELETE")):
            if event["audiences"].get(action):
                out.add((event["profile_id"], api))
    return out


def raw_identifier_values(messages: list[tuple[bytes, bytes]]) -> set[str]:
    values: set[str] = set()
    for _, value in messages:
        try:
            event = orjson.loads(value)
        except orjson.JSONDecodeError:
            continue
        ids = event.get("identifiers") if isinstance(event, dict) else None
        if not isinstance(ids, dict):
            continue
        for v in ids.values():
            for item in v if isinstance(v, list) else [v]:
                if isinstance(item, str) and len(item.strip()) >= 5:
                    values.add(item.strip())
    return values


def own_fields_removed(logs: str) -> str:
    """syncd's log lines without the values that are the run's own, not data: its clock and its
    port may spell a postcode (a run failed on the timestamp "…20.106537Z" holding "10653")."""
    return re.sub(r'"(timestamp|metrics_port)": ("[^"]*"|\d+)', "", logs)


def appears(value: str, data: bytes) -> bool:
    """Whether `value` (UTF-8) is in `data`; a number only as a whole one. Random ids (consumer
    groups, jobs) are hex: a postcode turns up inside one by chance (a run failed on the group
    id "syncd-test-9d10339e" holding "10339")."""
    needle = value.encode()
    if value.isdigit():
        whole = rb"(?<![0-9A-Za-z])" + needle + rb"(?![0-9A-Za-z])"
        return re.search(whole, data) is not None
    return needle in data


def sqlite_bytes(db: Path) -> bytes:
    """Every byte of an SQLite store: the file, and its WAL and shared-memory files if any."""
    return b"".join(p.read_bytes() for p in db.parent.glob(db.name + "*"))


def hostile_events() -> list[tuple[bytes, bytes]]:
    deep = b"[" * 600 + b'"x"' + b"]" * 600  # deeper than any JSON parser's limit
    pid = "hostile"
    return [
        (b"h1", b"\xff\xfe not utf-8 \xc3\x28"),
        (b"h2", b"[1, 2, 3]"),
        (b"h3", orjson.dumps({"profile_id": 12.5, "audiences": {"add": ["vip"]}})),
        (b"h4", b'{"profile_id": "h4", "identifiers": ' + deep + b"}"),
        (
            b"h5",
            orjson.dumps(
                {
                    "profile_id": "h5",
                    "identifiers": {"email": "a" * 200_000 + "@x.io"},
                    "audiences": {"add": ["vip"]},
                }
            ),
        ),
        (b"h6", b"x" * (10 * 1024 * 1024)),  # 10 MB
        (
            b"h7",
            orjson.dumps(
                {
                    "profile_id": "h7",
                    "identifiers": {"email": "secret.person@mail.example"},
                    "audiences": {"add": ["unknown-audience"]},
                }
            ),
        ),
        (
            b"h8",
            orjson.dumps(
                {
                    "profile_id": "h8",
                    "identifiers": {"email": [f"user{i}@many.example" for i in range(10_000)]},
                    "audiences": {"add": ["vip"]},
                }
            ),
        ),
        (
            b"h9",
            orjson.dumps(
                {
                    "profile_id": "h9",
                    "country": "ZZ",
                    "identifiers": {"email": "country.person@mail.example"},
                    "audiences": {"add": ["vip"]},
                }
            ),
        ),
        (
            b"h10",
            orjson.dumps(
                {
                    "profile_id": "h10\x00\x07",
                    "identifiers": {"email": "ctl\x00\x1b[31m@mail.example"},
                    "audiences": {"add": ["vip"]},
                }
            ),
        ),
        (
            pid.encode(),
            orjson.dumps(
                {
                    "profile_id": pid,
                    "identifiers": {"phone": {"nested": 1}},
                    "audiences": {"add": ["vip"]},
                }
            ),
        ),
    ]


async def test_hostile_input_is_dead_lettered_without_pii_and_the_rest_flows(
    kafka: Any, sandbox: Any, tmp_path: Path
) -> None:
    topic, dlq = f"hostile-{uuid.uuid4().hex[:8]}", f"dlq-{uuid.uuid4().hex[:8]}"
    await kafka.create_topic(topic, partitions=1)
    await kafka.create_topic(dlq, partitions=1)
    good = list(synth.events(200, seed=31))
    hostile = hostile_events()
    messages = [*good[:100], *hostile, *good[100:]]
    await produce(kafka.bootstrap, topic, messages)
    raw = daemon_config(
        bootstrap=kafka.bootstrap,
        topic=topic,
        dlq=dlq,
        sandbox_url=sandbox.url,
        token_url=sandbox.token_url,
        store_url=f"sqlite+aiosqlite:///{tmp_path / 's.db'}",
        log={"level": "debug"},
    )
    daemon = DaemonProcess(tmp_path, raw).start()
    want = expected(good)

    async def good_ones_arrived() -> bool:
        daemon.check_alive()
        return want <= delivered(sandbox)

    await wait_for(good_ones_arrived, 90, "every valid event delivered past the hostile ones")
    ends = await end_offsets(kafka.bootstrap, topic)

    async def committed() -> bool:
        return await committed_offsets(kafka.bootstrap, topic, raw["kafka"]["group_id"]) == ends

    await wait_for(committed, 30, "the partition committed to its end (never blocked)")
    assert await daemon.terminate() == 0
    must_fail = {b"h1", b"h2", b"h3", b"h4", b"h6", b"h7", b"h9"}
    dead = await read_topic(kafka.bootstrap, dlq, len(hostile), timeout=10)
    assert must_fail <= {m.key for m in dead if m.key is not None}
    reasons = [dict(m.headers)["syncd-reason"].decode() for m in dead]
    secrets = raw_identifier_values(hostile)
    for reason in reasons:
        assert len(reason) < 200
        assert not any(s in reason for s in secrets)
    logs = own_fields_removed(daemon.logs()).encode()
    leaked = sorted(s for s in secrets | raw_identifier_values(good) if appears(s, logs))
    assert leaked == []


async def test_no_pii_or_secrets_in_logs_metrics_or_store_of_a_full_run(
    kafka: Any, sandbox: Any, tmp_path: Path
) -> None:
    topic = f"privacy-{uuid.uuid4().hex[:8]}"
    await kafka.create_topic(topic, partitions=2)
    messages = list(synth.events(500, seed=32, bad_ratio=0.05))
    await produce(kafka.bootstrap, topic, messages)
    raw = sqlite_daemon_config(
        kafka.bootstrap,
        sandbox,
        topic,
        tmp_path,
        log={"level": "debug"},
    )
    daemon = DaemonProcess(tmp_path, raw).start()

    async def done() -> bool:
        daemon.check_alive()
        return (
            len(sandbox.state.ledger(CONNECTION)) + len(sandbox.state.ledger(OTHER_CONNECTION))
            > 300
        )

    await wait_for(done, 60, "records delivered")
    _, exposition = await daemon.get("/metrics")
    assert await daemon.terminate() == 0
    logs = own_fields_removed(daemon.logs())
    log_bytes, store = logs.encode(), sqlite_bytes(tmp_path / "s.db")
    for value in raw_identifier_values(messages):
        assert not appears(value, log_bytes)
        assert not appears(value, store)
        if any(c.isalpha() for c in value):  # a number (a postal code) may be a bucket bound
            assert value not in exposition
    hashes = {
        h
        for conn in (CONNECTION, OTHER_CONNECTION)
        for e in sandbox.state.ledger(conn)
        for obj in e["record"]["hashedPII"]
        for h in obj.values()
    }
    assert not any(h in logs for h in hashes)
    for secret in ("sandbox-client-secret", "sandbox-refresh-token"):
        assert secret not in logs


async def test_a_bad_audience_blocks_its_connection_without_dead_letters_and_resumes(
    kafka: Any, tmp_path: Path
) -> None:
    """Every POST for one audience answers 400 (its audienceId is wrong): the bisect finds no
    single refusing record and stops after a bounded number of POSTs; the connection is blocked
    (cause bad_request), nothing is dead-lettered, the other connection flows. Once the audience
    is fixed, everything is delivered and committed."""
    topic, dlq = f"reject-{uuid.uuid4().hex[:8]}", f"dlq-{uuid.uuid4().hex[:8]}"
    await kafka.create_topic(topic, partitions=1)
    await kafka.create_topic(dlq, partitions=1)
    messages = list(synth.events(300, seed=33, audiences=("vip", "newsletter")))
    await produce(kafka.bootstrap, topic, messages)
    bad_audience = 413642381039213536  # "vip": every POST for it answers 400
    async with running_sandbox(
        SandboxSettings(job_delay_s=0.2, records_error_for_audience=bad_audience)
    ) as sb:
        raw = daemon_config(
            bootstrap=kafka.bootstrap,
            topic=topic,
            dlq=dlq,
            sandbox_url=sb.url,
            token_url=sb.token_url,
            store_url=f"sqlite+aiosqlite:///{tmp_path / 's.db'}",
            batch={"linger_ms": 2000},  # one batch per audience: large enough to bisect
        )
        daemon = DaemonProcess(tmp_path, raw).start()
        newsletter = {p for p, _ in expected([m for m in messages if b'"newsletter"' in m[1]])}
        blocked = {"connection": CONNECTION, "cause": "bad_request"}

        async def flowed_and_blocked() -> bool:
            daemon.check_alive()
            got = {e["record"]["externalUserId"] for e in sb.state.ledger(OTHER_CONNECTION)}
            return newsletter <= got and await daemon.metric("syncd_connection_blocked", blocked)

        await wait_for(flowed_and_blocked, 60, "the other audience delivered, vip's blocked")
        refused = sb.state.stats()["requests"]["POST /amc/audiences/records 400"]
        assert refused < 40  # bounded: not one POST per record
        assert await daemon.metric("syncd_events_dead_lettered_total") == 0
        assert await read_topic(kafka.bootstrap, dlq, 1, timeout=2.0) == []
        sb.state.settings.records_error_for_audience = None  # the audience is fixed

        async def all_sent() -> bool:
            daemon.check_alive()
            return expected(messages) <= delivered(sb)

        await wait_for(all_sent, 60, "vip delivered once the audience is fixed")

        async def open_again() -> bool:  # the sandbox has the records before syncd its 202
            daemon.check_alive()
            return await daemon.metric("syncd_connection_blocked", blocked) == 0

        await wait_for(open_again, 60, "the connection open again")
        ends = await end_offsets(kafka.bootstrap, topic)

        async def committed() -> bool:
            return await committed_offsets(kafka.bootstrap, topic, raw["kafka"]["group_id"]) == ends

        await wait_for(committed, 30, "offsets committed once the connection resumed")
        assert await daemon.terminate() == 0


def sandbox_answers(sb: Any, status: Callable[[str], bool]) -> int:
    """Requests the sandbox answered (or dropped) with a status that `status` accepts."""
    return sum(
        n for key, n in sb.state.stats()["requests"].items() if status(key.rsplit(" ", 1)[1])
    )


def is_5xx(status: str) -> bool:
    return status.isdigit() and 500 <= int(status) < 600


async def fault_signals(sb: Any, daemon: DaemonProcess) -> dict[str, float]:
    """What a fault leaves behind, on both sides: the sandbox's answers and syncd's metrics."""
    return {
        "sandbox_429": sandbox_answers(sb, lambda s: s == "429"),
        "sandbox_401": sandbox_answers(sb, lambda s: s == "401"),
        "sandbox_5xx": sandbox_answers(sb, is_5xx),
        "sandbox_dropped": sandbox_answers(sb, lambda s: s == "dropped"),
        "retries_throttled": await daemon.metric(
            "syncd_request_retries_total", {"reason": "throttled"}
        ),
        "retries_server_error": await daemon.metric(
            "syncd_request_retries_total", {"reason": "server_error"}
        ),
        "no_answer": await daemon.metric(  # timeouts and dropped connections
            "syncd_request_duration_seconds_count", {"status": "error"}
        ),
        "token_refreshes": await daemon.metric("syncd_token_refreshes_total", {"outcome": "ok"}),
    }


# fault -> the signals that must have grown once it was injected (every one of them)
FAULT_EVIDENCE: dict[str, tuple[dict[str, Any], tuple[str, ...]]] = {
    "429-storm": ({"throttle_for_s": 3.0}, ("sandbox_429", "retries_throttled")),
    "5xx-burst": ({"error_rate": 0.5}, ("sandbox_5xx", "retries_server_error")),
    "connection-resets": ({"reset_rate": 0.3}, ("sandbox_dropped", "no_answer")),
    "tokens-expire": ({"expire_tokens": True}, ("sandbox_401", "token_refreshes")),
    # a hung request is logged by the sandbox only when it ends: syncd's side is the evidence
    "slow-beyond-timeout": ({"timeout_rate": 0.15}, ("no_answer",)),
}


@pytest.mark.parametrize("fault", list(FAULT_EVIDENCE))
async def test_amazon_faults_lose_nothing(kafka: Any, tmp_path: Path, fault: str) -> None:
    """The fault starts mid-run, after syncd delivered part of the events with a valid token;
    the test checks it really hit syncd, then that every change still arrived and every offset
    was committed."""
    faults, evidence = FAULT_EVIDENCE[fault]
    topic = f"faults-{uuid.uuid4().hex[:8]}"
    await kafka.create_topic(topic, partitions=2)
    messages = list(synth.events(400, seed=34))
    first, second = messages[:200], messages[200:]
    # a token bucket that never throttles: every 429 is the storm's; seeded fault draws
    settings = SandboxSettings(job_delay_s=0.2, rate_per_s=1000, burst=1000, seed=34)
    async with running_sandbox(settings) as sb:
        raw = sqlite_daemon_config(
            kafka.bootstrap,
            sb,
            topic,
            tmp_path,
            amazon={
                "max_attempts": 30,
                "backoff_base_s": 0.05,
                "backoff_max_s": 0.5,
                "max_retry_time_s": 60.0,
                "request_timeout_s": 1.0,
            },
            # small batches: the second half is ~10 POSTs and ~10 polls, enough requests for
            # a fault of 15 % to hit some of them
            batch={"max_records": 20, "linger_ms": 100},
        )
        daemon = DaemonProcess(tmp_path, raw).start()
        await daemon.wait_ready()
        await produce(kafka.bootstrap, topic, first)

        async def arrived(events: list[tuple[bytes, bytes]]) -> bool:
            daemon.check_alive()
            return expected(events) <= delivered(sb)

        await wait_for(lambda: arrived(first), 60, "the first half delivered before the fault")
        before = await fault_signals(sb, daemon)
        # no fault yet (syncd's own counters may hold the first token and a stray disconnect)
        assert all(before[n] == 0 for n in evidence if n.startswith("sandbox_")), f"{before}"
        sb.state.set_faults(faults)
        await produce(kafka.bootstrap, topic, second)
        seen: dict[str, float] = {}

        async def fault_hit() -> bool:
            daemon.check_alive()
            seen.update(await fault_signals(sb, daemon))
            return all(seen[name] > before[name] for name in evidence)

        try:
            await wait_for(fault_hit, 60, f"{fault} observed by the sandbox and by syncd")
        except AssertionError as exc:
            raise AssertionError(f"{exc}; before: {before}; last seen: {seen}") from None
        await wait_for(lambda: arrived(messages), 90, f"every change delivered despite {fault}")
        ends = await end_offsets(kafka.bootstrap, topic)

        async def committed() -> bool:
            return await committed_offsets(kafka.bootstrap, topic, raw["kafka"]["group_id"]) == ends

        await wait_for(committed, 60, f"every offset committed despite {fault}")
        assert await daemon.terminate() == 0


async def test_revoked_refresh_token_is_a_clear_fatal_error(kafka: Any, tmp_path: Path) -> None:
    topic = f"revoked-{uuid.uuid4().hex[:8]}"
    await kafka.create_topic(topic, partitions=1)
    async with running_sandbox(SandboxSettings(job_delay_s=0.2, token_ttl_s=2.0)) as sb:
        raw = sqlite_daemon_config(
            kafka.bootstrap,
            sb,
            topic,
            tmp_path,
        )
        daemon = DaemonProcess(tmp_path, raw).start()
        await daemon.wait_ready()
        sb.state.set_faults({"revoke_refresh_token": True, "expire_tokens": True})
        await produce(kafka.bootstrap, topic, list(synth.events(20, seed=35)))

        async def not_ready() -> bool:
            daemon.check_alive()
            status, _ = await daemon.get("/readyz")
            return status == 503

        await wait_for(not_ready, 30, "/readyz false after the refresh token was revoked")
        token_requests = sb.state.stats()["token_requests"]

        async def idle_and_alive() -> bool:
            daemon.check_alive()
            status, _ = await daemon.get("/livez")
            return status == 200 and sb.state.stats()["token_requests"] == token_requests

        # no retry loop, busy or slow: over a window longer than the token loop's retry
        # interval (5 s) not one more token request, and the process stays alive
        await holds_for(idle_and_alive, 6.0, "no token request after the fatal error")
        assert "invalid_grant" in daemon.logs()
        assert await daemon.terminate() == 1


async def test_a_killed_transform_worker_stops_syncd_and_a_restart_loses_nothing(
    kafka: Any, tmp_path: Path
) -> None:
    """A worker gone (OOM-killed, say) breaks the pool for good: syncd delivers what it can,
    exits 1 for its orchestrator to restart it, and the restart picks up every change."""
    topic = f"worker-{uuid.uuid4().hex[:8]}"
    await kafka.create_topic(topic, partitions=2)
    first = list(synth.events(300, seed=41))
    later = list(synth.events(300, seed=42, id_prefix="later-"))
    async with running_sandbox(SandboxSettings(job_delay_s=0.2)) as sb:
        raw = sqlite_daemon_config(
            kafka.bootstrap,
            sb,
            topic,
            tmp_path,
        )
        daemon = DaemonProcess(tmp_path, raw).start()
        assert daemon.proc is not None
        await daemon.wait_ready()
        await produce(kafka.bootstrap, topic, first)

        async def first_delivered() -> bool:
            daemon.check_alive()
            return expected(first) <= delivered(sb)

        await wait_for(first_delivered, 60, "the first events delivered")
        [worker] = [p for p in child_processes(daemon.proc.pid) if is_transform_worker(p)]
        os.kill(worker, signal.SIGKILL)
        await produce(kafka.bootstrap, topic, later)  # the next chunk finds the pool broken
        proc = daemon.proc

        async def exited() -> bool:
            return proc.poll() is not None

        await wait_for(exited, 60, "syncd to exit after its worker died")
        assert proc.returncode == 1
        assert "TransformWorkerLost" in daemon.logs()
        restarted = DaemonProcess(tmp_path, raw, name="restarted").start()

        async def all_delivered() -> bool:
            restarted.check_alive()
            return expected(first + later) <= delivered(sb)

        await wait_for(all_delivered, 90, "every change delivered after the restart")
        assert await restarted.terminate() == 0


async def test_transform_workers_end_with_a_killed_syncd(kafka: Any, tmp_path: Path) -> None:
    """SIGKILL gives syncd no chance to stop its pool: the workers must not outlive it."""
    topic = f"orphans-{uuid.uuid4().hex[:8]}"
    await kafka.create_topic(topic, partitions=1)
    async with running_sandbox(SandboxSettings(job_delay_s=0.2)) as sb:
        raw = sqlite_daemon_config(
            kafka.bootstrap,
            sb,
            topic,
            tmp_path,
        )
        daemon = DaemonProcess(tmp_path, raw).start()
        assert daemon.proc is not None
        await daemon.wait_ready()
        changes = list(synth.events(50, seed=43))
        await produce(kafka.bootstrap, topic, changes)

        async def all_delivered() -> bool:  # the worker has transformed them
            daemon.check_alive()
            return expected(changes) <= delivered(sb)

        await wait_for(all_delivered, 60, "the changes delivered")
        workers = [p for p in child_processes(daemon.proc.pid) if is_transform_worker(p)]
        assert len(workers) == 1
        daemon.kill()

        async def workers_gone() -> bool:
            return not any(map(alive, workers))

        await wait_for(workers_gone, 30, "the transform workers to end with syncd")


async def test_sigkill_at_random_points_loses_nothing(
    kafka: Any, pg_url: str, tmp_path: Path, record_property: Callable[[str, object], None]
) -> None:
    topic = f"crash-{uuid.uuid4().hex[:8]}"
    await kafka.create_topic(topic, partitions=3)
    messages = list(synth.events(3000, seed=36))
    await produce(kafka.bootstrap, topic, messages)
    want = expected(messages)
    # where each profile's event sits in the topic (one event per profile)
    position = {
        orjson.loads(m.value)["profile_id"]: (m.partition, m.offset)
        for m in await read_topic(kafka.bootstrap, topic, len(messages))
    }
    assert len(position) == len(messages)
    rng = random.Random(36)
    max_pending = 300
    kills = 4
    in_flight_at_kill: list[int] = []
    counted_jobs: set[str] = set()
    async with running_sandbox(SandboxSettings(job_delay_s=0.3, latency_s=0.05)) as sb:
        raw = daemon_config(
            bootstrap=kafka.bootstrap,
            topic=topic,
            sandbox_url=sb.url,
            token_url=sb.token_url,
            store_url=pg_url,
            kafka={"max_pending_events": max_pending},
            batch={"max_records": 200, "linger_ms": 50},
            # a job a killed run had claimed returns to the next run when the claim's lease
            # (max_retry_time_s + 2 request timeouts) runs out
            amazon={"max_retry_time_s": 5.0, "request_timeout_s": 5.0},
        )
        group = raw["kafka"]["group_id"]
        for run in range(kills):
            daemon = DaemonProcess(tmp_path, raw, name=f"run-{run}").start()
            target = len(delivered(sb)) + rng.randint(100, 600)

            async def progressed(d: DaemonProcess = daemon, t: int = target) -> bool:
                d.check_alive()
                return len(delivered(sb)) >= min(t, len(want))

            await wait_for(progressed, 60, "progress before the kill")
            daemon.kill()
            # accepted by Amazon but its job (and the members' sent state) not stored: those
            # members are still due, and the next run sends them again. A replayed event
            # resends nothing (its change is in the member table already).
            store = await Store.connect(pg_url)
            try:
                stored = {j.job_request_id for j in await store.list_jobs(limit=100_000)}
            finally:
                await store.close()
            ledger_now = [e for c in (CONNECTION, OTHER_CONNECTION) for e in sb.state.ledger(c)]
            unstored = {e["jobRequestId"] for e in ledger_now} - stored - counted_jobs
            counted_jobs |= unstored
            in_flight_at_kill.append(sum(e["jobRequestId"] in unstored for e in ledger_now))
        final = DaemonProcess(tmp_path, raw, name="final").start()
        await final.wait_ready()  # its SIGTERM handler is installed before it is asked to stop

        async def complete() -> bool:
            final.check_alive()
            return want <= delivered(sb)

        await wait_for(complete, 120, "every change delivered after four SIGKILLs")
        store = await Store.connect(pg_url)
        try:
            rows: list[Any] = []

            async def all_terminal() -> bool:
                # one read: the final run may still store a new job (a resend of a member whose
                # earlier job a kill left unstored) between two reads
                final.check_alive()
                rows[:] = await store.list_jobs(limit=100_000)
                return all(j.terminal for j in rows)

            await wait_for(all_terminal, 60, "every stored job polled to a terminal state")
        finally:
            await store.close()
        assert await final.terminate() == 0
        ends = await end_offsets(kafka.bootstrap, topic)
        ledger = [e for c in (CONNECTION, OTHER_CONNECTION) for e in sb.state.ledger(c)]
        accepted = {e["jobRequestId"] for e in ledger}
        twice_in_a_job = len(ledger) - len(
            {(e["jobRequestId"], e["record"]["externalUserId"]) for e in ledger}
        )
        assert twice_in_a_job == 0  # one job never holds a member twice
    resent = len(ledger) - len(want)  # records Amazon received more than once
    record_property("resent_records", resent)
    record_property("in_flight_at_kill", in_flight_at_kill)
    print(f"resent records: {resent}; accepted, job not stored, at each kill: {in_flight_at_kill}")
    # every resend is a record whose POST Amazon accepted while its job was not stored when a
    # kill hit: at most the POSTs under way, max_concurrency per connection of max_records
    assert resent <= sum(in_flight_at_kill)
    assert all(n <= 2 * AmazonConfig().max_concurrency * 200 for n in in_flight_at_kill)
    assert await committed_offsets(kafka.bootstrap, topic, group) == ends
    # the store is consistent with what Amazon accepted
    assert {j.job_request_id for j in rows} <= accepted  # no phantom job rows
    per_job = collections.Counter(e["jobRequestId"] for e in ledger)
    assert all(j.records == per_job[j.job_request_id] for j in rows)
    assert all(j.terminal for j in rows)


@settings(max_examples=25, suppress_health_check=list(HealthCheck))
@given(
    payload=st.one_of(
        st.binary(max_size=300),
        st.recursive(
            st.none()
            | st.booleans()
            | st.integers(min_value=-(2**63), max_value=2**64 - 1)  # what orjson can write
            | st.floats(allow_nan=False)
            | st.text(max_size=20),
            lambda inner: (
                st.lists(inner, max_size=4)
                | st.dictionaries(
                    st.sampled_from(
                        [
                            "profile_id",
                            "identifiers",
                            "audiences",
                            "country",
                            "consent",
                            "email",
                            "add",
                        ]
                    ),
                    inner,
                    max_size=4,
                )
            ),
            max_leaves=20,
        ).map(orjson.dumps),
    )
)
def test_generated_garbage_never_crashes_the_decoder(payload: bytes) -> None:
    """The daemon's first stages on arbitrary bytes: only DecodeError/Unusable, never a crash."""
    from syncd.events import DecodeError, decode
    from syncd.model import Destination
    from syncd.routing import Router, Unusable

    router = Router([Destination("vip", CONNECTION, 1, "US")], strict_reference=False)
    with contextlib.suppress(DecodeError, Unusable):
        router.route(decode(payload, "canonical"))
