"""The Kafka edge: a consumer-group source with manual commits, the offset tracker that decides
what may be committed, and the dead-letter producer.

At-least-once: an offset is committed only when every event below it is done (accepted by
Amazon and its job stored, dead-lettered, or filtered). Commits happen on the app's timer, on
partition revocation and at shutdown. Events of a partition that moved to another member while
they were in flight here may be delivered again by the new owner; adds and removes are
idempotent at Amazon, so a replay costs budget, not correctness. aiokafka rebalances eagerly
(every partition is revoked, then the new assignment is handed out): partitions that come
straight back keep their tracker state and reading position, so a rebalance replays nothing
for them.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import math
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener
from aiokafka.errors import CommitFailedError, KafkaError, MessageSizeTooLargeError
from aiokafka.helpers import create_ssl_context
from aiokafka.structs import OffsetAndMetadata, TopicPartition

from syncd.config import KafkaConfig
from syncd.model import SourceRef
from syncd.observability import metrics
from syncd.observability.logging import get_logger
from syncd.vocabulary import Partition

log = get_logger("syncd.source")

REASON_HEADER = "syncd-reason"
SOURCE_HEADER = "syncd-source"
DETAIL_HEADER = "syncd-detail"
KIND_HEADER = "syncd-kind"
VALUE_DROPPED_HEADER = "syncd-value-dropped"
DLQ_RETRY_BACKOFF_S = (0.5, 1.0, 2.0, 5.0)
DLQ_MAX_REQUEST_BYTES = 16 * 1024 * 1024  # the broker applies its own limit (see _send_dead_letter)
# Fetch responses are buffered whole until read: bound them (aiokafka's default allows 50 MiB per
# response, and brokers that do not apply the per-partition limit fill it). 4 MiB is ~8,000
# typical events, more than one read takes; a batch larger than the limit still comes through.
FETCH_MAX_BYTES = 4 * 1024 * 1024
MAX_PARTITION_FETCH_BYTES = 1024 * 1024
COMMIT_TIMEOUT_S = 10.0  # aiokafka retries a commit forever while the coordinator is unknown
STOP_TIMEOUT_S = 5.0  # leaving the group: a stuck rebalance must not block the shutdown
# Paused partitions get no fetch responses, so aiokafka's high watermark freezes for them; their
# end offsets are asked for (ListOffsets) at most this often, each ask bounded by the timeout.
LAG_REFRESH_S = 15.0
LAG_REFRESH_TIMEOUT_S = 5.0


# --- offsets ----------------------------------------------------------------------------------
@dataclass(slots=True)
class _PartitionOffsets:
    open_parts: dict[int, int] = field(default_factory=dict)  # offset -> parts not yet done
    order: deque[int] = field(default_factory=deque)  # tracked offsets, oldest first
    last: int = -1  # highest offset tracked

    def watermark(self) -> int:
        """The lowest offset not yet done: Kafka's commit position."""
        while self.order and self.order[0] not in self.open_parts:
            self.order.popleft()
        return self.order[0] if self.order else self.last + 1


