"""OffsetTracker: commit only the contiguous done watermark, per partition."""

from __future__ import annotations

import random
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from syncd.model import SourceRef
from syncd.source import OffsetTracker

P0 = ("t", 0)
P1 = ("t", 1)


def ref(offset: int, partition: int = 0, topic: str = "t") -> SourceRef:
    return SourceRef(topic, partition, offset)


def test_committable_is_the_lowest_offset_not_done() -> None:
    tracker = OffsetTracker()
    for offset in range(5):
        tracker.track(ref(offset), 1)
    assert tracker.committable() == {P0: 0}
    tracker.done(ref(1))
    tracker.done(ref(2))
    assert tracker.committable() == {P0: 0}  # 0 is still open
    tracker.done(ref(0))
    assert tracker.committable() == {P0: 3}
    tracker.done(ref(4))
    tracker.done(ref(3))
    assert tracker.committable() == {P0: 5}
    assert tracker.pending() == 0


def test_an_event_is_done_when_all_its_parts_are() -> None:
    tracker = OffsetTracker()
    tracker.track(ref(0), 3)
    tracker.done(ref(0))
    tracker.done(ref(0))
    assert tracker.committable() == {P0: 0}
    assert tracker.pending() == 1
    tracker.done(ref(0))
    assert tracker.committable() == {P0: 1}
    assert tracker.pending() == 0


def test_done_with_several_parts_at_once() -> None:
    tracker = OffsetTracker()
    tracker.track(ref(0), 3)
    tracker.done(ref(0), parts=2)
    assert tracker.pending() == 1
    tracker.done(ref(0), parts=1)
    assert tracker.committable() == {P0: 1}


def test_zero_parts_is_done_at_once_and_gaps_count_as_done() -> None:
    tracker = OffsetTracker()
    tracker.track(ref(10), 0)
    assert tracker.committable() == {P0: 11}
    tracker.track(ref(15), 1)  # 11..14: compacted away or transaction markers
    tracker.track(ref(16), 0)
    assert tracker.committable() == {P0: 15}
    tracker.done(ref(15))
    assert tracker.committable() == {P0: 17}
    assert tracker.pending() == 0


def test_only_partitions_that_advanced_since_the_last_commit_are_committable() -> None:
    tracker = OffsetTracker()
    tracker.track(ref(0, 0), 1)
    tracker.track(ref(0, 1), 1)
    tracker.done(ref(0, 0))
    tracker.done(ref(0, 1))
    assert tracker.committable() == {P0: 1, P1: 1}
    tracker.mark_committed({P0: 1, P1: 1})
    assert tracker.committable() == {}
    tracker.track(ref(1, 1), 1)
    tracker.done(ref(1, 1))
    assert tracker.committable() == {P1: 2}


def test_partitions_are_independent() -> None:
    tracker = OffsetTracker()
    tracker.track(ref(0, 0), 1)
    tracker.track(ref(0, 1), 1)
    tracker.track(ref(1, 1), 1)
    tracker.done(ref(1, 1))
    tracker.done(ref(0, 1))
    assert tracker.committable() == {P0: 0, P1: 2}
    assert tracker.pending() == 1


def test_forget_drops_a_partition_and_late_dones_are_no_ops() -> None:
    tracker = OffsetTracker()
    tracker.track(ref(0, 0), 2)
    tracker.track(ref(1, 0), 1)
    tracker.track(ref(0, 1), 1)
    tracker.mark_committed({P0: 0})
    tracker.forget([P0, ("other", 9)])
    assert tracker.pending() == 1
    tracker.done(ref(0, 0))  # the partition moved: nothing happens
    assert tracker.committable() == {P1: 0}
    assert tracker.pending() == 1


def test_a_partition_tracked_again_after_forget_starts_fresh() -> None:
    tracker = OffsetTracker()
    tracker.track(ref(5), 1)
    tracker.done(ref(5))
    tracker.mark_committed({P0: 6})
    tracker.forget([P0])
    tracker.track(ref(3), 1)  # the new owner's committed offset was lower: re-read from there
    assert tracker.committable() == {P0: 3}
    tracker.done(ref(3))
    assert tracker.committable() == {P0: 4}


def test_unknown_offsets_and_extra_dones_are_ignored() -> None:
    tracker = OffsetTracker()
    tracker.track(ref(0), 1)
    tracker.track(ref(1), 1)
    tracker.done(ref(0))
    tracker.done(ref(0))  # already done
    tracker.done(ref(7))  # never tracked
    assert tracker.committable() == {P0: 1}
    assert tracker.pending() == 1


def test_mark_committed_ignores_forgotten_partitions_and_never_goes_back() -> None:
    tracker = OffsetTracker()
    tracker.track(ref(0), 0)
    tracker.mark_committed({P0: 1, P1: 5})
    tracker.mark_committed({P0: 0})
    assert tracker.committable() == {}
    tracker.track(ref(0, 1), 0)
    assert tracker.committable() == {P1: 1}  # P1 was not known when "committed"


