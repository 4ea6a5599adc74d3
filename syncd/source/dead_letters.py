"""The dead-letter producer: unusable events and refused members go to the dead-letter topic,
with headers saying why, and a send returns only once the broker acknowledged it.

Without a dead-letter topic a dead letter is counted and logged, nothing more.
"""

from __future__ import annotations

import asyncio
import itertools
import time

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError, MessageSizeTooLargeError

from syncd.config import KafkaConfig
from syncd.model import SourceRef
from syncd.observability import metrics
from syncd.observability.logging import get_logger
from syncd.source.connection import client_options

log = get_logger("syncd.source")

REASON_HEADER = "syncd-reason"
SOURCE_HEADER = "syncd-source"
DETAIL_HEADER = "syncd-detail"
KIND_HEADER = "syncd-kind"
VALUE_DROPPED_HEADER = "syncd-value-dropped"
DLQ_RETRY_BACKOFF_S = (0.5, 1.0, 2.0, 5.0)
DLQ_MAX_REQUEST_BYTES = 16 * 1024 * 1024  # the broker applies its own limit (see _send_dead_letter)
# a send failing this long (e.g. a missing topic on a cluster that does not create topics, or a
# partition of it without a leader): the source is not `flowing`, and /readyz says so while the
# events waiting on it hold the commits
DLQ_UNREADY_AFTER_S = 30.0


class DeadLetterProducer:
    """Produces to `cfg.dead_letter_topic` (if set). `closing` is set by the source when it
    stops: a send still failing then gives up instead of retrying."""

    def __init__(self, cfg: KafkaConfig) -> None:
        self._cfg = cfg
        self._producer: AIOKafkaProducer | None = None
        self.closing = False
        # sends not acknowledged yet that failed: monotonic time of each one's first failure
        self._failing_since: dict[int, float] = {}
        self._sends = itertools.count()

    @property
    def flowing(self) -> bool:
        """False while a send has been failing for DLQ_UNREADY_AFTER_S (others may go
        through meanwhile: one partition of the topic without a leader)."""
        oldest = min(self._failing_since.values(), default=None)
        return oldest is None or time.monotonic() - oldest < DLQ_UNREADY_AFTER_S

    async def start(self) -> None:
        if self._cfg.dead_letter_topic:
            self._producer = AIOKafkaProducer(
                acks="all", max_request_size=DLQ_MAX_REQUEST_BYTES, **client_options(self._cfg)
            )
            await self._producer.start()

    async def stop(self) -> None:
        if self._producer is not None:
            await self._producer.stop()
            self._producer = None

    async def event(
        self, ref: SourceRef, key: bytes | None, value: bytes | None, reason: str, detail: str
    ) -> None:
        """Send the bytes of (or made for) the event at `ref`, its reason and source in headers.
        `detail` must hold no PII."""
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

    async def member(self, value: bytes, reason: str, detail: str) -> None:
        """Send a member dead letter (see `members.dead_letter_value`: a record Amazon refused,
        hashed) with headers syncd-kind: member, its reason class and Amazon's message."""
        metrics.EVENTS_DEAD_LETTERED.labels(reason).inc()
        if self._producer is None:
            log.warning("member dead-lettered (no dead-letter topic)", reason=reason)
            return
        headers = [(KIND_HEADER, b"member"), (REASON_HEADER, reason.encode())]
        if detail:
            headers.append((DETAIL_HEADER, detail.encode()))
        await self._send_dead_letter(None, value, headers, "member")
        log.info("member dead-lettered", reason=reason)

    async def _send_dead_letter(
        self, key: bytes | None, value: bytes | None, headers: list[tuple[str, bytes]], where: str
    ) -> None:
        """Produce until acknowledged: the source offset must not be committed before the dead
        letter is durable, so a broker outage holds it (and backpressure follows) instead of
        losing it. A message the topic refuses as too large goes with an empty value and no key,
        and a header saying so. Gives up (raises) only once the source is stopping: nothing is
        committed after that."""
        assert self._producer is not None
        send = next(self._sends)
        try:
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
                    self._failing_since.setdefault(send, time.monotonic())
                    if self.closing:
                        raise
                    delay = DLQ_RETRY_BACKOFF_S[min(attempt, len(DLQ_RETRY_BACKOFF_S) - 1)]
                    log.warning(
                        "dead-letter send failed; retrying",
                        source=where,
                        error=repr(exc),
                        retry_in_s=delay,
                    )
                    await asyncio.sleep(delay)  # backoff before the next attempt
        finally:  # acknowledged, or given up (stopping, cancelled): no longer failing
            self._failing_since.pop(send, None)
