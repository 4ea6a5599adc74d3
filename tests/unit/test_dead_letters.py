"""The Pipeline's dead letters, with a fake source: an event is acknowledged only once the broker
acknowledged its dead letter (a failed send is retried, a cancelled one stays unacknowledged so
the event is read again), and rejecting records Amazon refused never raises."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import cast

import orjson
import pytest

from syncd.app import Pipeline
from syncd.batching import EncodedBatch
from syncd.budget import Budget
from syncd.config import Config
from syncd.deliver import ConnectionSender
from syncd.model import Action, Batch, Destination, Member, SourceRef
from syncd.source import KafkaSource, Message, OffsetTracker
from syncd.transform import Transformer

DEADLINE_S = 5.0
DEST = Destination("vip", "conn-1", 413642381039213536, "US")


@dataclass
class FakeSource:
    """Dead-letter sends that fail `failures` times, then are held until `broker_acks` is set."""

    failures: int = 0
    broker_acks: asyncio.Event = field(default_factory=asyncio.Event)
    sent: list[tuple[bytes | None, str, SourceRef]] = field(default_factory=list)
    attempts: int = 0

    @property
    def assigned(self) -> set[tuple[str, int]]:
        return {("t", 0)}

    async def dead_letter(self, message: Message, reason: str) -> None:
        await self._send(message.value, reason, message.ref)

    async def dead_letter_payload(
        self, payload: bytes, reason: str, ref: SourceRef, *, detail: str = ""
    ) -> None:
        await self._send(payload, reason, ref)

    async def _send(self, value: bytes | None, reason: str, ref: SourceRef) -> None:
        self.attempts += 1
        if self.failures:
            self.failures -= 1
            raise ConnectionError("broker unreachable")
        await self.broker_acks.wait()
        self.sent.append((value, reason, ref))


def pipeline(source: FakeSource, tracker: OffsetTracker) -> Pipeline:
    cfg = Config(destinations=(DEST,))
    return Pipeline(
        cfg,
        cast(KafkaSource, source),
        tracker,
        cast(dict[str, ConnectionSender], {}),
        cast(Budget, None),
        cast(Transformer, None),
    )


async def until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for: {what}")
        await asyncio.sleep(0.001)


def refused_batch(members: int, body: bytes | None = None) -> tuple[EncodedBatch, list[SourceRef]]:
    refs = [SourceRef("t", 0, i) for i in range(members)]
    records = [Member(f"p{i}", Action.ADD) for i in range(members)]
    encoded = [orjson.dumps({"externalUserId": m.external_user_id}) for m in records]
    if body is None:
        body = b'{"records":[' + b",".join(encoded) + b"]}"
    batch = Batch(DEST, records, [[r] for r in refs], len(body))
    return EncodedBatch(batch, body, encoded), refs


async def test_an_event_is_acknowledged_only_after_the_broker_acknowledged_its_dead_letter() -> (
    None
):
    source, tracker = FakeSource(failures=2), OffsetTracker()
    p = pipeline(source, tracker)
    message = Message(SourceRef("t", 0, 0), b"not json", 0)
    p._dead_letter(message, "invalid_json")  # the path of an unusable event
    await until(lambda: source.attempts == 3, "two failed sends retried")
    assert tracker.pending() == 1  # failed twice, the third still waits for the broker
    assert tracker.committable().get(("t", 0), 0) == 0  # nothing past offset 0
    source.broker_acks.set()
    await asyncio.wait_for(p.dead_letters_sent(), DEADLINE_S)
    assert tracker.pending() == 0
    assert tracker.committable() == {("t", 0): 1}
    assert [reason for _, reason, _ in source.sent] == ["invalid_json"]


async def test_a_cancelled_dead_letter_leaves_its_event_unacknowledged() -> None:
    """The drain budget runs out at shutdown: the send is cancelled, nothing is committed."""
    source, tracker = FakeSource(), OffsetTracker()
    p = pipeline(source, tracker)
    p._dead_letter(Message(SourceRef("t", 0, 0), b"x", 0), "invalid_json")
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(p.dead_letters_sent(), 0.05)  # as Daemon._drain does
    await until(lambda: not p._dead_letters, "the send cancelled")
    assert tracker.pending() == 1
    assert tracker.committable().get(("t", 0), 0) == 0  # nothing past offset 0
    assert source.sent == []


async def test_refused_records_are_dead_lettered_then_acknowledged_one_by_one() -> None:
    source, tracker = FakeSource(failures=1), OffsetTracker()
    p = pipeline(source, tracker)
    encoded, refs = refused_batch(3)
    for ref in refs:
        tracker.track(ref, 1)
    p._guard.register(encoded.batch)  # as flush() does before sending
    p.reject(encoded, "amazon_rejected status=400: records[0].externalUserId invalid")
    await until(lambda: source.attempts == 4, "one failed send retried")
    assert tracker.pending() == 3  # no broker ack yet
    source.broker_acks.set()
    await asyncio.wait_for(p.dead_letters_sent(), DEADLINE_S)
    assert tracker.pending() == 0
    assert sorted(ref.offset for _, _, ref in source.sent) == [0, 1, 2]
    payloads = sorted(orjson.loads(v or b"")["externalUserId"] for v, _, _ in source.sent)
    assert payloads == ["p0", "p1", "p2"]


@pytest.mark.parametrize("body", [b'{"records": [{"externalUserId": "p0\n"}', b"[]", b"{}"])
async def test_rejecting_a_body_that_cannot_be_read_back_never_raises(body: bytes) -> None:
    """The crash loop of the issue: a refused body the reject path could not parse again."""
    source, tracker = FakeSource(), OffsetTracker()
    source.broker_acks.set()
    p = pipeline(source, tracker)
    encoded, refs = refused_batch(2, body)
    for ref in refs:
        tracker.track(ref, 1)
    p._guard.register(encoded.batch)
    p.reject(encoded, "amazon_rejected status=400: body is not valid JSON")
    await asyncio.wait_for(p.dead_letters_sent(), DEADLINE_S)
    assert tracker.pending() == 0
    assert sorted(orjson.loads(v or b"")["externalUserId"] for v, _, _ in source.sent) == [
        "p0",
        "p1",
    ]
