"""Deliver: the AIMD concurrency limit (429 slows the whole connection) and ConnectionSender with
fakes for the poster, the budget and the outcomes: the order of budget, POST, job row + sent
state; how each answer settles its reservation; the bisect of a 400 and its bound; a connection
blocked by a setup fault, a long Retry-After or failing POSTs, and resumed. MemberFeed is tested
against a real member table in tests/unit/test_feed.py."""

from __future__ import annotations

import asyncio
import itertools
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from syncd.batching import EncodedBatch, build_batches
from syncd.deliver import (
    BISECT_LIMIT,
    AdaptiveLimit,
    BlockLog,
    ConnectionSender,
    cancel_and_wait,
)
from syncd.errors import (
    AmazonError,
    AuthError,
    NotSentError,
    RejectedError,
    RetryableError,
    ThrottledError,
)
from syncd.members import ADD, REMOVE, Claim
from syncd.model import Batch, Destination, record_digest
from syncd.observability.metrics import REGISTRY
from syncd.store import NewJob
from tests.fakes import FakeClock, until

DEADLINE_S = 5.0


def gauge(name: str, connection: str) -> float | None:
    return REGISTRY.get_sample_value(name, {"connection": connection})


async def settle(rounds: int = 50) -> None:
    """Give every runnable task its turns: only to check that something does *not* happen."""
    for _ in range(rounds):
        await asyncio.sleep(0)


# -- AdaptiveLimit -------------------------------------------------------------------------------


def test_throttling_halves_the_limit_once_per_cooldown_down_to_one() -> None:
    clock = FakeClock(100.0)
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
    clock = FakeClock(100.0)
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
    limit = AdaptiveLimit(4, label=uuid.uuid4().hex, clock=FakeClock(100.0))
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
    """Poster, budget and outcomes in one: every call lands in `events`."""

    events: list[tuple[str, object]] = field(default_factory=list)
    reservations: int = 0
    outcomes: list[Callable[[Callable[[float | None], None] | None], Awaitable[str]]] = field(
        default_factory=list
    )
    answer: Callable[[bytes], Awaitable[str]] | None = None  # when `outcomes` is empty
    store_failures: int = 0
    posting: int = 0
    peak_posting: int = 0
    acked: list[str] = field(default_factory=list)
    acked_batches: list[Batch] = field(default_factory=list)
    rejected: list[tuple[EncodedBatch, str]] = field(default_factory=list)
    accepted_parts: list[EncodedBatch] = field(default_factory=list)
    bodies: list[bytes] = field(default_factory=list)
    pauses: list[float] = field(default_factory=list)
    clock: FakeClock = field(default_factory=lambda: FakeClock(100.0))
    pause_gate: asyncio.Event | None = None  # when set: each pause waits for it

    # poster
    async def post_records(
        self,
        body: bytes,
        *,
        connection_id: str,
        on_throttle: Callable[[float | None], None] | None = None,
    ) -> str:
        self.events.append(("post", connection_id))
        self.bodies.append(body)
        self.posting += 1
        self.peak_posting = max(self.peak_posting, self.posting)
        try:
            if self.outcomes:
                return await self.outcomes.pop(0)(on_throttle)
            if self.answer is not None:
                return await self.answer(body)
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

    # outcomes
    async def accepted(self, part: EncodedBatch, job: NewJob) -> None:
        if self.store_failures:
            self.store_failures -= 1
            self.events.append(("accepted failed", job.job_request_id))
            raise ConnectionError("store unreachable")
        self.events.append(("accepted", job))
        self.acked.append(job.job_request_id)
        self.acked_batches.append(part.batch)
        self.accepted_parts.append(part)

    async def refused(self, part: EncodedBatch, detail: str) -> None:
        self.events.append(("reject", detail))
        self.rejected.append((part, detail))

    # the sender's pauses: recorded, and the clock moves on by them
    async def sleep(self, seconds: float) -> None:
        self.pauses.append(seconds)
        self.clock.now += seconds
        if self.pause_gate is not None:
            await self.pause_gate.wait()
        await asyncio.sleep(0)

    def kinds(self) -> list[str]:
        return [kind for kind, _ in self.events]