class OffsetTracker:
    """Per partition: the offsets handed out and the parts still outstanding per offset. The
    committable offset is the lowest offset not yet done (the contiguous done watermark + 1).

    O(1) amortized per event: each offset enters a partition's deque once and leaves it once.
    Offsets of one partition come in increasing order (Kafka's delivery order); gaps
    (compaction, transaction markers) count as done. An offset at or below the last one tracked
    means the consumer went back: the partition starts over from there.

    `done()` on a partition that was forgotten (revoked) is a no-op: the new owner replays it.
    If the partition came back to this consumer, a late `done()` from before the revocation
    counts towards the re-read copy of the same offset: its outcome (accepted or dead-lettered)
    is real, and the re-read copy's own `done()` then finds nothing left and is ignored.
    """

    def __init__(self) -> None:
        self._partitions: dict[Partition, _PartitionOffsets] = {}
        self._committed: dict[Partition, int] = {}
        self._pending = 0

    def track(self, ref: SourceRef, parts: int) -> None:
        """Hand out one event made of `parts` pieces of work; 0 parts means done already."""
        if parts < 0:
            raise ValueError("parts must be >= 0")
        partition = ref.topic_partition
        state = self._partitions.setdefault(partition, _PartitionOffsets())
        if ref.offset <= state.last:
            # The consumer went back (an offset reset, a seek after a rebalance): start the
            # partition over from here. Nothing at or above this offset counts as done any more,
            # so the commit position cannot pass an event of the re-read range; late `done()`s
            # of the earlier copies count towards the re-read ones (same events, same outcome).
            log.warning(
                "partition read again from an earlier offset",
                partition=f"{ref.topic}/{ref.partition}",
                offset=ref.offset,
                last=state.last,
            )
            self._pending -= len(state.open_parts)
            state = self._partitions[partition] = _PartitionOffsets()
        state.last = ref.offset
        if parts:
            state.open_parts[ref.offset] = parts
            state.order.append(ref.offset)
            self._pending += 1

    def done(self, ref: SourceRef, parts: int = 1) -> None:
        """`parts` pieces of the event at `ref` are finished."""
        state = self._partitions.get(ref.topic_partition)
        if state is None:
            return
        left = state.open_parts.get(ref.offset)
        if left is None:
            return
        if left > parts:
            state.open_parts[ref.offset] = left - parts
            return
        del state.open_parts[ref.offset]
        self._pending -= 1

    def committable(self) -> dict[Partition, int]:
        """Commit positions of the partitions whose watermark advanced since the last
        `mark_committed`."""
        out: dict[Partition, int] = {}
        for partition, state in self._partitions.items():
            watermark = state.watermark()
            if watermark > self._committed.get(partition, -1):
                out[partition] = watermark
        return out

    def mark_committed(self, offsets: dict[Partition, int]) -> None:
        for partition, offset in offsets.items():
            if partition in self._partitions:
                self._committed[partition] = max(offset, self._committed.get(partition, -1))

    def forget(self, partitions: Iterable[Partition]) -> None:
        """Drop the state of partitions this consumer no longer owns (revoked or lost)."""
        for partition in partitions:
            state = self._partitions.pop(partition, None)
            if state is not None:
                self._pending -= len(state.open_parts)
            self._committed.pop(partition, None)

    def pending(self) -> int:
        """Events tracked and not yet done."""
        return self._pending


# --- kafka ------------------------------------------------------------------------------------
@dataclass(slots=True)
class Message:
    """One consumed record: where it came from, its original bytes, its timestamp (one per
    event: not frozen, see `SourceRef`)."""

    ref: SourceRef
    value: bytes | None
    timestamp_ms: int
    key: bytes | None = None


def client_options(cfg: KafkaConfig) -> dict[str, Any]:
    """Connection settings shared by the consumer and the dead-letter producer."""
    options: dict[str, Any] = {
        "bootstrap_servers": cfg.bootstrap_servers,
        "client_id": cfg.client_id,
        "security_protocol": cfg.security_protocol,
    }
    if cfg.security_protocol in ("SSL", "SASL_SSL"):
        options["ssl_context"] = create_ssl_context(
            cafile=cfg.ssl_cafile or None,
            certfile=cfg.ssl_certfile or None,
            keyfile=cfg.ssl_keyfile or None,
        )
    if cfg.security_protocol.startswith("SASL_"):
        options["sasl_mechanism"] = cfg.sasl_mechanism or "PLAIN"
        options["sasl_plain_username"] = cfg.sasl_username
        options["sasl_plain_password"] = cfg.sasl_password
    return options


async def _stop_consumer(consumer: AIOKafkaConsumer) -> None:
    """`consumer.stop()` within STOP_TIMEOUT_S. Two ways it can fail to finish, after both of
    which the network client is closed here, so no connection is left open:
    - it hangs, e.g. in a rebalance that waits for other members (offsets are committed
      already; the group evicts this member after its session timeout);
    - aiokafka leaks an internal CancelledError from the fetcher's close when a request to an
      unreachable broker was pending (aio-libs/aiokafka#647)."""
    try:
        async with asyncio.timeout(STOP_TIMEOUT_S):
            await consumer.stop()
        return
    except TimeoutError:
        log.warning("kafka consumer did not close in time", timeout_s=STOP_TIMEOUT_S)
    except asyncio.CancelledError:
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            raise  # our own cancellation: propagate it
        log.warning("kafka consumer closed with a pending request (broker unreachable?)")
    for pending in consumer._fetcher._pending_tasks:
        pending.cancel()
    await consumer._client.close()


class _Rebalance(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, source: KafkaSource) -> None:
        self._source = source

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        await self._source._on_revoked({Partition(*tp) for tp in revoked})

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        self._source._on_assigned({Partition(*tp) for tp in assigned})


