"""The Pipeline's dead letters of events, with a fake source: an event is done only once the
broker acknowledged its dead letter (a failed send is retried, a cancelled one stays not done so
the event is read again). Member dead letters: tests/unit/test_feed.py."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import cast

import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.errors import NotLeaderForPartitionError, UnknownTopicOrPartitionError

from syncd.app import Pipeline
from syncd.config import Config, KafkaConfig
from syncd.members import MemberTable
from syncd.model import Destination, SourceRef
from syncd.source import DeadLetterProducer, KafkaSource, Message, OffsetTracker, dead_letters
from syncd.transform import Refused
from syncd.transform_pool import Transformer
from tests.fakes import until

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

    async def dead_letter(self, message: Message, reason: str, detail: str = "") -> None:
        await self._send(message.value, reason, message.ref)

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
        cast(MemberTable, None),
        cast(Transformer, None),
    )


async def test_an_event_is_acknowledged_only_after_the_broker_acknowledged_its_dead_letter() -> (
    None
):
    source, tracker = FakeSource(failures=2), OffsetTracker()
    p = pipeline(source, tracker)
    message = Message(SourceRef("t", 0, 0), b"not json", 0)
    p._dead_letter(message, Refused("invalid_json"))  # the path of an unusable event
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
    p._dead_letter(Message(SourceRef("t", 0, 0), b"x", 0), Refused("invalid_json"))
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(p.dead_letters_sent(), 0.05)  # as Daemon._drain does
    await until(lambda: not p._dead_letters, "the send cancelled")
    assert tracker.pending() == 1
    assert tracker.committable().get(("t", 0), 0) == 0  # nothing past offset 0
    assert source.sent == []


class MissingTopicProducer:
    """A cluster that does not create topics on first use, until `created` is set."""

    def __init__(self) -> None:
        self.created = False
        self.attempts = 0

    async def send_and_wait(self, topic: str, value: bytes | None, **_: object) -> None:
        self.attempts += 1
        if not self.created:
            raise UnknownTopicOrPartitionError()


async def test_a_dead_letter_topic_that_takes_nothing_makes_syncd_unready_until_it_does(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A missing dead-letter topic (a cluster without auto-create) holds the commits of the
    events waiting on it, rightly: it must not look healthy meanwhile. Once sends have failed
    for DLQ_UNREADY_AFTER_S, `dead_letters_flowing` is false (so /readyz's `kafka`)."""
    monkeypatch.setattr(dead_letters, "DLQ_RETRY_BACKOFF_S", (0.01,))
    monkeypatch.setattr(dead_letters, "DLQ_UNREADY_AFTER_S", 0.05)
    producer = DeadLetterProducer(KafkaConfig(dead_letter_topic="syncd-dead-letters"))
    fake = MissingTopicProducer()
    producer._producer = cast(AIOKafkaProducer, fake)
    assert producer.flowing
    send = asyncio.create_task(producer.member(b"{}", "invalid_pii", ""))
    start = time.monotonic()
    await until(lambda: time.monotonic() - start > 0.1 and fake.attempts > 2, "sends failing")
    assert not producer.flowing
    fake.created = True
    await asyncio.wait_for(send, DEADLINE_S)
    assert producer.flowing


class OnePartitionDownProducer:
    """The dead-letter topic's partition of key b"stuck" has no leader until `healed` is set;
    the others take every send."""

    def __init__(self) -> None:
        self.healed = False
        self.stuck_attempts = 0

    async def send_and_wait(self, topic: str, value: bytes | None, **kw: object) -> None:
        if kw.get("key") == b"stuck" and not self.healed:
            self.stuck_attempts += 1
            raise NotLeaderForPartitionError()


async def test_a_dead_letter_stuck_while_others_go_through_makes_syncd_unready(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A send acknowledged elsewhere said the topic flowed again, though one dead letter (its
    partition without a leader) kept failing and held its partition's commits: /readyz stayed
    green for as long as other dead letters went through. Now any send failing for
    DLQ_UNREADY_AFTER_S makes `flowing` false, until it is acknowledged."""
    monkeypatch.setattr(dead_letters, "DLQ_RETRY_BACKOFF_S", (0.01,))
    monkeypatch.setattr(dead_letters, "DLQ_UNREADY_AFTER_S", 0.05)
    producer = DeadLetterProducer(KafkaConfig(dead_letter_topic="syncd-dead-letters"))
    fake = OnePartitionDownProducer()
    producer._producer = cast(AIOKafkaProducer, fake)
    stuck = asyncio.create_task(
        producer.event(SourceRef("t", 0, 1), b"stuck", b"x", "invalid_json", "")
    )
    start = time.monotonic()
    offset = 2
    while time.monotonic() - start < 0.1 or fake.stuck_attempts < 3:  # others go through
        await producer.event(SourceRef("t", 1, offset), b"other", b"y", "invalid_json", "")
        offset += 1
        await asyncio.sleep(0)
    assert not producer.flowing
    fake.healed = True
    await asyncio.wait_for(stuck, DEADLINE_S)
    assert producer.flowing