def encoded(connection: str, members: int = 3) -> EncodedBatch:
    """A batch of `members` claimed records (the first a remove)."""
    dest = Destination("vip", connection, 413642381039213536, "US")
    claims = []
    for i in range(members):
        action = REMOVE if i == 0 else ADD
        record = orjson.dumps(
            {"externalUserId": f"m{i}", "action": "DELETE" if i == 0 else "CREATE"}
        )
        claims.append(
            Claim(dest.audience_id, f"m{i}", action, record, record_digest(record), "t", False, 1.0)
        )
    [batch], _ = build_batches(dest, claims, max_records=10_000, max_bytes=10_000_000)
    return batch


@pytest.fixture
async def sender() -> AsyncIterator[tuple[ConnectionSender, Fakes]]:
    fakes = Fakes()
    s = make_sender(fakes)
    task = asyncio.create_task(s.run())
    yield s, fakes
    await cancel_and_wait(task)


def make_sender(fakes: Fakes, max_concurrency: int = 4) -> ConnectionSender:
    return ConnectionSender(
        uuid.uuid4().hex,
        poster=fakes,
        budget=fakes,
        outcomes=fakes,
        max_concurrency=max_concurrency,
        pause_s=1.0,
        max_pause_s=8.0,
        failing_after_s=30.0,
        clock=fakes.clock,
        sleep=fakes.sleep,
    )


async def drained(s: ConnectionSender) -> None:
    await asyncio.wait_for(s.drained(), DEADLINE_S)


async def test_the_job_is_stored_with_its_members_after_the_202(
    sender: tuple[ConnectionSender, Fakes],
) -> None:
    s, fakes = sender
    batch = encoded(s.connection_id)
    s.submit(batch)
    await drained(s)
    assert fakes.kinds() == ["acquire", "post", "confirm", "accepted"]
    assert fakes.accepted_parts == [batch]  # the claims go with the job
    job = fakes.events[3][1]
    assert isinstance(job, NewJob)
    assert (job.connection_id, job.records, job.adds, job.removes) == (s.connection_id, 3, 2, 1)
    assert fakes.acked == [job.job_request_id]
    assert s.backlog == 0


async def test_a_store_outage_holds_the_sender_until_the_job_row_is_written(
    sender: tuple[ConnectionSender, Fakes],
) -> None:
    s, fakes = sender
    fakes.store_failures = 1
    s.submit(encoded(s.connection_id))
    await until(lambda: "accepted failed" in fakes.kinds(), "the failed store write")
    assert fakes.acked == []
    assert s.backlog == 1  # the batch is not done while its job is not stored
    await drained(s)
    assert fakes.kinds() == ["acquire", "post", "confirm", "accepted failed", "accepted"]


async def test_a_refused_single_record_releases_its_reservation_and_is_rejected_not_acked(
    sender: tuple[ConnectionSender, Fakes],
) -> None:
    s, fakes = sender

    async def bad_request(_: object) -> str:
        raise RejectedError("records[0].externalUserId is invalid", status=400)

    fakes.outcomes.append(bad_request)
    batch = encoded(s.connection_id, members=1)
    s.submit(batch)
    await drained(s)
    assert fakes.kinds() == ["acquire", "post", "release", "reject"]
    assert ("release", 1) in fakes.events  # the reservation acquire returned
    [(rejected, reason)] = fakes.rejected
    assert rejected is batch
    assert "status=400" in reason
    assert "records[0].externalUserId is invalid" in reason
    assert fakes.acked == []
    # the rest flows: the next batch is delivered normally
    s.submit(encoded(s.connection_id))
    await drained(s)
    assert fakes.kinds()[-4:] == ["acquire", "post", "confirm", "accepted"]


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
    assert fakes.kinds() == ["acquire", "post", "acquire", "post", "confirm", "accepted"]
    assert ("confirm", 2) in fakes.events
    assert not any(kind == "release" for kind in fakes.kinds())
    assert len(fakes.acked) == 1


async def test_an_auth_error_releases_the_reservation_and_stops_the_sender() -> None:
    fakes = Fakes()

    async def revoked(_: object) -> str:
        raise AuthError("invalid_grant", status=400)

    fakes.outcomes.append(revoked)
    s = make_sender(fakes, max_concurrency=2)
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


# -- the sender's state machine ------------------------------------------------------------------


def member_ids(body: bytes) -> list[str]:
    return [r["externalUserId"] for r in orjson.loads(body)["records"]]