class KafkaSource:
    """A consumer-group member over `cfg.topics`, committing only what the tracker allows."""

    def __init__(
        self,
        cfg: KafkaConfig,
        tracker: OffsetTracker,
        *,
        commit_timeout_s: float = COMMIT_TIMEOUT_S,
        lag_refresh_s: float = LAG_REFRESH_S,
    ) -> None:
        self._cfg = cfg
        self._tracker = tracker
        self._commit_timeout_s = commit_timeout_s
        self._lag_refresh_s = lag_refresh_s
        self._end_offsets: dict[Partition, int] = {}  # of paused partitions, from ListOffsets
        self._end_offsets_asked = -math.inf  # loop time of the last ask
        self._end_offsets_task: asyncio.Task[None] | None = None
        self._consumer: AIOKafkaConsumer | None = None
        self._producer: AIOKafkaProducer | None = None
        self._paused: set[Partition] = set()  # wanted paused; re-applied after a rebalance
        self._positions: dict[Partition, int] = {}  # next offset to read, from fetched records
        self._revoked: set[Partition] = set()  # between a revocation and the next assignment
        self._joined = False
        self._closing = False

    async def start(self) -> None:
        options = client_options(self._cfg)
        consumer = AIOKafkaConsumer(
            group_id=self._cfg.group_id,
            enable_auto_commit=False,
            auto_offset_reset=self._cfg.auto_offset_reset,
            isolation_level=self._cfg.isolation_level,
            fetch_max_bytes=FETCH_MAX_BYTES,
            max_partition_fetch_bytes=MAX_PARTITION_FETCH_BYTES,
            **options,
        )
        if self._cfg.dead_letter_topic:
            self._producer = AIOKafkaProducer(
                acks="all", max_request_size=DLQ_MAX_REQUEST_BYTES, **options
            )
            await self._producer.start()
        await consumer.start()
        consumer.subscribe(list(self._cfg.topics), listener=_Rebalance(self))
        self._consumer = consumer
        log.info("kafka consumer started", topics=list(self._cfg.topics), group=self._cfg.group_id)

    async def stop(self) -> None:
        """Commit what is committable, then close; nothing is committed afterwards."""
        if self._consumer is not None:
            await self.commit()
            self._closing = True
            if self._end_offsets_task is not None:
                self._end_offsets_task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._end_offsets_task
                self._end_offsets_task = None
            await _stop_consumer(self._consumer)
            self._consumer = None
        if self._producer is not None:
            await self._producer.stop()
            self._producer = None

    @property
    def ready(self) -> bool:
        """Started and joined the group. A member with no partitions (more replicas than
        partitions) counts as ready: it is a healthy standby, and an unready one would stall a
        rolling update."""
        return self._consumer is not None and self._joined

    async def reachable(self, timeout_s: float = 5.0) -> bool:
        """A metadata round trip to the cluster succeeded within `timeout_s`."""
        if self._consumer is None:
            return False
        try:
            async with asyncio.timeout(timeout_s):
                await self._consumer.topics()
        except (TimeoutError, KafkaError):
            return False
        return True

    @property
    def assigned(self) -> set[Partition]:
        if self._consumer is None:
            return set()
        return {Partition(*tp) for tp in self._consumer.assignment()}

    # -- reading ---------------------------------------------------------------------------
    async def fetch(self, timeout_ms: int = 500, max_records: int = 5000) -> list[Message]:
        """Records of the partitions that are not paused, in partition order. The group stays
        alive while partitions are paused (heartbeats run in the background)."""
        consumer = self._require_consumer()
        batches = await consumer.getmany(timeout_ms=timeout_ms, max_records=max_records)
        out: list[Message] = []
        for tp, records in batches.items():
            if not records:
                continue
            for record in records:
                out.append(
                    Message(
                        ref=SourceRef(tp.topic, tp.partition, record.offset),
                        value=record.value,
                        timestamp_ms=record.timestamp,
                        key=record.key,
                    )
                )
            self._positions[Partition(*tp)] = records[-1].offset + 1
            metrics.EVENTS_CONSUMED.labels(tp.topic).inc(len(records))
        return out

    def pause(self, partitions: Iterable[Partition]) -> None:
        wanted = set(partitions)
        self._paused |= wanted
        self._apply(wanted & self.assigned, pause=True)

    def resume(self, partitions: Iterable[Partition]) -> None:
        wanted = set(partitions)
        self._paused -= wanted
        self._apply(wanted & self.assigned, pause=False)

    def pause_all(self) -> None:
        self.pause(self.assigned)

    def resume_all(self) -> None:
        self.resume(set(self._paused))

    @property
    def paused(self) -> set[Partition]:
        """Partitions paused on the consumer right now."""
        if self._consumer is None:
            return set()
        return {Partition(*tp) for tp in self._consumer.paused()}

    def _apply(self, partitions: set[Partition], *, pause: bool) -> None:
        if not partitions:
            return
        consumer = self._require_consumer()
        tps = [TopicPartition(topic, partition) for topic, partition in partitions]
        if pause:
            consumer.pause(*tps)
        else:
            consumer.resume(*tps)

    def update_lag(self) -> None:
        """CONSUMER_LAG per assigned partition: the broker's high watermark minus the next
        offset to read. Set once a fetch has reported both for the partition.

        aiokafka learns the high watermark from fetch responses only, and a paused partition
        (budget wait, backpressure) is not fetched: for paused partitions the end offsets are
        also asked for in the background, at most every `lag_refresh_s`, and the larger of the
        two counts. Called from the commit loop; the ask never blocks it."""
        if self._consumer is None:
            return
        paused = self.paused
        self._end_offsets = {p: o for p, o in self._end_offsets.items() if p in paused}
        for tp in self._consumer.assignment():
            partition = Partition(*tp)
            highwater = self._consumer.highwater(tp)
            position = self._positions.get(partition)
            if partition in self._end_offsets:
                highwater = max(highwater or 0, self._end_offsets[partition])
            if highwater is not None and position is not None:
                lag = max(0, highwater - position)
                metrics.CONSUMER_LAG.labels(tp.topic, str(tp.partition)).set(lag)
        # Only partitions read from before: their position is known, and a ListOffsets answer
        # for an empty partition is not trusted (tansu may answer 1).
        stale = {p for p in paused if p in self._positions}
        now = asyncio.get_running_loop().time()
        if (
            stale
            and not self._closing
            and (self._end_offsets_task is None or self._end_offsets_task.done())
            and now - self._end_offsets_asked >= self._lag_refresh_s
        ):
            self._end_offsets_asked = now
            self._end_offsets_task = asyncio.get_running_loop().create_task(
                self._ask_end_offsets(stale), name="syncd-lag-end-offsets"
            )

    async def _ask_end_offsets(self, partitions: set[Partition]) -> None:
        consumer = self._require_consumer()
        try:
            async with asyncio.timeout(LAG_REFRESH_TIMEOUT_S):
                answer = await consumer.end_offsets([TopicPartition(t, p) for t, p in partitions])
        except (TimeoutError, KafkaError) as exc:
            log.debug("end offsets of paused partitions not known; lag kept", error=repr(exc))
            return
        for tp, offset in answer.items():
            partition = Partition(*tp)
            if partition in self.paused:  # resumed meanwhile: fetches report it again
                self._end_offsets[partition] = offset

    # -- committing ------------------------------------------------------------------------
    async def commit(self, only: set[Partition] | None = None) -> None:
        """Commit the tracker's committable offsets (of `only`, if given), waiting at most
        `commit_timeout_s`. A failure is logged and counted by outcome, never raised: the next
        commit carries the same or higher offsets."""
        if self._consumer is None or self._closing:
            return
        assigned = self.assigned
        offsets = {
            partition: offset
            for partition, offset in self._tracker.committable().items()
            if partition in assigned and (only is None or partition in only)
        }
        if not offsets:
            return
        try:
            async with asyncio.timeout(self._commit_timeout_s):
                await self._consumer.commit(
                    {
                        TopicPartition(t, p): OffsetAndMetadata(o, "")
                        for (t, p), o in offsets.items()
                    }
                )
        except CommitFailedError:
            metrics.OFFSETS_COMMITTED.labels("rebalance").inc()
            log.warning("offset commit refused during a rebalance; retried on the next commit")
            return
        except TimeoutError:
            metrics.OFFSETS_COMMITTED.labels("timeout").inc()
            log.warning(
                "offset commit timed out (broker unreachable?); retried on the next commit",
                timeout_s=self._commit_timeout_s,
            )
            return
        except KafkaError as exc:
            metrics.OFFSETS_COMMITTED.labels("error").inc()
            log.warning("offset commit failed; retried on the next commit", error=repr(exc))
            return
        self._tracker.mark_committed(offsets)
        metrics.OFFSETS_COMMITTED.labels("ok").inc()
        log.debug(
            "offsets committed",
            offsets={f"{t}/{p}": o for (t, p), o in sorted(offsets.items())},
        )

    async def _on_revoked(self, revoked: set[Partition]) -> None:
        """Before a rebalance: commit what is done in the partitions we may lose. Their state
        is kept until the new assignment shows which ones really moved."""
        await self.commit(only=revoked)
        self._revoked = revoked
        log.info("partitions revoked", partitions=sorted(f"{t}/{p}" for t, p in revoked))

    def _on_assigned(self, assigned: set[Partition]) -> None:
        """After a rebalance: forget the partitions that moved (their new owner resumes from
        the committed offsets and may deliver our in-flight events again). A partition that
        came straight back continues where this member stopped reading, so its in-flight
        events are neither read twice nor forgotten."""
        moved, kept = self._revoked - assigned, self._revoked & assigned
        self._revoked = set()
        self._tracker.forget(moved)
        for partition in moved:
            self._positions.pop(partition, None)
            with contextlib.suppress(KeyError):  # no lag sample was set for it
                metrics.CONSUMER_LAG.remove(partition.topic, str(partition.partition))
        consumer = self._require_consumer()
        for partition in kept:
            position = self._positions.get(partition)
            if position is not None:
                consumer.seek(TopicPartition(*partition), position)
        self._joined = True
        self._apply(self._paused & assigned, pause=True)
        log.info("partitions assigned", partitions=sorted(f"{t}/{p}" for t, p in assigned))

    # -- dead letters ----------------------------------------------------------------------
    async def dead_letter(self, message: Message, reason: str) -> None:
        """Send an unusable event's original bytes (and key) to the dead-letter topic, reason in
        a header, and wait for the broker's ack. Without a dead-letter topic: count and log."""
        await self._dead_letter(message.ref, message.key, message.value, reason, detail="")

    async def dead_letter_payload(
        self, payload: bytes, reason: str, ref: SourceRef, *, detail: str = ""
    ) -> None:
        """Send syncd-made bytes (e.g. a record Amazon refused, already hashed) to the
        dead-letter topic for the event at `ref`. `detail` must hold no PII."""
        await self._dead_letter(ref, None, payload, reason, detail=detail)

    async def dead_letter_member(self, value: bytes, reason: str, detail: str) -> None:
        """Send a member dead letter (see `members.dead_letter_value`: a record Amazon refused,
        hashed) with headers syncd-kind: member, its reason class and Amazon's message, and wait
        for the broker's ack. Without a dead-letter topic: count and log."""
        metrics.EVENTS_DEAD_LETTERED.labels(reason).inc()
        if self._producer is None:
            log.warning("member dead-lettered (no dead-letter topic)", reason=reason)
            return
        headers = [(KIND_HEADER, b"member"), (REASON_HEADER, reason.encode())]
        if detail:
            headers.append((DETAIL_HEADER, detail.encode()))
        await self._send_dead_letter(None, value, headers, "member")
        log.info("member dead-lettered", reason=reason)

    async def _dead_letter(
        self, ref: SourceRef, key: bytes | None, value: bytes | None, reason: str, detail: str
    ) -> None:
        metrics.EVENTS_DEAD_LETTERED.labels(reason).inc()
        where = f"{ref.topic}/{ref.partition}/{ref.offset}"
        if self._producer is None:
            log.warning("event dead-lettered (no dead-letter topic)", reason=reason, source=where)
            return
        headers = [(REASON_HEADER, reason.encode()), (SOURCE_HEADER, where.encode())]
        if detail:
            headers.append((DETAIL_HEADER, detail.encode()))
        await self._send_dead_letter(key, value, headers, where)
        log.info("event dead-lettered", reason=reason, source=where)

    async def _send_dead_letter(
        self, key: bytes | None, value: bytes | None, headers: list[tuple[str, bytes]], where: str
    ) -> None:
        """Produce until acknowledged: the source offset must not be committed before the dead
        letter is durable, so a broker outage holds it (and backpressure follows) instead of
        losing it. A message the topic refuses as too large goes with an empty value and no key,
        and a header saying so. Gives up (raises) only once the source is stopping: nothing is
        committed after that."""
        assert self._producer is not None
        for attempt in itertools.count():
            try:
                await self._producer.send_and_wait(
                    self._cfg.dead_letter_topic, value, key=key, headers=headers
                )
                return
            except MessageSizeTooLargeError:
                if key is None and value == b"":
                    raise
                log.warning("dead letter too large for its topic; sent empty", source=where)
                key, value = None, b""
                headers = [*headers, (VALUE_DROPPED_HEADER, b"too_large")]
            except KafkaError as exc:
                if self._closing:
                    raise
                delay = DLQ_RETRY_BACKOFF_S[min(attempt, len(DLQ_RETRY_BACKOFF_S) - 1)]
                log.warning(
                    "dead-letter send failed; retrying",
                    source=where,
                    error=repr(exc),
                    retry_in_s=delay,
                )
                await asyncio.sleep(delay)  # backoff before the next attempt

    def _require_consumer(self) -> AIOKafkaConsumer:
        if self._consumer is None:
            raise RuntimeError("KafkaSource is not started")
        return self._consumer
