"""KafkaSource against the real tansu broker: consume, commit the done watermark, commit on
revoke, dead-letter, pause/resume, lag. Plus the consumer/producer options (no broker)."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import ssl
import time
import uuid
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.consumer.fetcher import READ_COMMITTED, READ_UNCOMMITTED
from aiokafka.producer import message_accumulator
from aiokafka.producer import producer as producer_module
from aiokafka.record import default_records

from syncd.config import KafkaConfig
from syncd.localstack import metadata_answered
from syncd.model import SourceRef
from syncd.observability.metrics import REGISTRY
from syncd.source import (
    DLQ_MAX_REQUEST_BYTES,
    KafkaSource,
    Message,
    OffsetTracker,
    client_options,
)
from tests.fixtures.kafka import KafkaCluster, TansuBroker

DEADLINE_S = 30.0


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def config(kafka: KafkaCluster, topic: str, **overrides: Any) -> KafkaConfig:
    values: dict[str, Any] = {
        "bootstrap_servers": kafka.bootstrap,
        "topics": (topic,),
        "group_id": f"g-{uuid.uuid4().hex[:8]}",
        "auto_offset_reset": "earliest",
    }
    values.update(overrides)
    return KafkaConfig(**values)


@contextlib.asynccontextmanager
async def running(cfg: KafkaConfig, tracker: OffsetTracker | None = None) -> AsyncIterator[Any]:
    source = KafkaSource(cfg, tracker or OffsetTracker())
    await source.start()
    try:
        yield source
    finally:
        await source.stop()


async def eventually(condition: Callable[[], Awaitable[bool]], what: str) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while not await condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for: {what}")


async def fetch_until(
    source: KafkaSource, done: Callable[[list[Message]], bool], what: str
) -> list[Message]:
    """Fetch (each call waits up to 200 ms for data) until `done(messages so far)`."""
    got: list[Message] = []

    async def check() -> bool:
        got.extend(await source.fetch(timeout_ms=200))
        return done(got)

    await eventually(check, what)
    return got


async def committed(kafka: KafkaCluster, group: str, topic: str, partitions: int) -> list[int]:
    """The group's committed offset per partition, -1 where there is none."""
    consumer = AIOKafkaConsumer(bootstrap_servers=kafka.bootstrap, group_id=group)
    await consumer.start()
    try:
        offsets = [await consumer.committed(TopicPartition(topic, p)) for p in range(partitions)]
        return [-1 if offset is None else offset for offset in offsets]
    finally:
        await consumer.stop()


async def fill(kafka: KafkaCluster, topic: str, partitions: int, per_partition: int) -> None:
    for p in range(partitions):
        await kafka.produce(topic, [f"{p}-{i}".encode() for i in range(per_partition)], partition=p)


@pytest.mark.integration
async def test_consumes_all_partitions_and_commits_only_the_done_watermark(
    kafka: KafkaCluster, topic: str
) -> None:
    await kafka.create_topic(topic, partitions=3)
    await fill(kafka, topic, 3, 10)
    cfg = config(kafka, topic)
    consumed_before = sample("syncd_events_consumed_total", topic=topic)
    commits_before = sample("syncd_offset_commits_total", outcome="ok")
    tracker = OffsetTracker()
    async with running(cfg, tracker) as source:
        messages = await fetch_until(source, lambda m: len(m) >= 30, "30 messages")
        assert source.ready
        assert source.assigned == {(topic, 0), (topic, 1), (topic, 2)}
        assert len(messages) == 30
        for p in range(3):
            mine = [m for m in messages if m.ref.partition == p]
            assert [m.ref.offset for m in mine] == list(range(10))
            assert [m.value for m in mine] == [f"{p}-{i}".encode() for i in range(10)]
            assert all(m.timestamp_ms > 0 for m in mine)
        assert sample("syncd_events_consumed_total", topic=topic) - consumed_before == 30
        for m in messages:
            tracker.track(m.ref, 1)
        for offset in (0, 1, 2, 4, 5):  # 3 is still open: the watermark stops there
            tracker.done(SourceRef(topic, 0, offset))
        for offset in range(10):
            tracker.done(SourceRef(topic, 1, offset))
        await source.commit()
        assert await committed(kafka, cfg.group_id, topic, 3) == [3, 10, 0]
        assert sample("syncd_offset_commits_total", outcome="ok") - commits_before == 1
        await source.commit()  # nothing advanced: no commit request
        assert sample("syncd_offset_commits_total", outcome="ok") - commits_before == 1
        tracker.done(SourceRef(topic, 2, 0))
        tracker.done(SourceRef(topic, 2, 1))
    # stop() committed partition 2's progress
    assert await committed(kafka, cfg.group_id, topic, 3) == [3, 10, 2]

    async with running(cfg) as again:  # a restart resumes exactly at the watermarks
        replay = await fetch_until(again, lambda m: len(m) >= 15, "the uncommitted events")
        assert sorted((m.ref.partition, m.ref.offset) for m in replay) == [
            *[(0, o) for o in range(3, 10)],
            *[(2, o) for o in range(2, 10)],
        ]