def refusing(bad: set[str]) -> Callable[[bytes], Awaitable[str]]:
    """Amazon's 400 for any body holding one of the `bad` members; other bodies are accepted."""

    async def answer(body: bytes) -> str:
        if bad & set(member_ids(body)):
            raise RejectedError("records_post failed: HTTP 400: externalUserId invalid", status=400)
        return f"job-{uuid.uuid4().hex[:8]}"

    return answer


def settled(fakes: Fakes) -> dict[int, str]:
    """Each reservation and how it was settled ("release", "confirm"); unsettled ones absent."""
    return {int(str(rid)): kind for kind, rid in fakes.events if kind in ("release", "confirm")}


def blocked(connection: str, cause: str) -> float | None:
    return REGISTRY.get_sample_value(
        "syncd_connection_blocked", {"connection": connection, "cause": cause}
    )


async def test_a_400_is_bisected_down_to_the_refused_records_and_the_rest_delivered(
    sender: tuple[ConnectionSender, Fakes],
) -> None:
    s, fakes = sender
    fakes.answer = refusing({"m2", "m13"})
    batch = encoded(s.connection_id, members=16)
    s.submit(batch)
    await drained(s)
    # only the two refusing records are rejected, each alone, with Amazon's message
    assert sorted(member_ids(e.body)[0] for e, _ in fakes.rejected) == ["m13", "m2"]
    assert all(len(e.batch.records) == 1 for e, _ in fakes.rejected)
    assert all("status=400" in r and "externalUserId invalid" in r for _, r in fakes.rejected)
    # every other record was accepted, exactly once, with its own claim
    accepted = [m.external_user_id for b in fakes.acked_batches for m in b.records]
    assert sorted(accepted) == sorted(f"m{i}" for i in range(16) if i not in (2, 13))
    for part in fakes.accepted_parts:
        assert [c.external_user_id for c in part.claims] == member_ids(part.body)
    for refused, _ in fakes.rejected:
        assert [c.external_user_id for c in refused.claims] == member_ids(refused.body)
    # every POST had a reservation of its own: refused ones released, accepted ones confirmed
    posts = fakes.kinds().count("post")
    assert fakes.kinds().count("acquire") == posts
    assert list(settled(fakes).values()).count("confirm") == len(fakes.acked)
    assert len(settled(fakes)) == posts
    # halves first, each split again where refused
    assert [len(member_ids(body)) for body in fakes.bodies[:3]] == [16, 8, 8]
    # bounded: 2 refused records cost a few POSTs per level, not one per record
    assert posts <= 2 * 2 * 4 + 1
    assert blocked(s.connection_id, "bad_request") in (None, 0.0)


async def test_a_bisect_where_every_part_is_refused_becomes_a_setup_fault(
    sender: tuple[ConnectionSender, Fakes],
) -> None:
    """A bad audienceId: every POST is refused. The bisect stops after BISECT_LIMIT refused
    parts (not thousands of one-record POSTs), nothing is rejected, the connection is blocked
    until Amazon accepts again; then everything is delivered."""
    s, fakes = sender
    fakes.answer = refusing({f"m{i}" for i in range(64)})
    fakes.pause_gate = asyncio.Event()
    s.submit(encoded(s.connection_id, members=64))
    await until(lambda: blocked(s.connection_id, "bad_request") == 1, "blocked: bad_request")
    assert fakes.kinds().count("post") == BISECT_LIMIT
    assert fakes.rejected == []
    assert fakes.acked == []
    fakes.pause_gate.set()
    await until(lambda: len(fakes.pauses) >= 3, "a few probes")
    assert fakes.rejected == []  # probes refused again: still nothing dead-lettered
    assert fakes.pauses[:3] == [1.0, 2.0, 4.0]  # the probes back off
    fakes.answer = None  # the audience was fixed
    await drained(s)
    assert blocked(s.connection_id, "bad_request") == 0
    assert fakes.rejected == []
    accepted = [m.external_user_id for b in fakes.acked_batches for m in b.records]
    assert sorted(accepted) == sorted(f"m{i}" for i in range(64))