def test_reading_again_from_an_earlier_offset_starts_the_partition_over() -> None:
    """After an offset reset the consumer re-reads: nothing of the re-read range counts as done,
    so the commit position never passes one of its events."""
    tracker = OffsetTracker()
    for offset in range(4, 8):
        tracker.track(ref(offset), 1)
    tracker.done(ref(4))
    tracker.done(ref(5))
    assert tracker.committable() == {P0: 6}
    tracker.mark_committed({P0: 6})
    tracker.track(ref(2), 1)  # reset to offset 2
    assert tracker.pending() == 1
    for offset in range(3, 9):
        tracker.track(ref(offset), 1)
    for offset in (2, 3, 5, 6):
        tracker.done(ref(offset))
    assert tracker.committable() == {P0: 4}  # 4 is open again: the position goes back to it
    tracker.mark_committed({P0: 4})
    tracker.done(ref(4))
    assert tracker.committable() == {P0: 7}
    assert tracker.pending() == 2


def test_a_topic_recreated_under_the_consumer_is_committed_from_its_new_start() -> None:
    """A topic deleted and created again: the consumer's position is out of range, Kafka resets
    it to the new log's start, and the new log's offsets are far below the old committed mark.
    Its events are committed as they are done, not once the new log passes the old mark."""
    tracker = OffsetTracker()
    tracker.track(ref(999_999), 1)
    tracker.done(ref(999_999))
    tracker.mark_committed(tracker.committable())
    for offset in range(3):
        tracker.track(ref(offset), 1)
        tracker.done(ref(offset))
    assert tracker.committable() == {P0: 3}
    tracker.mark_committed({P0: 3})
    assert tracker.committable() == {}


def test_a_commit_answered_after_the_partition_went_back_does_not_restore_the_old_mark() -> None:
    tracker = OffsetTracker()
    tracker.track(ref(999_999), 1)
    tracker.done(ref(999_999))
    in_flight = tracker.committable()  # a commit of {P0: 1_000_000} is on its way
    tracker.track(ref(0), 1)  # meanwhile the first event of the new log is read
    tracker.done(ref(0))
    tracker.mark_committed(in_flight)  # the old commit's answer arrives
    assert tracker.committable() == {P0: 1}


def test_a_commit_of_the_old_log_answered_once_the_new_log_read_past_it_holds_nothing_back() -> (
    None
):
    """A commit sent before the partition went back is answered after the new log was read past
    its position (a small topic created again; a commit waits up to 10 s): Kafka holds that
    position, above new events not done, until the tracker commits the new log's own. Taking it
    as the new log's mark held that commit back until the new log's events below it were done,
    and a crash meanwhile skipped them."""
    tracker = OffsetTracker()
    tracker.track(ref(4), 1)
    tracker.done(ref(4))
    in_flight = tracker.committable()  # a commit of {P0: 5} is on its way
    for offset in range(10):  # meanwhile the new log is read from 0 to 9
        tracker.track(ref(offset), 1)
    for offset in range(3):
        tracker.done(ref(offset))
    tracker.mark_committed(in_flight)  # the old commit's answer arrives
    assert tracker.committable() == {P0: 3}  # committed, so Kafka goes back below 3..9
    tracker.mark_committed({P0: 3})
    for offset in range(3, 10):
        tracker.done(ref(offset))
    assert tracker.committable() == {P0: 10}


def test_negative_parts_are_refused() -> None:
    with pytest.raises(ValueError, match="parts"):
        OffsetTracker().track(ref(5), -1)


def test_a_million_events_complete_in_linear_time() -> None:
    tracker = OffsetTracker()
    count = 1_000_000
    started = time.perf_counter()
    for offset in range(count):
        tracker.track(ref(offset), 1)
    for offset in range(count - 1, -1, -1):  # newest first: the watermark moves only at the end
        tracker.done(ref(offset))
        if offset % 1000 == 0:
            tracker.committable()
    assert tracker.committable() == {P0: count}
    assert tracker.pending() == 0
    assert time.perf_counter() - started < 20  # quadratic would take hours


@settings(max_examples=300)
@given(
    st.lists(st.tuples(st.integers(0, 3), st.integers(0, 3)), min_size=1, max_size=40),
    st.randoms(use_true_random=False),
)
def test_committable_never_passes_an_event_not_done_and_reaches_the_end(
    events: list[tuple[int, int]], rng: random.Random
) -> None:
    """events: (partition, parts) in arrival order; the parts finish in any interleaving."""
    tracker = OffsetTracker()
    next_offset = dict.fromkeys(range(4), 0)
    last_tracked: dict[int, int] = {}
    open_parts: dict[tuple[int, int], int] = {}
    for partition, parts in events:
        offset = last_tracked[partition] = next_offset[partition]
        next_offset[partition] += rng.choice([1, 1, 2])  # sometimes a gap
        tracker.track(ref(offset, partition), parts)
        if parts:
            open_parts[(partition, offset)] = parts
    work = [key for key, parts in open_parts.items() for _ in range(parts)]
    rng.shuffle(work)
    committed: dict[tuple[str, int], int] = {}
    for partition, offset in work:
        tracker.done(ref(offset, partition))
        open_parts[(partition, offset)] -= 1
        if rng.random() < 0.3:
            offsets = tracker.committable()
            for (_, p), position in offsets.items():
                not_done = [o for (q, o), left in open_parts.items() if q == p and left]
                assert position <= min(not_done, default=position)
                assert position > committed.get(("t", p), -1)
            tracker.mark_committed(offsets)
            committed.update(offsets)
        assert tracker.pending() == sum(1 for left in open_parts.values() if left)
    committed.update(tracker.committable())
    assert committed == {("t", p): last + 1 for p, last in last_tracked.items()}