@pytest.mark.integration
async def test_revoked_partitions_commit_their_done_offsets_before_moving(
    kafka: KafkaCluster, topic: str
) -> None:
    await kafka.create_topic(topic, partitions=4)
    await fill(kafka, topic, 4, 5)
    cfg = config(kafka, topic)
    first_tracker = OffsetTracker()
    async with running(cfg, first_tracker) as first:
        messages = await fetch_until(first, lambda m: len(m) >= 20, "20 messages")
        for m in messages:
            first_tracker.track(m.ref, 1)
            if m.ref.offset < 3:  # offsets 3 and 4 of every partition stay in flight
                first_tracker.done(m.ref)
        assert first_tracker.pending() == 8

        async with running(cfg) as second:
            seen_first: list[Message] = []
            seen_second: list[Message] = []

            async def split() -> bool:
                # both members keep polling so that both take part in the rebalance
                one, two = await asyncio.gather(first.fetch(100), second.fetch(100))
                seen_first.extend(one)
                seen_second.extend(two)
                return bool(second.assigned) and len(first.assigned | second.assigned) == 4

            await eventually(split, "the partitions split over both members")
            moved, kept = second.assigned, first.assigned
            assert moved
            assert not moved & kept
            offsets = await committed(kafka, cfg.group_id, topic, 4)
            assert [offsets[p] for _, p in sorted(moved)] == [3] * len(moved)
            # the new owner starts at the committed offset: the in-flight events come again
            replay = await fetch_until(
                second, lambda m: len(seen_second) + len(m) >= 2 * len(moved), "the replay"
            )
            assert sorted(
                (m.ref.partition, m.ref.offset) for m in [*seen_second, *replay]
            ) == sorted((p, o) for _, p in moved for o in (3, 4))
            # the partitions that stayed keep their open events and are not read again
            assert first_tracker.pending() == 2 * len(kept)
            assert seen_first == []
            produced = await kafka.produce(topic, [b"new"], partition=sorted(kept)[0][1])
            [new] = await fetch_until(first, lambda m: len(m) >= 1, "a new message")
            assert (new.ref.partition, new.ref.offset) == (sorted(kept)[0][1], produced[0])
            assert first.ready
            assert second.ready


class _NotUtf8(str):
    """A header key that encodes to bytes that are not UTF-8 (Kafka takes them: its Java
    clients decode header keys leniently)."""

    def encode(self, encoding: str = "utf-8", errors: str = "strict") -> bytes:
        return b"\xff\xfe"


@pytest.mark.integration
@pytest.mark.parametrize("compression", [None, "gzip"])
async def test_a_record_whose_header_key_is_not_utf8_is_read_like_any_other(
    kafka: KafkaCluster, topic: str, monkeypatch: pytest.MonkeyPatch, compression: str | None
) -> None:
    """aiokafka decodes header keys as strict UTF-8 while it parses a fetched batch: one such
    record made every fetch fail (UnicodeDecodeError out of getmany), so the daemon exited,
    and again after each restart. syncd reads no header: the record and its batch-mates come
    through with their bytes."""
    await kafka.create_topic(topic, partitions=1)
    # aiokafka's pure-Python batch builder writes whatever `encode` gives (the compiled one
    # takes only str keys)
    for module in (message_accumulator, producer_module):
        monkeypatch.setattr(
            module, "DefaultRecordBatchBuilder", default_records._DefaultRecordBatchBuilderPy
        )
    producer = AIOKafkaProducer(
        bootstrap_servers=kafka.bootstrap, linger_ms=50, compression_type=compression
    )
    await producer.start()
    try:
        sent = [
            await producer.send(topic, b"before", partition=0),
            await producer.send(topic, b"odd", partition=0, headers=[(_NotUtf8("k"), b"v")]),
            await producer.send(topic, b"after", partition=0),
        ]
        offsets = [meta.offset for meta in await asyncio.gather(*sent)]
    finally:
        await producer.stop()
    assert offsets == [0, 1, 2]
    monkeypatch.undo()
    async with running(config(kafka, topic)) as source:
        messages = await fetch_until(source, lambda m: len(m) >= 3, "the three messages")
    assert [(m.ref.offset, m.value) for m in messages] == [
        (0, b"before"),
        (1, b"odd"),
        (2, b"after"),
    ]


