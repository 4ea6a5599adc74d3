"""The transform stage: the same outcomes, in order, inline and in worker processes."""

from __future__ import annotations

import asyncio
import fcntl
import hashlib
import os
import select
import signal
import subprocess
import sys
import time
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from syncd import synth
from syncd.localstack import child_processes, is_transform_worker
from syncd.model import Action, Destination, Erase, MemberRecord
from syncd.routing import RouteCounts
from syncd.transform import FRAME_HEADER, PIPE_BYTES, Outcome, Refused, Spec, Transform
from syncd.transform_pool import MAX_FRAME_BYTES, Transformer, TransformWorkerLost
from tests.unit.test_events_canonical import events, json_values
from tests.unit.test_events_segment import SEGMENT_FIELDS, hostile_segment

DESTINATIONS = (
    Destination("vip", "conn-1", 413642381039213536, "US"),
    Destination("lapsed", "conn-1", 347891, "GB"),
)
SPEC = Spec(DESTINATIONS, "canonical", 1_000_000, strict_reference=False)


def values() -> list[bytes | None]:
    good = [raw for _, raw in synth.events(200, seed=3, audiences=("vip", "lapsed"))]
    bad: list[bytes | None] = [
        b"not json",
        None,
        orjson.dumps({"profile_id": "p1", "identifiers": {"email": "a@b.co"}, "audiences": {}}),
        orjson.dumps(
            {"profile_id": "p2", "identifiers": {"email": "a@b.co"}, "audiences": {"add": ["x"]}}
        ),
    ]
    members: list[bytes | None] = [
        orjson.dumps({"profile_id": "p3", "identifiers": {"email": "c@d.co"}, "country": "FR"}),
        orjson.dumps({"profile_id": "p 4", "erase": True, "occurred_at": "2026-11-22T10:00:00Z"}),
        orjson.dumps({"profile_id": "p5", "erase": True}),
    ]
    return [*good[:100], *bad, *members, *good[100:]]


def test_outcomes_are_reasons_or_encoded_records_per_destination() -> None:
    event = orjson.dumps(
        {
            "profile_id": "cdp-1",
            "identifiers": {"email": "Jane.Doe@Example.com", "phone": "not a phone"},
            "audiences": {"add": ["vip"], "remove": ["lapsed", "unknown"]},
        }
    )
    outcomes, counts = Transform(SPEC).run([event, b"{", None, b""])
    first, not_json, tombstone, empty = outcomes
    assert not_json == Refused("not_json", "line 1 column 2")
    assert tombstone == []  # a compacted topic's deleted key: nothing to do, not a bad event
    assert isinstance(empty, Refused)
    assert isinstance(first, list)
    assert [(index, record.action) for index, record in first] == [
        (0, Action.ADD),
        (1, Action.REMOVE),
    ]
    countries = [orjson.loads(record.json)["countryCode"] for _, record in first]
    assert countries == ["US", "GB"]  # no event country: each destination's own
    assert counts.filtered == {"unknown_audience": 1, "tombstone": 1}
    assert counts.default_country == {"vip": 1, "lapsed": 1}
    assert counts.dropped[("phone", "invalid")] == 2  # once per country it was hashed for


def test_an_erase_event_is_the_erase_of_its_external_user_id() -> None:
    outcomes, _ = Transform(SPEC).run(
        [
            orjson.dumps({"profile_id": "p 4", "erase": True, "occurred_at": "2026-11-22T10:00Z"}),
            orjson.dumps({"profile_id": "cdp-5", "erase": True, "identifiers": {"email": 1}}),
            orjson.dumps({"profile_id": "cdp-6", "erase": "yes"}),
        ]
    )
    assert outcomes == [
        Erase(hashlib.sha256(b"p 4").hexdigest(), 1795341600.0),  # outside the API's pattern
        Erase("cdp-5", None),
        Refused("bad_erase", "erase is string, not true"),
    ]


