"""Deliver: the AIMD concurrency limit (429 slows the whole connection) and ConnectionSender with
fakes for the poster, the budget and the job store (the order of budget, POST, job row, ack)."""

from __future__ import annotations

import asyncio
import itertools
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import orjson
import pytest

from syncd.batching import EncodedBatch
from syncd.deliver import AdaptiveLimit, ConnectionSender, cancel_and_wait
from syncd.errors import AuthError, RejectedError, RetryableError
from syncd.model import Action, Batch, Destination, Member, SourceRef
from syncd.observability.metrics import REGISTRY
from syncd.store import NewJob

DEADLINE_S = 5.0


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def gauge(name: str, connection: str) -> float | None:
    return REGISTRY.get_sample_value(name, {"connection": connection})


async def until(condition: Callable[[], bool], what: str) -> None:
    """Let the loop run until `condition` holds; fail with `what` at the deadline."""
    deadline = time.monotonic() + DEADLINE_S
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for: {what}")
        await asyncio.sleep(0.001)


async def settle(rounds: int = 50) -> None:
    """Give every runnable task its turns: only to check that something does *not* happen."""
    for _ in range(rounds):
        await asyncio.sleep(0)


# -- AdaptiveLimit -------------------------------------------------------------------------------


def test_throttling_halves_the_limit_once_per_cooldown_down_to_one() -> None:
    clock = Clock()
    label = uuid.uuid4().hex
    limit = AdaptiveLimit(8, label=label, cooldown_s=1.0, clock=clock)
    assert limit.limit == 8
    assert gauge("syncd_connection_concurrency_limit", label) == 8
    limit.on_throttle(2.0)
    assert limit.limit == 4
    # a burst of 429s (every in-flight request of the connection) is one cut, not one each
    limit.on_throttle(2.0)
    limit.on_throttle(None)
    clock.now += 0.99
    limit.on_throttle(None)
    assert limit.limit == 4
    clock.now += 0.01
    limit.on_throttle(None)
    assert limit.limit == 2
    for _ in range(5):
        clock.now += 1.0
        limit.on_throttle(None)
    assert limit.limit == 1  # never below one: the connection keeps moving
    assert gauge("syncd_connection_concurrency_limit", label) == 1


def test_successes_grow_the_limit_back_by_one_per_limit_successes_up_to_the_maximum() -> None:
    clock = Clock()
    label = uuid.uuid4().hex
    limit = AdaptiveLimit(8, label=label, clock=clock)
    limit.on_success()
    assert limit.limit == 8  # never above the maximum
    for _ in range(3):
        clock.now += 1.0
        limit.on_throttle(None)
    assert limit.limit == 1
    seen = [limit.limit]
    for _ in range(40):
        limit.on_success()
        seen.append(limit.limit)
        assert gauge("syncd_connection_concurrency_limit", label) == limit.limit
    assert seen == sorted(seen)  # additive increase: monotone, one step at a time
    assert all(b - a <= 1 for a, b in itertools.pairwise(seen))
    assert seen[-1] == 8
    # +1 per `limit` successes: from 1 to 8 takes about 1 + 2 + ... + 7 = 28 successes
    assert 20 <= seen.index(8) <= 32


async def test_the_limit_caps_concurrent_holders_and_a_cut_applies_to_the_next_ones() -> None:
    limit = AdaptiveLimit(4, label=uuid.uuid4().hex, clock=Clock())
    inside = 0
    first, rest = asyncio.Event(), asyncio.Event()

    async def hold(gate: asyncio.Event) -> None:
        nonlocal inside
        async with limit:
            inside += 1
            await gate.wait()
            inside -= 1

    early = [asyncio.create_task(hold(first)) for _ in range(4)]
    late = [asyncio.create_task(hold(rest)) for _ in range(6)]
    await until(lambda: inside == 4, "four holders")
    await settle()
    assert inside == 4  # the maximum; six wait
    limit.on_throttle(None)  # 4 -> 2 while four are inside: they finish, the next wait
    assert inside == 4  # a cut does not interrupt what is in flight
    first.set()
    await until(lambda: all(t.done() for t in early), "the first four done")
    await until(lambda: inside == 2, "two of the waiting holders inside")
    await settle()
    assert inside == 2  # the cut limit, although four still wait
    rest.set()
    await asyncio.wait_for(asyncio.gather(*late), DEADLINE_S)
    assert inside == 0


# -- ConnectionSender with fakes -----------------------------------------------------------------