@pytest.mark.integration
async def test_dead_letter_carries_original_bytes_key_and_reason(
    kafka: KafkaCluster, topic: str
) -> None:
    dlq = f"{topic}-dlq"
    await kafka.create_topic(topic, partitions=2)
    await kafka.create_topic(dlq, partitions=1)
    original = b'{"profile_id": \xff not json'
    await kafka.produce(topic, [original], key=b"profile-7", partition=1)
    before = sample("syncd_events_dead_lettered_total", reason="not_utf8")
    async with running(config(kafka, topic, dead_letter_topic=dlq)) as source:
        [message] = await fetch_until(source, lambda m: len(m) >= 1, "the bad message")
        await source.dead_letter(message, "not_utf8")
        await source.dead_letter_payload(
            b'{"hashedPII": []}', "amazon_rejected", message.ref, detail="400: invalid record"
        )
    assert sample("syncd_events_dead_lettered_total", reason="not_utf8") - before == 1
    first, second = await kafka.consume_all(dlq, 2)
    assert (first.key, first.value) == (b"profile-7", original)
    assert dict(first.headers) == {
        "syncd-reason": b"not_utf8",
        "syncd-source": f"{topic}/1/0".encode(),
    }
    assert second.value == b'{"hashedPII": []}'
    assert dict(second.headers) == {
        "syncd-reason": b"amazon_rejected",
        "syncd-source": f"{topic}/1/0".encode(),
        "syncd-detail": b"400: invalid record",
    }


@pytest.mark.integration
async def test_a_dead_letter_too_large_for_the_topic_goes_empty(
    kafka: KafkaCluster, topic: str
) -> None:
    dlq = f"{topic}-dlq"
    await kafka.create_topic(topic, partitions=1)
    await kafka.create_topic(dlq, partitions=1)
    huge = Message(SourceRef(topic, 0, 41), b"x" * (DLQ_MAX_REQUEST_BYTES + 1), 0, key=b"k")
    async with running(config(kafka, topic, dead_letter_topic=dlq)) as source:
        await source.dead_letter(huge, "too_large")
    [record] = await kafka.consume_all(dlq, 1)
    assert (record.key, record.value) == (None, b"")
    assert dict(record.headers) == {
        "syncd-reason": b"too_large",
        "syncd-source": f"{topic}/0/41".encode(),
        "syncd-value-dropped": b"too_large",
    }


@pytest.mark.integration
async def test_without_a_dead_letter_topic_the_event_is_only_counted(
    kafka: KafkaCluster, topic: str
) -> None:
    await kafka.create_topic(topic, partitions=1)
    await kafka.produce(topic, [b"[]"])
    before = sample("syncd_events_dead_lettered_total", reason="not_object")
    async with running(config(kafka, topic)) as source:
        [message] = await fetch_until(source, lambda m: len(m) >= 1, "the message")
        await source.dead_letter(message, "not_object")
    assert sample("syncd_events_dead_lettered_total", reason="not_object") - before == 1