async def test_refusals_that_name_a_record_are_bisected_to_the_end_even_when_all_refuse(
    sender: tuple[ConnectionSender, Fakes],
) -> None:
    """Amazon's message names a record (`records[i]...`): the refusal is about the records, not
    the setup, however many refused parts there are. A batch whose every record is bad (16
    events with one bad consent IP each) is dead-lettered record by record; the connection,
    and the other audiences on it, go on."""
    s, fakes = sender

    async def each_refused(body: bytes) -> str:
        raise RejectedError(
            "records_post failed: HTTP 400: records[0].userConsent.geo.ipAddress must be an "
            "IPv4 or IPv6 address",
            status=400,
        )

    fakes.answer = each_refused
    s.submit(encoded(s.connection_id, members=2 * BISECT_LIMIT))
    await drained(s)
    assert sorted(member_ids(e.body)[0] for e, _ in fakes.rejected) == sorted(
        f"m{i}" for i in range(2 * BISECT_LIMIT)
    )
    assert blocked(s.connection_id, "bad_request") in (None, 0.0)


async def test_refusals_of_a_field_every_record_shares_still_make_a_setup_fault(
    sender: tuple[ConnectionSender, Fakes],
) -> None:
    """A field that may be wrong for every record alike (`countryCode`: the destination's
    default) is not the events' fault: the bisect stops at its limit, nothing dead-lettered."""
    s, fakes = sender

    async def each_refused(body: bytes) -> str:
        raise RejectedError(
            "records_post failed: HTTP 400: records[0].countryCode must be an ISO code",
            status=400,
        )

    fakes.answer = each_refused
    fakes.pause_gate = asyncio.Event()  # no probe yet
    s.submit(encoded(s.connection_id, members=64))
    await until(lambda: blocked(s.connection_id, "bad_request") == 1, "blocked: bad_request")
    assert fakes.kinds().count("post") == BISECT_LIMIT
    assert fakes.rejected == []
    fakes.answer = None
    fakes.pause_gate.set()
    await drained(s)


async def test_a_400_that_names_the_audience_blocks_a_small_batch_without_dead_letters(
    sender: tuple[ConnectionSender, Fakes],
) -> None:
    """Amazon says the request itself is wrong (its audienceId), not a record: a batch of 3,
    too small for the bisect's limit, is not dead-lettered record by record; the connection
    is blocked until Amazon accepts again, then everything is delivered."""
    s, fakes = sender

    async def bad_audience(body: bytes) -> str:
        raise RejectedError(
            "records_post failed: HTTP 400: audienceId 7 is not a valid audience", status=400
        )

    fakes.answer = bad_audience
    s.submit(encoded(s.connection_id, members=3))
    await until(lambda: blocked(s.connection_id, "bad_request") == 1, "blocked: bad_request")
    assert fakes.rejected == []
    fakes.answer = None  # the audience was fixed
    await drained(s)
    assert blocked(s.connection_id, "bad_request") == 0
    assert fakes.rejected == []
    accepted = [m.external_user_id for b in fakes.acked_batches for m in b.records]
    assert sorted(accepted) == ["m0", "m1", "m2"]


@pytest.mark.parametrize(
    ("status", "cause"), [(401, "unauthorized"), (403, "forbidden"), (404, "not_found")]
)
async def test_a_setup_fault_blocks_the_connection_holds_its_batches_and_resumes(
    sender: tuple[ConnectionSender, Fakes], status: int, cause: str
) -> None:
    s, fakes = sender
    refuse = True

    async def answer(body: bytes) -> str:
        if refuse:
            raise RejectedError(f"records_post failed: HTTP {status}: no", status=status)
        return f"job-{uuid.uuid4().hex[:8]}"

    fakes.answer = answer
    s.submit(encoded(s.connection_id))
    await until(lambda: blocked(s.connection_id, cause) == 1, f"blocked: {cause}")
    assert s.blocked == cause
    for _ in range(5):  # more batches while blocked: none of them is POSTed, only the probe
        s.submit(encoded(s.connection_id))
    await until(lambda: len(fakes.pauses) >= 6, "six probes")
    assert fakes.kinds().count("post") == len(fakes.pauses)  # one POST per probe, no more
    assert fakes.pauses[:6] == [1.0, 2.0, 4.0, 8.0, 8.0, 8.0]  # doubling, capped
    assert fakes.rejected == []  # not bad data: nothing dead-lettered ...
    assert fakes.acked == []  # ... nor acknowledged
    assert set(settled(fakes).values()) == {"release"}  # a refusal proves nothing was taken
    assert s.backlog == 6
    refuse = False
    await drained(s)
    assert len(fakes.acked) == 6
    assert fakes.rejected == []
    assert blocked(s.connection_id, cause) == 0
    assert s.blocked == ""