def test_an_identifiers_only_event_is_an_add_record_for_every_destination() -> None:
    event = {"profile_id": "cdp-1", "identifiers": {"email": "Jane.Doe@Example.com"}}
    [only, unusable], counts = Transform(SPEC).run(
        [orjson.dumps(event), orjson.dumps({**event, "identifiers": {"email": "nope"}})]
    )
    assert isinstance(only, list)
    assert [(i, r.action, r.identifiers_only) for i, r in only] == [
        (0, Action.ADD, True),
        (1, Action.ADD, True),
    ]
    assert [orjson.loads(r.json)["countryCode"] for _, r in only] == ["US", "GB"]
    assert unusable == Refused("no_usable_identifier")
    assert counts.filtered == {}


def test_an_occurred_at_more_than_five_minutes_ahead_is_dead_lettered() -> None:
    ahead = datetime.fromtimestamp(time.time() + 3600, UTC).isoformat()
    event = {"profile_id": "p", "identifiers": {"email": "a@b.co"}, "occurred_at": ahead}
    outcomes, _ = Transform(SPEC).run(
        [
            orjson.dumps({**event, "audiences": {"add": ["vip"]}}),
            orjson.dumps(event),
            orjson.dumps({"profile_id": "p", "erase": True, "occurred_at": ahead}),
        ]
    )
    assert [o.reason for o in outcomes if isinstance(o, Refused)] == ["bad_occurred_at"] * 3


def assert_outcome(outcome: Outcome) -> None:
    """One of the three kinds: a reason, the erase of a member, or records per destination (an
    identifiers-only event's: ADDs, one per destination)."""
    if isinstance(outcome, Refused | Erase):
        return
    assert outcome
    for index, record in outcome:
        assert 0 <= index < len(DESTINATIONS)
        assert isinstance(record, MemberRecord)
        assert orjson.loads(record.json)["action"] == record.action.value
    if any(record.identifiers_only for _, record in outcome):
        assert [(i, r.action, r.identifiers_only) for i, r in outcome] == [
            (i, Action.ADD, True) for i in range(len(DESTINATIONS))
        ]


@settings(max_examples=300)
@given(events | json_values)
def test_any_canonical_event_gives_one_outcome_of_the_three_kinds(doc: Any) -> None:
    [outcome], _ = Transform(SPEC).run([orjson.dumps(doc)])
    assert_outcome(outcome)


@settings(max_examples=300)
@given(st.sampled_from(SEGMENT_FIELDS).flatmap(hostile_segment) | json_values)
def test_any_segment_event_gives_one_outcome_of_the_three_kinds(doc: Any) -> None:
    spec = Spec(DESTINATIONS, "segment", 1_000_000, strict_reference=False)
    [outcome], _ = Transform(spec).run([orjson.dumps(doc)])
    assert_outcome(outcome)
    assert not isinstance(outcome, Erase)  # Segment events have no erase


def test_an_event_of_unknown_audiences_only_is_dead_lettered_not_also_filtered() -> None:
    event = orjson.dumps(
        {"profile_id": "p", "identifiers": {"email": "a@x.io"}, "audiences": {"add": ["nope"]}}
    )
    [outcome], counts = Transform(SPEC).run([event])
    assert outcome == Refused("unknown_audience")  # counted once, as a dead letter by its reason
    assert counts.filtered == {}


def test_take_counts_starts_counting_again() -> None:
    transform = Transform(SPEC)
    _, first = transform.run(values())
    _, second = transform.run([])
    assert first.default_country  # something was counted
    assert second == RouteCounts()