@pytest.mark.integration
async def test_a_paused_partition_delivers_nothing_while_others_flow(
    kafka: KafkaCluster, topic: str
) -> None:
    await kafka.create_topic(topic, partitions=2)
    async with running(config(kafka, topic)) as source:
        await fetch_until(source, lambda _: len(source.assigned) == 2, "the assignment")
        source.pause([(topic, 0)])
        assert source.paused == {(topic, 0)}
        await fill(kafka, topic, 2, 5)
        flowing = await fetch_until(source, lambda m: len(m) >= 5, "partition 1's messages")
        # partition 0 has had its messages all along; one more on partition 1 proves that
        # fetching went on after them
        await kafka.produce(topic, [b"later"], partition=1)
        flowing += await fetch_until(source, lambda m: len(m) >= 1, "the later message")
        assert {m.ref.partition for m in flowing} == {1}
        assert len(flowing) == 6
        source.resume([(topic, 0)])
        assert source.paused == set()
        resumed = await fetch_until(source, lambda m: len(m) >= 5, "partition 0's messages")
        assert sorted((m.ref.partition, m.ref.offset) for m in resumed) == [
            (0, o) for o in range(5)
        ]
        assert source.assigned == {(topic, 0), (topic, 1)}  # the group never dropped us

        source.pause_all()
        assert source.paused == source.assigned
        source.resume_all()
        assert source.paused == set()


@pytest.mark.integration
async def test_records_a_pause_dropped_are_freed_when_reading_resumes(
    kafka: KafkaCluster, topic: str
) -> None:
    """Pausing drops what aiokafka fetched and syncd has not read yet (it is fetched again on
    resume). Each dropped fetch holds its response's bytes (up to max_partition_fetch_bytes) in
    a reference cycle, which only a full collection frees, and the daemon runs those rarely
    (`runtime.tune_process`): a daemon pausing often (a low `max_pending_events`) grew to twice
    its memory. Resuming frees them. Here the collector never runs on its own."""
    await kafka.create_topic(topic, partitions=1)
    await fill(kafka, topic, 1, 50)
    gc.disable()
    try:
        async with running(config(kafka, topic)) as source:
            first = await fetch_until_some(source, max_records=1)
            fetched = source._consumer._fetcher._records[TopicPartition(topic, 0)]
            dropped = weakref.ref(fetched._partition_records)  # 49 records left in it
            del fetched
            assert len(first) == 1
            source.pause_all()
            assert await source.fetch(timeout_ms=0) == []  # aiokafka lets go of them here
            source.resume_all()
            assert dropped() is None
            rest = await fetch_until(source, lambda m: len(m) >= 49, "the rest, fetched again")
            assert [m.ref.offset for m in first + rest] == list(range(50))
    finally:
        gc.enable()


@pytest.mark.integration
async def test_lag_is_high_watermark_minus_the_next_offset(kafka: KafkaCluster, topic: str) -> None:
    await kafka.create_topic(topic, partitions=1)
    await kafka.produce(topic, [b"x"] * 10)
    async with running(config(kafka, topic)) as source:
        first = await fetch_until_some(source, max_records=4)
        assert [m.ref.offset for m in first] == [0, 1, 2, 3]
        source.update_lag()
        assert sample("syncd_consumer_lag_records", topic=topic, partition="0") == 6
        await fetch_until(source, lambda m: len(m) >= 6, "the rest")
        source.update_lag()
        assert sample("syncd_consumer_lag_records", topic=topic, partition="0") == 0


@pytest.mark.integration
async def test_lag_of_a_paused_partition_follows_the_end_offset(
    kafka: KafkaCluster, topic: str
) -> None:
    """A paused partition gets no fetch responses, so aiokafka's high watermark freezes; the
    lag must still grow while a budget wait holds the partition."""
    await kafka.create_topic(topic, partitions=1)
    await kafka.produce(topic, [b"x"] * 4)
    async with running(config(kafka, topic)) as source:
        await fetch_until(source, lambda m: len(m) >= 4, "the first messages")
        source.update_lag()
        assert sample("syncd_consumer_lag_records", topic=topic, partition="0") == 0
        source.pause([(topic, 0)])
        for _ in range(5):  # one produce request each: tansu's ListOffsets counts batches right
            await kafka.produce(topic, [b"y"])

        async def lag_is_five() -> bool:
            await source.fetch(timeout_ms=200)  # the paused partition yields nothing
            source.update_lag()
            return sample("syncd_consumer_lag_records", topic=topic, partition="0") == 5

        await eventually(lag_is_five, "the lag of the paused partition to reach 5")
        source.resume([(topic, 0)])
        await fetch_until(source, lambda m: len(m) >= 5, "the messages held back")
        source.update_lag()
        assert sample("syncd_consumer_lag_records", topic=topic, partition="0") == 0


