"""MemberFeed and ConnectionSender on a real member table (SQLite) with a fake Amazon, budget and
dead-letter sink: due members are claimed, sent and stored with their job; a refused record is a
member dead letter and invalid until it changes; a blocked connection keeps its claims (renewed)
and loses nothing; a small claim lingers for more and goes out at shutdown. Ingest (Pipeline):
a chunk's changes and erases are recorded in order before its events are done."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast

import orjson
import pytest
import structlog
from sqlalchemy.exc import OperationalError

from syncd.app import MAX_CHUNKS, Pipeline
from syncd.config import Config
from syncd.deliver import ConnectionSender, MemberFeed, cancel_and_wait
from syncd.errors import RejectedError
from syncd.members import Claim, MemberTable, member_change
from syncd.model import Action, Destination, Erase, SourceRef, member_record
from syncd.observability import metrics
from syncd.observability.metrics import REGISTRY
from syncd.routing import RouteCounts
from syncd.source import KafkaSource, Message, OffsetTracker
from syncd.store import NewJob
from syncd.transform import Outcome
from syncd.transform_pool import Transformer
from tests.fakes import until

DEADLINE_S = 10.0
DEST = Destination("vip", "conn-1", 413642381039213536, "US")
HEX = "b" * 64


def record(euid: str, email: str = HEX, action: Action = Action.ADD) -> bytes:
    return member_record(euid, "US", action, [{"email": email}]).json


async def add_members(table: MemberTable, *ids: str, at: float = 1.0, email: str = HEX) -> None:
    await table.record_changes(
        [
            member_change(
                DEST.audience_id,
                member_record(euid, "US", Action.ADD, [{"email": email}]),
                occurred_at=at,
                position=i,
            )
            for i, euid in enumerate(ids)
        ]
    )


@dataclass
class Amazon:
    """Accepts every body unless `refuse(body)` names a status; records what it accepted."""

    refuse: Callable[[list[str]], int | None] = lambda ids: None
    accepted: list[list[str]] = field(default_factory=list)
    posts: int = 0
    job_id: str = ""  # the jobRequestId of every 202 ("": a new one each time)

    async def post_records(
        self,
        body: bytes,
        *,
        connection_id: str,
        on_throttle: Callable[[float | None], None] | None = None,
    ) -> str:
        self.posts += 1
        ids = [r["externalUserId"] for r in orjson.loads(body)["records"]]
        status = self.refuse(ids)
        if status is not None:
            raise RejectedError(
                f"records_post failed: HTTP {status}: invalid email hash", status=status
            )
        self.accepted.append(ids)
        return self.job_id or f"job-{uuid.uuid4().hex[:8]}"

    # budget: always room
    async def acquire(self, connection_id: str, records: int) -> int:
        return 1

    async def release(self, reservation_id: int) -> None:
        return None

    async def confirm(self, reservation_id: int) -> None:
        return None


@dataclass
class DeadLetters:
    sent: list[tuple[dict[str, object], str, str]] = field(default_factory=list)

    async def dead_letter_member(self, value: bytes, reason: str, detail: str) -> None:
        self.sent.append((orjson.loads(value), reason, detail))


@pytest.fixture
def clock() -> None:
    """The shared `table`'s store keeps the database's own clock here: feeds run in real time."""
    return


@dataclass
class Running:
    feed: MemberFeed
    sender: ConnectionSender
    stop: asyncio.Event
    tasks: list[asyncio.Task[None]]

    async def shutdown(self) -> None:
        self.stop.set()
        await asyncio.wait_for(self.feed.stopped_claiming(), DEADLINE_S)
        await asyncio.wait_for(self.sender.drained(), DEADLINE_S)
        for task in self.tasks:
            await cancel_and_wait(task)
        await self.feed.release_held()


def start(
    table: MemberTable,
    amazon: Amazon,
    dead: DeadLetters,
    *,
    linger_s: float = 0.0,
    max_records: int = 100,
    lease_s: float = 30.0,
) -> Running:
    feed = MemberFeed(
        DEST.connection_id,
        [DEST],
        members=table,
        dead_letters=dead,
        owner="me",
        lease_s=lease_s,
        max_records=max_records,
        max_bytes=1_000_000,
        linger_s=linger_s,
        first_poll_after_s=30.0,
        idle_s=0.02,
    )
    sender = ConnectionSender(
        DEST.connection_id,
        poster=amazon,
        budget=amazon,
        outcomes=feed,
        max_concurrency=2,
        pause_s=0.01,
        max_pause_s=0.02,
    )
    stop = asyncio.Event()
    tasks = [asyncio.create_task(sender.run()), asyncio.create_task(feed.run(sender, stop))]
    return Running(feed, sender, stop, tasks)


async def job_of(table: MemberTable, euid: str) -> str | None:
    state = await table.member(DEST.audience_id, euid)
    assert state is not None
    return state.job_request_id


async def test_due_members_are_claimed_sent_and_stored_with_their_job(table: MemberTable) -> None:
    amazon, dead = Amazon(), DeadLetters()
    await add_members(table, "u1", "u2", "u3")
    running = start(table, amazon, dead)
    await until(lambda: running.feed.held == 0 and amazon.accepted != [], "the POST stored")
    await running.shutdown()
    assert sorted(amazon.accepted[0]) == ["u1", "u2", "u3"]
    jobs = {await job_of(table, u) for u in ("u1", "u2", "u3")}
    assert len(jobs) == 1
    assert None not in jobs
    [job] = await table._store.list_jobs()
    assert (job.job_request_id, job.records, job.adds) == (jobs.pop(), 3, 3)
    assert await table.waiting([DEST.audience_id]) == 0


async def test_a_refused_record_is_a_member_dead_letter_and_invalid_until_it_changes(
    table: MemberTable, monkeypatch: pytest.MonkeyPatch
) -> None:
    amazon = Amazon(refuse=lambda ids: 400 if "u2" in ids else None)
    dead = DeadLetters()
    refused: list[str] = []  # stored as refused (the feed lets go of its claims just before)
    refuse = table.refuse

    async def refuse_and_note(claims: list[Claim], reason: str) -> list[Claim]:
        lost = await refuse(claims, reason)
        refused.extend(c.external_user_id for c in claims)
        return lost

    monkeypatch.setattr(table, "refuse", refuse_and_note)
    await add_members(table, "u1", "u2", "u3", "u4")
    running = start(table, amazon, dead)
    await until(lambda: refused == ["u2"] and len(dead.sent) == 1, "u2 refused alone")
    [(value, reason, detail)] = dead.sent
    assert value == {
        "audience": "vip",
        "audience_id": DEST.audience_id,
        "externalUserId": "u2",
        "action": "CREATE",
        "record": orjson.loads(record("u2")),
    }
    assert reason == "invalid_pii"  # the bounded class of Amazon's message
    assert "invalid email hash" in detail
    state = await table.member(DEST.audience_id, "u2")
    assert state is not None
    assert (state.outcome, state.reason, state.due_since) == ("invalid", "invalid_pii", None)
    assert sorted(u for ids in amazon.accepted for u in ids) == ["u1", "u3", "u4"]
    # the same change is not sent again; a changed one is
    await add_members(table, "u2", at=2.0)
    await add_members(table, "u2", at=3.0, email="c" * 64)
    amazon.refuse = lambda ids: None
    running.feed.wake()
    await until(lambda: ["u2"] in amazon.accepted, "the changed u2 sent")
    await running.shutdown()
    assert len(dead.sent) == 1


async def test_a_202_naming_a_finished_job_dead_letters_its_members_instead_of_resending(
    table: MemberTable,
) -> None:
    """Amazon answers 202 with the jobRequestId of a job that is over (a reused id): that POST's
    outcome can never be read. Its members are dead-lettered and marked invalid (sent again
    only once they change), as a refused record is: not resent in a loop that Amazon answering
    so for good would turn into a connection's whole budget."""
    store = table._store
    await store.add_job(
        NewJob("job-reused", DEST.connection_id, DEST.audience_id, "vip", 1, 1, 0),
        first_poll_after_s=0,
    )
    assert await store.expire_jobs(max_age_s=-1) == 1  # the job is over
    amazon, dead = Amazon(job_id="job-reused"), DeadLetters()
    await add_members(table, "u1", "u2")
    running = start(table, amazon, dead)
    await until(lambda: len(dead.sent) == 2, "both members dead-lettered")
    await running.shutdown()
    assert amazon.posts == 1
    assert {(v["externalUserId"], reason) for v, reason, _ in dead.sent} == {
        ("u1", "other"),
        ("u2", "other"),
    }
    assert all(
        "job-reused" in detail and "another POST's job" in detail for _, _, detail in dead.sent
    )
    for euid in ("u1", "u2"):
        state = await table.member(DEST.audience_id, euid)
        assert state is not None
        assert (state.outcome, state.due_since, state.job_request_id) == ("invalid", None, None)
    [job] = await store.list_jobs()
    assert (job.job_request_id, job.state, job.records) == ("job-reused", "EXPIRED", 1)


