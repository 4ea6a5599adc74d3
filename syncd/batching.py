"""Claimed members -> request bodies that respect `batch.max_records` and `batch.max_bytes`.
Pure: no I/O.

A claim carries its member's record already encoded (the API's record object); a body is the
envelope around the concatenation of its records' bytes, so every size is exact and nothing is
encoded twice. A body is joined only when its POST starts and dropped with the answer: batches
waiting for the sender hold their records once, in their claims. Each claim holds one member
(the table keeps one change per member), so there is nothing to merge: the latest change won in
the member table.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import orjson

from syncd.amazon.api import records_body
from syncd.members import Claim
from syncd.model import Batch, Destination, Member

_COMMA = b","  # between two records in the body
_CLOSE = b"]}"  # closes the records list and the body


@dataclass(slots=True)
class EncodedBatch:
    """A batch ready to send: the model batch (`size_bytes` is its body's), the body's start,
    each record's JSON and the claim it was built from, in `batch.records` order (kept, so that
    dead-lettering, marking or splitting never parses a body)."""

    batch: Batch
    prefix: bytes  # the body up to its first record
    records: list[bytes]
    claims: list[Claim]

    @property
    def body(self) -> bytes:
        """The exact request body, joined anew on each call (one per POST attempt)."""
        return b"".join((self.prefix, _COMMA.join(self.records), _CLOSE))

    def halves(self) -> tuple[EncodedBatch, EncodedBatch] | None:
        """The batch in two, each with its exact body (a refused batch is bisected); None for
        a single record."""
        count = len(self.records)
        if count < 2:
            return None
        middle = count // 2
        return self._part(slice(0, middle)), self._part(slice(middle, None))

    def _part(self, part: slice) -> EncodedBatch:
        batch = self.batch
        return _encoded(
            batch.destination,
            self.prefix,
            self.records[part],
            self.claims[part],
            batch.records[part],
            batch.first_event_at,
        )


def envelope_size(destination: Destination, target_types: tuple[str, ...]) -> int:
    """Bytes of the request body around the records (`{"audienceId":..,"records":[]}`)."""
    return len(_prefix(destination, target_types)) + len(_CLOSE)


def build_batches(
    destination: Destination,
    claims: Sequence[Claim],
    *,
    max_records: int,
    max_bytes: int,
    target_types: tuple[str, ...] = (),
) -> tuple[list[EncodedBatch], list[Claim]]:
    """The claims of one destination as bodies of at most `max_records` records and
    `max_bytes` bytes, in claim order; and the claims whose record alone is too large for any
    body (they can never be sent)."""
    prefix = _prefix(destination, target_types)
    envelope = len(prefix) + len(_CLOSE)
    batches: list[EncodedBatch] = []
    too_large: list[Claim] = []
    taken: list[Claim] = []
    size = 0  # the records' bytes with their separators

    def close() -> None:
        nonlocal size
        batches.append(_batch(destination, prefix, taken))
        taken.clear()
        size = 0

    for claim in claims:
        length = len(claim.record)
        if envelope + length > max_bytes:
            too_large.append(claim)
            continue
        grown = size + length + (len(_COMMA) if taken else 0)
        if taken and (len(taken) >= max_records or envelope + grown > max_bytes):
            close()
            grown = length
        taken.append(claim)
        size = grown
    if taken:
        close()
    return batches, too_large


def _prefix(destination: Destination, target_types: tuple[str, ...]) -> bytes:
    """The body up to its first record (`{..,"records":[`)."""
    empty = records_body(destination.audience_id, destination.connection_id, [], target_types)
    return orjson.dumps(empty)[: -len(_CLOSE)]


def _batch(destination: Destination, prefix: bytes, claims: list[Claim]) -> EncodedBatch:
    live = [c.occurred_at for c in claims if not c.refresh]
    return _encoded(
        destination,
        prefix,
        [c.record for c in claims],
        list(claims),
        [Member(c.external_user_id, c.api_action) for c in claims],
        min(live) if live else None,
    )


def _encoded(
    destination: Destination,
    prefix: bytes,
    records: list[bytes],
    claims: list[Claim],
    members: list[Member],
    first_event_at: float | None,
) -> EncodedBatch:
    """The batch of `records` (JSON each) behind the body's `prefix`."""
    commas = max(len(records) - 1, 0) * len(_COMMA)
    size = len(prefix) + sum(map(len, records)) + commas + len(_CLOSE)
    return EncodedBatch(Batch(destination, members, size, first_event_at), prefix, records, claims)