async def test_a_fault_found_without_a_post_blocks_at_once_and_the_checks_probe_until_clear(
    sender: tuple[ConnectionSender, Fakes],
) -> None:
    """`block` (syncd run's start-up checks): blocked before any POST; the prober runs the
    checks after each pause (doubling, capped) instead of POSTing; a check that finds another
    cause switches the metric; once the checks pass the connection opens and sends."""
    s, fakes = sender
    faults: list[tuple[str, AmazonError] | None] = [
        ("not_found", AmazonError("start-up check: audience gone", status=404)),
        ("not_found", AmazonError("start-up checks got no verdict")),
        ("forbidden", AmazonError("start-up check: AMC terms", status=403)),
        ("forbidden", AmazonError("start-up check: AMC terms", status=403)),
        None,
    ]
    seen: list[tuple[str, int]] = []  # at each check: the cause blocked for, POSTs so far

    async def check() -> tuple[str, AmazonError] | None:
        seen.append((s.blocked, fakes.kinds().count("post")))
        return faults.pop(0)

    fakes.pause_gate = asyncio.Event()
    probe = s.block("not_found", AmazonError("start-up check: audience gone", status=404), check)
    assert s.blocked == "not_found"  # at once, before the prober runs
    assert blocked(s.connection_id, "not_found") == 1
    s.submit(encoded(s.connection_id))  # waits: nothing is POSTed while blocked
    task = asyncio.create_task(probe())
    fakes.pause_gate.set()
    await asyncio.wait_for(task, DEADLINE_S)
    await drained(s)
    assert seen == [("not_found", 0)] * 3 + [("forbidden", 0)] * 2  # no POST while blocked
    assert fakes.pauses == [1.0, 2.0, 4.0, 8.0, 8.0]  # a pause before each check
    assert fakes.kinds().count("post") == 1  # sent once open, never as a probe
    assert len(fakes.acked) == 1
    assert s.blocked == ""
    assert blocked(s.connection_id, "not_found") == 0
    assert blocked(s.connection_id, "forbidden") == 0


# answer -> how its reservation is settled ("release", "confirm", or kept: None)
SETTLEMENTS: dict[str, tuple[Exception, str | None]] = {
    "429": (ThrottledError("HTTP 429", retry_after=1.0), "release"),
    "not-sent": (NotSentError("cannot connect"), "release"),
    "400": (RejectedError("HTTP 400", status=400), "release"),
    "403": (RejectedError("HTTP 403", status=403), "release"),
    "503": (RetryableError("HTTP 503", status=503), "confirm"),
    "500-after-processing": (RetryableError("HTTP 500", status=500), "confirm"),
    "501": (RejectedError("HTTP 501", status=501), "confirm"),
    "timeout": (RetryableError("no answer (outcome unknown)"), None),
    "token-503": (RetryableError("LwA HTTP 503", status=503, operation="token"), "release"),
    "token-timeout": (RetryableError("LwA: no answer", operation="token"), "release"),
    "no-jobRequestId": (AmazonError("unexpected response (no jobRequestId)"), None),
    "unexpected-exception": (ValueError("a bug in parsing"), None),
}


@pytest.mark.parametrize("answer", list(SETTLEMENTS))
async def test_each_answer_settles_its_reservation_by_what_it_proves(
    sender: tuple[ConnectionSender, Fakes], answer: str
) -> None:
    """Only an answer that proves nothing was accepted releases; one that may hide an accepted
    POST confirms (Amazon answered) or keeps it (no answer). The resend has its own."""
    s, fakes = sender
    error, settlement = SETTLEMENTS[answer]

    async def fail(_: object) -> str:
        raise error

    fakes.outcomes.append(fail)
    s.submit(encoded(s.connection_id, members=1))
    await drained(s)
    expected = {} if settlement is None else {1: settlement}
    if answer == "400":
        assert len(fakes.rejected) == 1  # a single record refused: dead-lettered
        assert settled(fakes) == expected
        return
    assert settled(fakes) == {**expected, 2: "confirm"}  # the resend, accepted
    assert len(fakes.acked) == 1