async def test_a_renewal_racing_a_stored_job_takes_no_claim_for_lost(
    table: MemberTable, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A renewal that runs once a job and its members' sent state are stored, before the feed
    heard back, does not take those claims (their token is cleared) for lost ones."""
    stored, resume = asyncio.Event(), asyncio.Event()
    store_job = table.store_job

    async def store_then_wait(*args: Any, **kwargs: Any) -> list[Claim]:
        lost = await store_job(*args, **kwargs)
        stored.set()
        await resume.wait()
        return lost

    monkeypatch.setattr(table, "store_job", store_then_wait)
    amazon, dead = Amazon(), DeadLetters()
    await add_members(table, "u1", "u2")
    running = start(table, amazon, dead)
    await asyncio.wait_for(stored.wait(), DEADLINE_S)
    with structlog.testing.capture_logs() as logs:
        await running.feed.renew_held()
    resume.set()
    await until(lambda: running.feed.held == 0, "the job settled")
    await running.shutdown()
    assert [e["event"] for e in logs if "lost" in e["event"]] == []
    assert {await job_of(table, u) for u in ("u1", "u2")} != {None}


async def test_a_job_row_waiting_for_the_store_keeps_its_members_from_being_claimed_again(
    table: MemberTable, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A store outage longer than the claim lease, just after a 202: the store comes back to
    claims before the job row's retry lands. The feed claims nothing while a job row of its
    waits, so the members Amazon accepted are not POSTed a second time."""
    outage, failures, stored = True, 0, 0
    store_job = table.store_job

    async def store_job_after_outage(*args: Any, **kwargs: Any) -> list[Claim]:
        nonlocal failures, stored
        if outage:
            failures += 1
            raise OperationalError(
                "INSERT INTO jobs", {}, Exception("server closed the connection")
            )
        lost = await store_job(*args, **kwargs)
        stored += 1
        return lost

    monkeypatch.setattr(table, "store_job", store_job_after_outage)
    amazon, dead = Amazon(), DeadLetters()
    await add_members(table, "u1", "u2")
    running = start(table, amazon, dead, lease_s=0.2)
    await until(lambda: failures >= 2, "the job row retried past the claims' lease")
    outage = False
    await until(lambda: stored >= 1 and running.feed.held == 0, "the job row stored")
    await running.shutdown()
    assert sorted(u for ids in amazon.accepted for u in ids) == ["u1", "u2"]


async def test_a_blocked_connection_keeps_its_claims_renewed_and_loses_nothing(
    table: MemberTable,
) -> None:
    blocked = True
    amazon = Amazon(refuse=lambda ids: 403 if blocked else None)
    dead = DeadLetters()
    await add_members(table, *(f"u{i}" for i in range(5)))
    running = start(table, amazon, dead, lease_s=0.3)
    await until(lambda: amazon.posts >= 10, "probes while blocked, past several leases")
    assert running.sender.blocked == "forbidden"
    # still held by this sender: no other replica can claim them meanwhile
    assert await table.claim_due([DEST.audience_id], 10, 30.0, "other") == []
    assert dead.sent == []
    blocked = False
    await until(lambda: running.feed.held == 0 and amazon.accepted != [], "sent once unblocked")
    await running.shutdown()
    assert sorted(u for ids in amazon.accepted for u in ids) == [f"u{i}" for i in range(5)]
    assert None not in {await job_of(table, f"u{i}") for i in range(5)}


async def test_a_small_claim_lingers_for_more_and_goes_out_at_shutdown(
    table: MemberTable,
) -> None:
    amazon, dead = Amazon(), DeadLetters()
    await add_members(table, "a1", "a2", "a3")
    running = start(table, amazon, dead, linger_s=3600.0, max_records=5)
    await until(lambda: running.feed.held == 3, "three claimed")
    await add_members(table, "b1", "b2")  # fills the batch: sent at once
    running.feed.wake()
    await until(lambda: amazon.accepted != [], "the full batch sent")
    assert sorted(amazon.accepted[0]) == ["a1", "a2", "a3", "b1", "b2"]
    await add_members(table, "c1")
    running.feed.wake()
    await until(lambda: running.feed.held == 1, "c1 claimed, lingering")
    assert len(amazon.accepted) == 1
    await running.shutdown()  # shutdown does not linger
    assert amazon.accepted[1:] == [["c1"]]


async def test_changes_waiting_is_counted_from_the_start_not_a_renewal_later(
    table: MemberTable,
) -> None:
    """`syncd_member_changes_waiting` was first set a third of the claim lease after the start
    (10 s): until then it read 0 with a backlog waiting."""
    labels = {"connection": DEST.connection_id}
    metrics.MEMBER_CHANGES_WAITING.labels(DEST.connection_id).set(0)
    await add_members(table, "a1", "a2", "a3")
    running = start(table, Amazon(), DeadLetters(), linger_s=3600.0, lease_s=3600.0)
    await until(lambda: running.feed.held == 3, "three claimed, lingering")
    waiting = "syncd_member_changes_waiting"
    await until(lambda: REGISTRY.get_sample_value(waiting, labels) == 3, "the three waiting")
    await running.shutdown()


# -- ingest --------------------------------------------------------------------------------------


@dataclass
class FakeSource:
    assigned: set[tuple[str, int]] = field(default_factory=lambda: {("t", 0)})


def pipeline_of(
    table: MemberTable,
    source: object,
    tracker: OffsetTracker,
    *,
    transformer: object = None,
    wake: Callable[[str], None] = lambda connection_id: None,
) -> Pipeline:
    """A Pipeline of DEST over `table`, with fakes for the source and (unused: None) the
    transform."""
    return Pipeline(
        Config(destinations=(DEST,)),
        cast(KafkaSource, source),
        tracker,
        table,
        cast(Transformer, transformer),
        wake=wake,
    )


async def test_ingest_records_changes_and_erases_in_order_then_marks_events_done(
    table: MemberTable,
) -> None:
    tracker = OffsetTracker()
    woken: list[str] = []
    pipeline = pipeline_of(table, FakeSource(), tracker, wake=woken.append)

    def msg(offset: int) -> Message:
        return Message(SourceRef("t", 0, offset), b"{}", timestamp_ms=1_000_000 + offset * 1000)

    def routed(euid: str, action: Action = Action.ADD) -> Outcome:
        return [(0, member_record(euid, "US", action, [{"email": HEX}]))]

    chunk: list[tuple[Message, Outcome]] = [
        (msg(0), routed("u1")),
        (msg(1), routed("u2")),
        (msg(2), Erase("u1", None)),  # after u1's add: u1 ends as a DELETE ...
        (msg(3), routed("u2", Action.REMOVE)),  # ... and u2's later remove still applies
        (msg(4), []),  # routed nowhere: done at once
    ]
    await pipeline._record(chunk)
    assert tracker.pending() == 0
    assert tracker.committable() == {("t", 0): 5}
    assert woken == [DEST.connection_id]
    u1 = await table.member(DEST.audience_id, "u1")
    u2 = await table.member(DEST.audience_id, "u2")
    assert u1 is not None
    assert u2 is not None
    assert (u1.action, u2.action) == ("remove", "remove")
    assert await table.tombstone(DEST.audience_id, "u1") == 1002.0  # its message's timestamp
    # an add older than the erase (a late event) does not bring u1 back
    await pipeline._record([(Message(SourceRef("t", 0, 5), b"{}", 1_000_500), routed("u1"))])
    u1 = await table.member(DEST.audience_id, "u1")
    assert u1 is not None
    assert u1.action == "remove"


@dataclass
class DeadLetteringSource(FakeSource):
    dead: list[tuple[int, str, str]] = field(default_factory=list)

    async def dead_letter(self, message: Message, reason: str, detail: str = "") -> None:
        self.dead.append((message.ref.offset, reason, detail))


async def test_a_message_timestamp_in_the_future_standing_in_is_dead_lettered(
    table: MemberTable,
) -> None:
    """An event without occurred_at takes its Kafka message's timestamp, which its producer sets
    (CreateTime): one from a clock a year ahead would outrank every later change of the member,
    as an occurred_at that far ahead would, so it is dead-lettered as the decoder does such an
    occurred_at (bad_occurred_at); an event with its own occurred_at keeps it."""
    source, tracker = DeadLetteringSource(), OffsetTracker()
    pipeline = pipeline_of(table, source, tracker)
    now = time.time()
    year_ahead_ms = int((now + 365 * 86400) * 1000)
    untimed = member_record("u1", "US", Action.ADD, [{"email": HEX}])
    timed = member_record("u2", "US", Action.ADD, [{"email": HEX}], occurred_at=now)
    await pipeline._record(
        [
            (Message(SourceRef("t", 0, 0), b"{}", year_ahead_ms), [(0, untimed)]),
            (Message(SourceRef("t", 0, 1), b"{}", year_ahead_ms), Erase("u3", None)),
            (Message(SourceRef("t", 0, 2), b"{}", year_ahead_ms), [(0, timed)]),
        ]
    )
    await pipeline.dead_letters_sent()
    assert [(o, r) for o, r, _ in source.dead] == [(0, "bad_occurred_at"), (1, "bad_occurred_at")]
    assert tracker.committable() == {("t", 0): 3}
    assert await table.member(DEST.audience_id, "u1") is None
    assert await table.tombstone(DEST.audience_id, "u3") is None
    u2 = await table.member(DEST.audience_id, "u2")
    assert u2 is not None
    assert u2.occurred_at == now


async def test_a_message_without_a_timestamp_counts_as_older_than_any_change(
    table: MemberTable,
) -> None:
    """A record of message format v0 (written before Kafka 0.10, kept by a compacted topic)
    has no timestamp (aiokafka: None; a converted one: -1). An event of it without occurred_at
    is recorded (it stopped syncd with a TypeError, again at every restart) as older than any
    change: the same on every read, so a replay outranks nothing recorded since."""
    tracker = OffsetTracker()
    pipeline = pipeline_of(table, FakeSource(), tracker)
    untimed = cast(int, None)  # ConsumerRecord.timestamp is `int | None`
    add = member_record("u1", "US", Action.ADD, [{"email": HEX}])
    await pipeline._record([(Message(SourceRef("t", 0, 0), b"{}", untimed), [(0, add)])])
    await pipeline._record([(Message(SourceRef("t", 0, 1), b"{}", -1), Erase("u2", None))])
    assert tracker.committable() == {("t", 0): 2}
    u1 = await table.member(DEST.audience_id, "u1")
    assert u1 is not None
    assert (u1.action, u1.occurred_at) == ("add", 0.0)
    assert await table.tombstone(DEST.audience_id, "u2") == 0.0
    # a later remove applies; the untimed add read again (a replay) changes nothing
    remove = member_record("u1", "US", Action.REMOVE, [{"email": HEX}], occurred_at=1.0)
    await pipeline._record([(Message(SourceRef("t", 0, 2), b"{}", 1000), [(0, remove)])])
    await pipeline._record([(Message(SourceRef("t", 0, 0), b"{}", untimed), [(0, add)])])
    u1 = await table.member(DEST.audience_id, "u1")
    assert u1 is not None
    assert u1.action == "remove"


async def test_ingest_wakes_the_senders_only_for_changes_that_leave_work(
    table: MemberTable,
) -> None:
    """A replay (the same events again: nothing newer) leaves nothing to claim: the senders are
    not woken for it (each wake is a claim query)."""
    woken: list[str] = []
    pipeline = pipeline_of(table, FakeSource(), OffsetTracker(), wake=woken.append)
    chunk: list[tuple[Message, Outcome]] = [
        (
            Message(SourceRef("t", 0, offset), b"{}", timestamp_ms=1_000_000),
            [(0, member_record(euid, "US", Action.ADD, [{"email": HEX}]))],
        )
        for offset, euid in enumerate(("u1", "u2"))
    ]
    await pipeline._record(chunk)
    assert woken == [DEST.connection_id]
    await pipeline._record(chunk)  # replayed
    assert woken == [DEST.connection_id]


async def test_ingest_holds_at_most_max_chunks_fetched_and_not_recorded(table: MemberTable) -> None:
    """A chunk holds its messages and, once transformed, its records until it is recorded: a
    slow store must stop reading at MAX_CHUNKS chunks (it let two more be fetched and
    transformed: one taken for recording, one waiting to be queued)."""
    fetched: list[int] = []
    store_free = asyncio.Event()

    class EndlessSource(FakeSource):
        paused = False

        async def fetch(self, *, timeout_ms: int, max_records: int) -> list[Message]:
            offset = len(fetched)
            fetched.append(offset)
            return [Message(SourceRef("t", 0, offset), b"{}", timestamp_ms=1_000_000)]

    class Inline:
        def submit(self, values: list[bytes | None]) -> asyncio.Future[Any]:
            done = asyncio.get_running_loop().create_future()
            done.set_result(([[] for _ in values], RouteCounts()))
            return done

    pipeline = pipeline_of(table, EndlessSource(), OffsetTracker(), transformer=Inline())

    async def slow_record(chunk: list[tuple[Message, Outcome]]) -> None:
        await store_free.wait()

    pipeline._record = slow_record  # type: ignore[method-assign]
    stop = asyncio.Event()
    consuming = asyncio.create_task(pipeline.consume(stop))
    await until(lambda: len(fetched) >= MAX_CHUNKS, "the first chunks fetched")
    for _ in range(50):  # every task runs on: a fetch loop not held back would fetch more
        await asyncio.sleep(0)
    assert len(fetched) == MAX_CHUNKS
    stop.set()
    store_free.set()
    await asyncio.wait_for(consuming, DEADLINE_S)