@dataclass
class Fakes:
    """Poster, budget, job store, ack and reject in one: every call lands in `events`."""

    events: list[tuple[str, object]] = field(default_factory=list)
    reservations: int = 0
    outcomes: list[Callable[[Callable[[float | None], None] | None], Awaitable[str]]] = field(
        default_factory=list
    )
    store_failures: int = 0
    posting: int = 0
    peak_posting: int = 0
    acked: list[str] = field(default_factory=list)
    rejected: list[tuple[EncodedBatch, str]] = field(default_factory=list)

    # poster
    async def post_records(
        self,
        body: bytes,
        *,
        connection_id: str,
        on_throttle: Callable[[float | None], None] | None = None,
    ) -> str:
        self.events.append(("post", connection_id))
        self.posting += 1
        self.peak_posting = max(self.peak_posting, self.posting)
        try:
            if self.outcomes:
                return await self.outcomes.pop(0)(on_throttle)
            return f"job-{uuid.uuid4().hex[:8]}"
        finally:
            self.posting -= 1

    # budget
    async def acquire(self, connection_id: str, records: int) -> int:
        self.reservations += 1
        self.events.append(("acquire", self.reservations))
        return self.reservations

    async def release(self, reservation_id: int) -> None:
        self.events.append(("release", reservation_id))

    async def confirm(self, reservation_id: int) -> None:
        self.events.append(("confirm", reservation_id))

    # job store
    async def add_job(self, job: NewJob, *, first_poll_after_s: float) -> None:
        if self.store_failures:
            self.store_failures -= 1
            self.events.append(("add_job failed", job.job_request_id))
            raise ConnectionError("store unreachable")
        self.events.append(("add_job", job))

    # pipeline callbacks
    def ack(self, batch: Batch, job_id: str) -> None:
        self.events.append(("ack", job_id))
        self.acked.append(job_id)

    async def reject(self, encoded: EncodedBatch, reason: str) -> None:
        self.events.append(("reject", reason))
        self.rejected.append((encoded, reason))

    def kinds(self) -> list[str]:
        return [kind for kind, _ in self.events]


def encoded(connection: str, members: int = 3) -> EncodedBatch:
    """A batch of `members` records (the first a remove); the sender only passes the body on."""
    dest = Destination("vip", connection, 413642381039213536, "US")
    actions = [Action.REMOVE] + [Action.ADD] * (members - 1)
    batch = Batch(
        destination=dest,
        records=[Member(f"m{i}", action) for i, action in enumerate(actions)],
        sources=[[SourceRef("t", 0, i)] for i in range(members)],
    )
    records = [
        {"externalUserId": m.external_user_id, "action": m.action.value} for m in batch.records
    ]
    body = orjson.dumps(
        {
            "audienceId": dest.audience_id,
            "targetResource": {"connectionId": connection},
            "records": records,
        }
    )
    batch.size_bytes = len(body)
    return EncodedBatch(batch, body, [orjson.dumps(r) for r in records])


@pytest.fixture
async def sender() -> AsyncIterator[tuple[ConnectionSender, Fakes]]:
    fakes = Fakes()
    s = ConnectionSender(
        uuid.uuid4().hex,
        poster=fakes,
        budget=fakes,
        jobs=fakes,
        ack=fakes.ack,
        reject=fakes.reject,
        max_concurrency=4,
        first_poll_after_s=0.2,
        retry_pause_s=0.0,
    )
    task = asyncio.create_task(s.run())
    yield s, fakes
    await cancel_and_wait(task)


async def drained(s: ConnectionSender) -> None:
    await asyncio.wait_for(s.drained(), DEADLINE_S)


async def test_the_job_row_is_stored_before_the_ack(
    sender: tuple[ConnectionSender, Fakes],
) -> None:
    s, fakes = sender
    s.submit(encoded(s.connection_id))
    await drained(s)
    assert fakes.kinds() == ["acquire", "post", "confirm", "add_job", "ack"]
    job = fakes.events[3][1]
    assert isinstance(job, NewJob)
    assert (job.connection_id, job.records, job.adds, job.removes) == (s.connection_id, 3, 2, 1)
    assert fakes.acked == [job.job_request_id]
    assert s.backlog == 0


async def test_a_store_outage_holds_the_ack_until_the_job_row_is_written(
    sender: tuple[ConnectionSender, Fakes],
) -> None:
    s, fakes = sender
    fakes.store_failures = 1
    s.submit(encoded(s.connection_id))
    await until(lambda: "add_job failed" in fakes.kinds(), "the failed store write")
    assert fakes.acked == []  # not acknowledged while the row is not stored
    await drained(s)
    assert fakes.kinds() == ["acquire", "post", "confirm", "add_job failed", "add_job", "ack"]


