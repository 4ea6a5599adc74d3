"""The offset tracker: which offset of each partition may be committed.

At-least-once: an offset is committable only when every event below it is done (accepted by
Amazon and its job stored, dead-lettered, or filtered). The consumer (consumer.py) commits what
this tracker allows; nothing here talks to Kafka.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field

from syncd.model import SourceRef
from syncd.observability.logging import get_logger
from syncd.vocabulary import Partition

log = get_logger("syncd.source")


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
    means the consumer went back: the partition starts over from there, its commit position too.

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
            # The position committed before counts no more: a topic deleted and created again
            # starts its offsets over, far below it, and committing a lower position only
            # means reading more again after a restart.
            self._committed.pop(partition, None)
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
        """Positions Kafka took. One past the partition's watermark now (an event below it is
        not done) is of a commit sent before the partition went back (see `track`), answered
        once the new log was read: not the new log's mark, so the watermark is committed over
        it. The watermark never goes back within a log, so a commit of this log always counts."""
        for partition, offset in offsets.items():
            state = self._partitions.get(partition)
            if state is not None and offset <= state.watermark():
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
