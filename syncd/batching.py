"""Per-destination accumulation of member records into POST-sized batches. Pure: no I/O.

A record arrives encoded (`MemberRecord.json`); a batch body is the concatenation of its records'
bytes, so `size_bytes` is exact and nothing is encoded twice. Within an open batch the
latest change of a member replaces an earlier one (by `occurred_at` when both carry one, else by
arrival, i.e. partition order); the replaced change's source reference stays with the batch so
acknowledging the batch acknowledges it too.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import orjson

from syncd.amazon.api import records_body
from syncd.model import Batch, Destination, Member, MemberRecord, SourceRef

_SEP = 1  # the comma between two records in the body
_CLOSE = b"]}"  # closes the records list and the body


@dataclass(slots=True)
class _Entry:
    member: Member
    occurred_at: float | None
    encoded: bytes
    refs: list[SourceRef]


@dataclass(slots=True)
class _Open:
    destination: Destination
    opened_at: float
    members: dict[str, _Entry] = field(default_factory=dict)
    size_bytes: int = 0
    first_event_at: float | None = None


@dataclass(slots=True)
class EncodedBatch:
    """A batch ready to send: the model batch, its exact request body and each record's JSON in
    `batch.records` order (kept, so that dead-lettering or splitting never parses a body)."""

    batch: Batch
    body: bytes
    records: list[bytes]

    def halves(self) -> tuple[EncodedBatch, EncodedBatch] | None:
        """The batch in two, each with its exact body (a refused batch is bisected); None for
        a single record."""
        count = len(self.records)
        if count < 2:
            return None
        joined = sum(map(len, self.records)) + count - 1
        prefix = self.body[: len(self.body) - joined - len(_CLOSE)]
        middle = count // 2
        return self._part(prefix, slice(0, middle)), self._part(prefix, slice(middle, None))

    def _part(self, prefix: bytes, part: slice) -> EncodedBatch:
        batch = self.batch
        return _encoded(
            batch.destination,
            prefix,
            self.records[part],
            batch.records[part],
            batch.sources[part],
            batch.first_event_at,
        )


def envelope_size(destination: Destination, target_types: tuple[str, ...]) -> int:
    """Bytes of the request body around the records (`{"audienceId":..,"records":[]}`)."""
    return len(
        orjson.dumps(
            records_body(destination.audience_id, destination.connection_id, [], target_types)
        )
    )


class Batcher:
    """Accumulates records per destination; hands out batches that respect both limits."""

    def __init__(
        self,
        *,
        max_records: int,
        max_bytes: int,
        linger_s: float,
        target_types: tuple[str, ...] = (),
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._max_records = max_records
        self._max_bytes = max_bytes
        self._linger_s = linger_s
        self._target_types = target_types
        self._clock = clock
        self._open: dict[str, _Open] = {}  # by audience key
        self._envelope: dict[str, int] = {}

    def add(
        self, destination: Destination, record: MemberRecord, *refs: SourceRef
    ) -> list[EncodedBatch]:
        """Add one record and the source events it answers for; returns the batches that
        became full (usually none)."""
        encoded = record.json
        envelope = self._envelope_for(destination)
        if envelope + len(encoded) > self._max_bytes:
            raise RecordTooLargeError(len(encoded), self._max_bytes - envelope)
        ready: list[EncodedBatch] = []
        acc = self._open.get(destination.audience)
        if acc is None:
            acc = self._open[destination.audience] = _Open(destination, self._clock())
        key = record.external_user_id
        previous = acc.members.get(key)
        carried: list[SourceRef] = []
        if previous is not None:
            if _is_older(record.occurred_at, previous.occurred_at):
                previous.refs.extend(refs)  # superseded on arrival: answered for by the newer
                return ready
            # the newer change replaces it, and may be larger: it must fit like any other
            acc.size_bytes -= len(previous.encoded) + _SEP
            carried = previous.refs
            del acc.members[key]
        # `envelope + size_bytes + len` is the body's exact size with this record added
        if acc.members and (
            len(acc.members) >= self._max_records
            or envelope + acc.size_bytes + len(encoded) > self._max_bytes
        ):
            ready.append(self._close(destination.audience))
            acc = self._open[destination.audience] = _Open(destination, self._clock())
        member = Member(record.external_user_id, record.action)
        acc.members[key] = _Entry(member, record.occurred_at, encoded, [*carried, *refs])
        acc.size_bytes += len(encoded) + _SEP
        if record.occurred_at is not None and (
            acc.first_event_at is None or record.occurred_at < acc.first_event_at
        ):
            acc.first_event_at = record.occurred_at
        if len(acc.members) >= self._max_records:
            ready.append(self._close(destination.audience))
        return ready

    def due(self) -> list[EncodedBatch]:
        """Batches whose first record has waited `linger_s`."""
        deadline = self._clock() - self._linger_s
        return [self._close(k) for k, acc in list(self._open.items()) if acc.opened_at <= deadline]

    def flush_all(self) -> list[EncodedBatch]:
        return [self._close(k) for k in list(self._open)]

    def next_due_in(self) -> float | None:
        """Seconds until the oldest open batch lingers out, or None when nothing is open."""
        if not self._open:
            return None
        oldest = min(acc.opened_at for acc in self._open.values())
        return max(0.0, oldest + self._linger_s - self._clock())

    def open_records(self) -> int:
        return sum(len(acc.members) for acc in self._open.values())

    def _envelope_for(self, destination: Destination) -> int:
        size = self._envelope.get(destination.audience)
        if size is None:
            size = self._envelope[destination.audience] = envelope_size(
                destination, self._target_types
            )
        return size

    def _close(self, audience: str) -> EncodedBatch:
        acc = self._open.pop(audience)
        entries = list(acc.members.values())
        prefix = orjson.dumps(
            records_body(
                acc.destination.audience_id, acc.destination.connection_id, [], self._target_types
            )
        )[: -len(_CLOSE)]  # the empty records list's closing `]}` comes after the records
        return _encoded(
            acc.destination,
            prefix,
            [e.encoded for e in entries],
            [e.member for e in entries],
            [e.refs for e in entries],
            acc.first_event_at,
        )


def _encoded(
    destination: Destination,
    prefix: bytes,
    records: list[bytes],
    members: list[Member],
    sources: list[list[SourceRef]],
    first_event_at: float | None,
) -> EncodedBatch:
    """The batch of `records` (JSON each) behind the body's `prefix` (`{..,"records":[`)."""
    body = b"".join((prefix, b",".join(records), _CLOSE))
    batch = Batch(destination, members, sources, len(body), first_event_at)
    return EncodedBatch(batch, body, records)


class RecordTooLargeError(ValueError):
    """One record alone does not fit into `batch.max_bytes` (it is dead-lettered)."""

    def __init__(self, size: int, room: int) -> None:
        super().__init__(f"record of {size} bytes exceeds the {room} bytes a batch has room for")


def _is_older(new: float | None, old: float | None) -> bool:
    return new is not None and old is not None and new < old