@pytest.mark.parametrize("workers", [0, 1, 2])
async def test_worker_processes_give_the_inline_outcomes_in_submission_order(
    workers: int,
) -> None:
    batch = values()
    expected, expected_counts = Transform(SPEC).run(batch)
    transformer = Transformer(SPEC, workers=workers)
    await transformer.start()
    try:
        futures = [transformer.submit(batch[i : i + 37]) for i in range(0, len(batch), 37)]
        results = [await f for f in futures]
    finally:
        await transformer.close()
    outcomes = [o for chunk, _ in results for o in chunk]
    assert outcomes == expected
    for kind in ("filtered", "default_country", "dropped"):
        merged: Counter[object] = Counter()
        for _, counts in results:
            merged.update(getattr(counts, kind))
        assert merged == getattr(expected_counts, kind), kind


async def test_the_workers_are_the_only_processes_started_and_close_ends_them() -> None:
    """Plain child processes: no helper beside them (multiprocessing's resource tracker was
    one, ~13 MB), and none left after `close`."""
    before = set(child_processes(os.getpid()))
    transformer = Transformer(SPEC, workers=2)
    await transformer.start()
    try:
        started = set(child_processes(os.getpid())) - before
        assert len(started) == 2
        assert all(is_transform_worker(pid) for pid in started)
    finally:
        await transformer.close()
    assert not set(child_processes(os.getpid())) & started


async def test_chunks_submitted_before_close_still_get_their_outcomes() -> None:
    batch = values()
    expected, _ = Transform(SPEC).run(batch)
    transformer = Transformer(SPEC, workers=1)
    await transformer.start()
    futures = [transformer.submit(batch[i : i + 50]) for i in range(0, len(batch), 50)]
    await transformer.close()
    assert [o for f in futures for o in (await f)[0]] == expected


async def test_a_killed_worker_fails_its_chunks_and_every_later_one_by_name() -> None:
    transformer = Transformer(SPEC, workers=1)
    await transformer.start()
    try:
        [pid] = [p for p in child_processes(os.getpid()) if is_transform_worker(p)]
        await transformer.submit(values())  # the worker is up
        os.kill(pid, signal.SIGKILL)
        for _ in range(2):  # the chunk the kill met (or the first after it), then a later one
            with pytest.raises(
                TransformWorkerLost, match=rf"worker {pid} exited \(killed by signal 9\)"
            ):
                await transformer.submit(values())
    finally:
        await transformer.close()


@pytest.mark.skipif(sys.platform != "linux", reason="pipe sizes are set on Linux only")
async def test_the_worker_pipes_are_widened() -> None:
    transformer = Transformer(SPEC, workers=1)
    await transformer.start()
    try:
        await transformer.submit(values())  # the worker widens its pipes before it reads
        [worker] = transformer._workers
        process: Any = worker.process
        pipes = [process.stdin.get_extra_info("pipe"), process._transport.get_pipe_transport(1)]
        pipes[1] = pipes[1].get_extra_info("pipe")
        sizes = [fcntl.fcntl(p.fileno(), fcntl.F_GETPIPE_SZ) for p in pipes]
    finally:
        await transformer.close()
    assert sizes == [PIPE_BYTES, PIPE_BYTES]


@pytest.mark.parametrize(
    "garbage", [FRAME_HEADER.pack(3) + b"bad", FRAME_HEADER.pack(MAX_FRAME_BYTES + 1)]
)
async def test_an_unreadable_frame_ends_the_worker_and_fails_its_chunks_by_name(
    garbage: bytes,
) -> None:
    """Whatever goes wrong reading results, no chunk waits forever: the worker is ended."""
    transformer = Transformer(SPEC, workers=1)
    await transformer.start()
    try:
        await transformer.submit(values())  # the worker is up, and idle
        [worker] = transformer._workers
        assert worker.process.stdout is not None
        worker.process.stdout.feed_data(garbage)
        with pytest.raises(TransformWorkerLost, match="after a frame that does not read"):
            await transformer.submit(values())
    finally:
        await transformer.close()


async def test_a_chunk_submitted_after_close_fails_at_once() -> None:
    transformer = Transformer(SPEC, workers=1)
    await transformer.start()
    await transformer.close()
    with pytest.raises(TransformWorkerLost, match="closed"):
        await transformer.submit(values())