async def test_a_long_retry_after_pauses_the_whole_connection_until_it_is_over(
    sender: tuple[ConnectionSender, Fakes],
) -> None:
    s, fakes = sender
    release = fakes.pause_gate = asyncio.Event()  # the pause stays open while the test looks

    async def throttled(_: object) -> str:
        raise ThrottledError("HTTP 429", retry_after=900.0)

    fakes.outcomes.append(throttled)
    s.submit(encoded(s.connection_id))
    await until(lambda: fakes.pauses == [900.0], "the Retry-After waited out")
    assert blocked(s.connection_id, "throttled") == 1
    s.submit(encoded(s.connection_id))
    await settle()
    assert fakes.kinds().count("post") == 1  # nothing is POSTed while the connection waits
    release.set()
    await drained(s)
    assert len(fakes.acked) == 2
    assert blocked(s.connection_id, "throttled") == 0
    assert settled(fakes)[1] == "release"


async def test_failing_posts_back_off_and_are_reported_after_failing_after_s(
    sender: tuple[ConnectionSender, Fakes],
) -> None:
    s, fakes = sender
    failing = True

    async def answer(body: bytes) -> str:
        if failing:
            raise RetryableError("records_post failed: HTTP 503", status=503)
        return f"job-{uuid.uuid4().hex[:8]}"

    fakes.answer = answer
    s.submit(encoded(s.connection_id))
    # resent after 1, 2, 4, 8, 8 ... s; after 30 s of failing the connection is reported
    await until(lambda: blocked(s.connection_id, "failing") == 1, "blocked: failing")
    assert fakes.pauses[:5] == [1.0, 2.0, 4.0, 8.0, 8.0]
    assert sum(fakes.pauses[:-1]) >= 30.0
    assert fakes.rejected == []
    assert fakes.acked == []
    failing = False
    await drained(s)
    assert len(fakes.acked) == 1
    assert blocked(s.connection_id, "failing") == 0
    # every failed POST may have been accepted: each kept its own reservation, confirmed
    assert set(settled(fakes).values()) == {"confirm"}
    assert len(settled(fakes)) == fakes.kinds().count("post")


@settings(max_examples=40)
@given(
    answers=st.lists(
        st.sampled_from(
            [
                *(e for e, _ in SETTLEMENTS.values()),
                RejectedError("HTTP 404", status=404),
                RejectedError("HTTP 401", status=401),
                KeyError("x"),
                RuntimeError("boom"),
            ]
        ),
        max_size=12,
    ),
    members=st.integers(1, 9),
)
async def test_no_answer_stops_the_sender_and_every_record_ends_accepted_or_rejected(
    answers: list[Exception], members: int
) -> None:
    fakes = Fakes()
    s = make_sender(fakes, max_concurrency=2)
    task = asyncio.create_task(s.run())
    try:
        for error in answers:

            async def fail(_: object, error: Exception = error) -> str:
                raise error

            fakes.outcomes.append(fail)
        s.submit(encoded(s.connection_id, members=members))
        s.submit(encoded(s.connection_id, members=members))
        await drained(s)
        assert not task.done()
        ended = [m for b in fakes.acked_batches for m in b.records]
        ended += [m for e, _ in fakes.rejected for m in e.batch.records]
        assert sorted(m.external_user_id for m in ended) == sorted(
            f"m{i}" for i in range(members) for _ in range(2)
        )
        assert s.blocked == ""
    finally:
        await cancel_and_wait(task)


async def test_the_block_log_writes_each_connections_newest_state_and_retries_after_errors() -> (
    None
):
    """BlockLog (a sender's on_block) keeps the store's record of blocked connections: the newest
    state of each connection is written once; a store error is retried, not lost."""
    written: list[tuple[str, str]] = []
    failures = [RuntimeError("store down")]
    wrote = asyncio.Event()

    class Store:
        async def set_blocked(self, connection_id: str, cause: str) -> None:
            if failures:
                raise failures.pop()
            written.append((connection_id, cause))
            wrote.set()

    async def until_written(n: int) -> None:
        while len(written) < n:
            wrote.clear()
            await wrote.wait()

    blocks = BlockLog(Store(), retry_s=0)
    task = asyncio.create_task(blocks.run())
    try:
        blocks("c1", "")
        blocks("c1", "forbidden")  # before the first write: only the newest is written
        blocks("c2", "not_found")
        await asyncio.wait_for(until_written(2), 5)
        assert sorted(written) == [("c1", "forbidden"), ("c2", "not_found")]
        blocks("c2", "not_found")  # unchanged: not written again
        blocks("c2", "")
        await asyncio.wait_for(until_written(3), 5)
        assert written[2:] == [("c2", "")]
    finally:
        await cancel_and_wait(task)