async def fetch_until_some(source: KafkaSource, max_records: int) -> list[Message]:
    got: list[Message] = []

    async def check() -> bool:
        got.extend(await source.fetch(timeout_ms=200, max_records=max_records))
        return bool(got)

    await eventually(check, "some messages")
    return got


async def test_fetch_before_start_is_an_error() -> None:
    source = KafkaSource(KafkaConfig(), OffsetTracker())
    with pytest.raises(RuntimeError, match="not started"):
        await source.fetch()
    assert not source.ready
    assert source.assigned == set()
    await source.commit()  # nothing to do, no error


@pytest.mark.integration
async def test_a_broker_outage_bounds_commit_and_stop_and_commits_nothing(
    own_broker: TansuBroker, topic: str
) -> None:
    await own_broker.create_topic(topic, partitions=1)
    await own_broker.produce(topic, [b"a", b"b"])
    tracker = OffsetTracker()
    source = KafkaSource(config(own_broker, topic), tracker, commit_timeout_s=1.0)
    await source.start()
    try:
        for message in await fetch_until(source, lambda m: len(m) >= 2, "both messages"):
            tracker.track(message.ref, 1)
            tracker.done(message.ref)
        timeouts = sample("syncd_offset_commits_total", outcome="timeout")
        own_broker.stop()
        await asyncio.wait_for(source.commit(), timeout=DEADLINE_S)
        assert sample("syncd_offset_commits_total", outcome="timeout") - timeouts == 1
        assert tracker.committable() == {(topic, 0): 2}  # still owed: the next commit retries
    finally:
        await asyncio.wait_for(source.stop(), timeout=DEADLINE_S)


@pytest.mark.integration
def test_own_broker_stops_and_restarts_on_the_same_port(own_broker: TansuBroker) -> None:
    assert metadata_answered("127.0.0.1", own_broker.port)
    own_broker.stop()
    assert not own_broker.running
    assert not metadata_answered("127.0.0.1", own_broker.port)
    own_broker.start()
    assert own_broker.running
    assert metadata_answered("127.0.0.1", own_broker.port)


@pytest.mark.integration
@pytest.mark.parametrize(
    ("overrides", "level"),
    [({}, READ_COMMITTED), ({"isolation_level": "read_uncommitted"}, READ_UNCOMMITTED)],
    ids=["default-read-committed", "read-uncommitted"],
)
async def test_the_consumer_fetches_at_the_configured_isolation_level(
    kafka: KafkaCluster, topic: str, overrides: dict[str, str], level: int
) -> None:
    """Aborted transactional writes must never be synced: by default the consumer fetches
    committed messages only (the broker stops it at the last stable offset and names the
    aborted transactions to skip). tansu 0.6 (memory storage) answers InitProducerId with an
    error, so no transaction can be written here: the test checks the level the started
    consumer fetches with (aiokafka's fetcher puts it in every Fetch request) and that plain
    messages still flow at it."""
    await kafka.create_topic(topic)
    await kafka.produce(topic, [b"a", b"b"])
    async with running(config(kafka, topic, **overrides)) as source:
        assert source._consumer._fetcher._isolation_level == level
        messages = await fetch_until(source, lambda m: len(m) >= 2, "both messages")
        assert [m.value for m in messages] == [b"a", b"b"]


# --- options (no broker) ---------------------------------------------------------------------
def test_plaintext_options() -> None:
    options = client_options(KafkaConfig(bootstrap_servers="b:9092", client_id="c"))
    assert options == {
        "bootstrap_servers": "b:9092",
        "client_id": "c",
        "security_protocol": "PLAINTEXT",
    }


def test_sasl_ssl_options() -> None:
    options = client_options(
        KafkaConfig(
            security_protocol="SASL_SSL",
            sasl_mechanism="SCRAM-SHA-512",
            sasl_username="user",
            sasl_password="secret",
        )
    )
    assert isinstance(options["ssl_context"], ssl.SSLContext)
    assert options["sasl_mechanism"] == "SCRAM-SHA-512"
    assert (options["sasl_plain_username"], options["sasl_plain_password"]) == ("user", "secret")
    plain = client_options(KafkaConfig(security_protocol="SASL_PLAINTEXT"))
    assert plain["sasl_mechanism"] == "PLAIN"
    assert "ssl_context" not in plain