async def test_a_failing_worker_says_what_failed_and_where_but_not_the_message(
    capfd: pytest.CaptureFixture[str],
) -> None:
    """An exception's message may quote an event's PII: the worker's stderr gets its type and
    place only (no traceback), and the daemon gets the exit."""
    async with Transformer(SPEC, workers=1) as transformer:
        bad: list[Any] = [{"email": "alice@example.com"}]  # not bytes: the transform fails
        with pytest.raises(TransformWorkerLost, match=r"exit code 1"):
            await transformer.submit(bad)
    err = capfd.readouterr().err
    assert "syncd transform worker: TypeError at " in err
    assert "alice" not in err
    assert "Traceback" not in err


async def test_a_failed_start_leaves_no_worker_running(monkeypatch: pytest.MonkeyPatch) -> None:
    real = asyncio.create_subprocess_exec
    started: list[int] = []

    async def second_fails(*args: Any, **kwargs: Any) -> Any:
        if started:
            raise OSError("no more processes")
        process = await real(*args, **kwargs)
        started.append(process.pid)
        return process

    monkeypatch.setattr(asyncio, "create_subprocess_exec", second_fails)
    with pytest.raises(OSError, match="no more processes"):
        async with Transformer(SPEC, workers=2):
            pass
    assert started
    assert not set(child_processes(os.getpid())) & set(started)


# A daemon that starts one worker, waits for its first answer, forks a process that holds the
# worker's stdin open (so that no end of file tells the worker), prints both pids and dies by
# SIGKILL.
_DAEMON_KILLED_WITH_ITS_WORKERS_STDIN_HELD = """
import asyncio, os, signal, sys
from syncd.localstack import child_processes, is_transform_worker
from syncd.transform_pool import Transformer
from tests.unit.test_transform import SPEC

async def main():
    transformer = Transformer(SPEC, workers=1)
    await transformer.start()
    await transformer.submit([b"{}"])  # the worker is up (past its start-up checks)
    [worker] = [p for p in child_processes(os.getpid()) if is_transform_worker(p)]
    holder = os.fork()
    if holder == 0:
        sys.stdin.buffer.read()  # until the test closes this stdin
        os._exit(0)
    print(worker, holder, flush=True)
    os.kill(os.getpid(), signal.SIGKILL)

asyncio.run(main())
"""


@pytest.mark.skipif(sys.platform != "linux", reason="PR_SET_PDEATHSIG is Linux's")
def test_a_worker_dies_with_its_daemon_even_while_its_stdin_stays_open() -> None:
    """A SIGKILLed daemon cannot stop its workers; an idle worker also sees its stdin end, but
    a busy one (or one whose pipe another process holds) would run on: the kernel kills it
    with the daemon (PR_SET_PDEATHSIG)."""
    daemon = subprocess.Popen(
        [sys.executable, "-c", _DAEMON_KILLED_WITH_ITS_WORKERS_STDIN_HELD],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        cwd=Path(__file__).parents[2],  # imports syncd and tests from the checkout
    )
    assert daemon.stdin is not None
    assert daemon.stdout is not None
    try:
        ready, _, _ = select.select([daemon.stdout], [], [], 60)
        assert ready, "the daemon did not start its worker"
        line = daemon.stdout.readline()
        assert line, f"the daemon failed (exit {daemon.wait(timeout=30)})"
        worker, holder = map(int, line.split())
        assert daemon.wait(timeout=30) == -signal.SIGKILL
        try:
            pidfd = os.pidfd_open(worker)
        except ProcessLookupError:
            pass  # already gone
        else:
            with select.epoll() as ep:  # readable once the process has ended
                ep.register(pidfd, select.EPOLLIN)
                assert ep.poll(timeout=30), f"worker {worker} outlived its daemon"
            os.close(pidfd)
        os.kill(holder, 0)  # the worker's stdin was still open when it died
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait()
        daemon.stdin.close()  # the holder exits
        daemon.stdout.close()