async def test_a_rejected_batch_releases_its_reservation_and_is_rejected_not_acked(
    sender: tuple[ConnectionSender, Fakes],
) -> None:
    s, fakes = sender

    async def bad_request(_: object) -> str:
        raise RejectedError("audienceId must be an integer", status=400)

    fakes.outcomes.append(bad_request)
    batch = encoded(s.connection_id)
    s.submit(batch)
    await drained(s)
    assert fakes.kinds() == ["acquire", "post", "release", "reject"]
    assert ("release", 1) in fakes.events  # the reservation acquire returned
    [(rejected, reason)] = fakes.rejected
    assert rejected is batch
    assert "status=400" in reason
    assert "audienceId must be an integer" in reason
    assert fakes.acked == []
    # the rest flows: the next batch is delivered normally
    s.submit(encoded(s.connection_id))
    await drained(s)
    assert fakes.kinds()[-5:] == ["acquire", "post", "confirm", "add_job", "ack"]


async def test_a_batch_whose_retries_ran_out_keeps_its_reservation_and_is_sent_again(
    sender: tuple[ConnectionSender, Fakes],
) -> None:
    s, fakes = sender

    async def timed_out(_: object) -> str:
        raise RetryableError("timed out")

    fakes.outcomes.append(timed_out)
    s.submit(encoded(s.connection_id))
    await drained(s)
    # the outcome of the first POST is unknown: its reservation is neither released nor
    # confirmed, the resend takes a new one
    assert fakes.kinds() == ["acquire", "post", "acquire", "post", "confirm", "add_job", "ack"]
    assert ("confirm", 2) in fakes.events
    assert not any(kind == "release" for kind in fakes.kinds())
    assert len(fakes.acked) == 1


async def test_an_auth_error_releases_the_reservation_and_stops_the_sender() -> None:
    fakes = Fakes()

    async def revoked(_: object) -> str:
        raise AuthError("invalid_grant", status=400)

    fakes.outcomes.append(revoked)
    s = ConnectionSender(
        uuid.uuid4().hex,
        poster=fakes,
        budget=fakes,
        jobs=fakes,
        ack=fakes.ack,
        reject=fakes.reject,
        max_concurrency=2,
        first_poll_after_s=0.2,
    )
    s.submit(encoded(s.connection_id))
    with pytest.raises(ExceptionGroup) as info:
        await asyncio.wait_for(s.run(), DEADLINE_S)
    assert info.group_contains(AuthError)
    assert fakes.kinds() == ["acquire", "post", "release"]
    assert fakes.acked == []
    assert fakes.rejected == []


async def test_a_429_storm_reduces_the_connections_concurrency(
    sender: tuple[ConnectionSender, Fakes],
) -> None:
    s, fakes = sender
    conn = s.connection_id
    all_in, storm, after = asyncio.Event(), asyncio.Event(), asyncio.Event()
    throttled = 0

    async def throttled_then_ok(on_throttle: Callable[[float | None], None] | None) -> str:
        nonlocal throttled
        assert on_throttle is not None  # the sender hands its limit to the client
        await all_in.wait()
        on_throttle(1.0)  # the client saw a 429 (and retries it itself)
        throttled += 1
        await storm.wait()
        return f"job-{uuid.uuid4().hex[:8]}"

    async def slow_ok(_: object) -> str:
        await after.wait()
        return f"job-{uuid.uuid4().hex[:8]}"

    fakes.outcomes += [throttled_then_ok] * 4 + [slow_ok] * 4
    for _ in range(8):
        s.submit(encoded(conn))
    await until(lambda: fakes.posting == 4, "four POSTs in flight")
    assert fakes.peak_posting == 4  # max_concurrency before the storm
    all_in.set()
    await until(lambda: throttled == 4, "all four throttled")
    # four concurrent 429s within the cooldown are one multiplicative decrease: 4 -> 2
    assert gauge("syncd_connection_concurrency_limit", conn) == 2
    storm.set()
    await until(lambda: len(fakes.acked) == 4, "the throttled batches delivered")
    # four successes grow 2 -> 3 (additive increase), not back to 4
    assert gauge("syncd_connection_concurrency_limit", conn) == 3
    await until(lambda: fakes.posting == 3, "the next POSTs in flight")
    await settle()
    assert fakes.posting == 3  # the fourth worker waits although a batch is queued
    assert gauge("syncd_inflight_requests", conn) == 3
    assert s.backlog == 4
    after.set()
    await drained(s)
    assert len(fakes.acked) == 8
