"""The Kafka consumer: a consumer-group member over the input topics that reads, pauses and
resumes partitions and commits only the offsets the tracker (offsets.py) allows.

Commits happen on the app's timer, on partition revocation and at shutdown. Events of a
partition that moved to another member while they were in flight here may be delivered again
by the new owner; adds and removes are idempotent at Amazon, so a replay costs budget, not
correctness. aiokafka rebalances eagerly (every partition is revoked, then the new assignment
is handed out): partitions that come straight back keep their tracker state and reading
position, so a rebalance replays nothing for them. Dead letters are sent through the
dead-letter producer (dead_letters.py), which this source starts and stops with itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import math
from collections.abc import Iterable
from dataclasses import dataclass

from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener
from aiokafka.errors import CommitFailedError, KafkaError
from aiokafka.structs import OffsetAndMetadata, TopicPartition

from syncd.config import KafkaConfig
from syncd.model import SourceRef
from syncd.observability import metrics
from syncd.observability.logging import get_logger
from syncd.source.connection import client_options
from syncd.source.dead_letters import DeadLetterProducer
from syncd.source.offsets import OffsetTracker
from syncd.source.records import install as install_tolerant_records
from syncd.vocabulary import Partition

log = get_logger("syncd.source")

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


@dataclass(slots=True)
class Message:
    """One consumed record: where it came from, its original bytes, its timestamp (None for a
    record of message format v0, written before Kafka 0.10: it has none) (one per event: not
    frozen, see `SourceRef`)."""

    ref: SourceRef
    value: bytes | None
    timestamp_ms: int | None
    key: bytes | None = None


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
        self._dead_letters = DeadLetterProducer(cfg)
        self._paused: set[Partition] = set()  # wanted paused; re-applied after a rebalance
        self._positions: dict[Partition, int] = {}  # next offset to read, from fetched records
        self._revoked: set[Partition] = set()  # between a revocation and the next assignment
        self._joined = False
        self._closing = False
        self._missing_topics: list[str] = []  # of kafka.topics, at the last probe

    async def start(self) -> None:
        install_tolerant_records()  # a header key that is not UTF-8 must not fail every fetch
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
        await self._dead_letters.start()
        await consumer.start()
        consumer.subscribe(list(self._cfg.topics), listener=_Rebalance(self))
        self._consumer = consumer
        log.info("kafka consumer started", topics=list(self._cfg.topics), group=self._cfg.group_id)

    async def stop(self) -> None:
        """Commit what is committable, then close; nothing is committed afterwards."""
        if self._consumer is not None:
            await self.commit()
            self._closing = True
            self._dead_letters.closing = True
            if self._end_offsets_task is not None:
                self._end_offsets_task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._end_offsets_task
                self._end_offsets_task = None
            await _stop_consumer(self._consumer)
            self._consumer = None
        await self._dead_letters.stop()

    @property
    def ready(self) -> bool:
        """Started and joined the group. A member with no partitions (more replicas than
        partitions) counts as ready: it is a healthy standby, and an unready one would stall a
        rolling update."""
        return self._consumer is not None and self._joined

    @property
    def dead_letters_flowing(self) -> bool:
        """The dead-letter topic takes what is sent (see DeadLetterProducer.flowing)."""
        return self._dead_letters.flowing

    async def reachable(self, timeout_s: float = 5.0) -> bool:
        """A metadata round trip to the cluster succeeded within `timeout_s`, and the cluster
        has every topic of `kafka.topics` (a missing one is logged once, naming it)."""
        if self._consumer is None:
            return False
        try:
            async with asyncio.timeout(timeout_s):
                topics = await self._consumer.topics()
        except (TimeoutError, KafkaError):
            return False
        missing = sorted(set(self._cfg.topics) - set(topics))
        if missing != self._missing_topics:
            if missing:
                log.error(
                    "kafka.topics names topics the cluster does not have: nothing is read from "
                    "them (a typo, or not created yet); syncd is not ready until they exist",
                    topics=missing,
                )
            else:
                log.info("kafka.topics: every topic exists", topics=list(self._cfg.topics))
            self._missing_topics = missing
        return not missing

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
        resumed = wanted & self._paused
        self._paused -= wanted
        self._apply(wanted & self.assigned, pause=False)
        if resumed:
            # Pausing dropped what aiokafka had fetched for them and syncd not read yet. Each
            # dropped fetch holds its response's bytes in a reference cycle (a suspended record
            # generator), which only a full collection frees, and the daemon runs those rarely
            # (runtime.tune_process): free them now, once per pause.
            gc.collect()

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

    # -- dead letters (dead_letters.py) ----------------------------------------------------
    async def dead_letter(self, message: Message, reason: str, detail: str = "") -> None:
        """Send an unusable event's original bytes (and key) to the dead-letter topic, reason and
        detail (naming the field, never data) in headers, and wait for the broker's ack. Without
        a dead-letter topic: count and log."""
        await self._dead_letters.event(message.ref, message.key, message.value, reason, detail)

    async def dead_letter_payload(
        self, payload: bytes, reason: str, ref: SourceRef, *, detail: str = ""
    ) -> None:
        """Send syncd-made bytes (e.g. a record Amazon refused, already hashed) to the
        dead-letter topic for the event at `ref`. `detail` must hold no PII."""
        await self._dead_letters.event(ref, None, payload, reason, detail=detail)

    async def dead_letter_member(self, value: bytes, reason: str, detail: str) -> None:
        """Send a member dead letter (see `members.dead_letter_value`: a record Amazon refused,
        hashed) with headers syncd-kind: member, its reason class and Amazon's message, and wait
        for the broker's ack. Without a dead-letter topic: count and log."""
        await self._dead_letters.member(value, reason, detail)

    def _require_consumer(self) -> AIOKafkaConsumer:
        if self._consumer is None:
            raise RuntimeError("KafkaSource is not started")
        return self._consumer
