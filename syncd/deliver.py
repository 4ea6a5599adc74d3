"""Deliver: per connection, send batches under the budget and an adaptive concurrency limit,
store each job row, then acknowledge the batch's source events.

    queue -> [limit slot] -> budget.acquire -> POST -> budget.confirm -> store job -> ack

- A batch Amazon rejects (400/403/404: the data or setup is wrong) releases its reservation, is
  dead-lettered with Amazon's reason, and is acknowledged: the rest flows on.
- A batch that did not get through is sent again after a pause, under a new reservation: it is
  never dropped and never acknowledged early. Its old reservation is released when Amazon
  answered (429/5xx after the client's retries: nothing was accepted) and kept when the outcome
  is unknown (a timeout or a dropped connection: Amazon may have accepted it). The client never
  resends a records POST itself after an unknown outcome, so every POST Amazon may count has a
  reservation of its own.
- The job row is stored before the acknowledgement; a store outage holds the acknowledgement
  (and so the Kafka commit) back until the row is written.
- 429s halve the connection's concurrency (AIMD); successes grow it back, so throttling slows the
  whole connection, not only the one request.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from typing import Protocol

from syncd.batching import EncodedBatch
from syncd.errors import AmazonError, AuthError, FatalError
from syncd.model import Action, Batch
from syncd.observability import metrics
from syncd.observability.logging import get_logger
from syncd.store import NewJob, persist

log = get_logger("syncd.deliver")


class RecordsPoster(Protocol):
    async def post_records(
        self,
        body: bytes,
        *,
        connection_id: str,
        on_throttle: Callable[[float | None], None] | None = None,
    ) -> str: ...


class BudgetGate(Protocol):
    async def acquire(self, connection_id: str, records: int) -> int: ...
    async def release(self, reservation_id: int) -> None: ...
    async def confirm(self, reservation_id: int) -> None: ...


class JobSink(Protocol):
    async def add_job(self, job: NewJob, *, first_poll_after_s: float) -> None: ...


Ack = Callable[[Batch, str], None]  # (batch, jobRequestId)
Reject = Callable[[EncodedBatch, str], Awaitable[None]]


class AdaptiveLimit:
    """AIMD concurrency limit: halve on throttling (at most once per `cooldown_s`), +1 per
    `limit` successes. Waiters are woken in FIFO order."""

    def __init__(
        self,
        maximum: int,
        *,
        label: str,
        cooldown_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._max = maximum
        self._limit = float(maximum)
        self._in_use = 0
        self._cond = asyncio.Condition()
        self._cooldown_s = cooldown_s
        self._last_cut = -cooldown_s
        self._clock = clock
        self._gauge = metrics.CONNECTION_CONCURRENCY.labels(label)
        self._gauge.set(maximum)

    @property
    def limit(self) -> int:
        return int(self._limit)

    def on_throttle(self, retry_after: float | None = None) -> None:
        now = self._clock()
        if now - self._last_cut >= self._cooldown_s:
            self._last_cut = now
            self._limit = max(1.0, self._limit / 2)
            self._gauge.set(self.limit)

    def on_success(self) -> None:
        if self._limit < self._max:
            self._limit = min(float(self._max), self._limit + 1 / self._limit)
            self._gauge.set(self.limit)

    async def __aenter__(self) -> None:
        async with self._cond:
            await self._cond.wait_for(lambda: self._in_use < int(self._limit))
            self._in_use += 1

    async def __aexit__(self, *exc: object) -> None:
        async with self._cond:
            self._in_use -= 1
            self._cond.notify_all()


class ConnectionSender:
    """Sends one connection's batches; `run()` owns the worker tasks."""

    def __init__(
        self,
        connection_id: str,
        *,
        poster: RecordsPoster,
        budget: BudgetGate,
        jobs: JobSink,
        ack: Ack,
        reject: Reject,
        max_concurrency: int,
        first_poll_after_s: float,
        retry_pause_s: float = 5.0,
    ) -> None:
        self.connection_id = connection_id
        self._poster = poster
        self._budget = budget
        self._jobs = jobs
        self._ack = ack
        self._reject = reject
        self._first_poll_after_s = first_poll_after_s
        self._retry_pause_s = retry_pause_s
        self._queue: asyncio.Queue[EncodedBatch] = asyncio.Queue()
        self._limit = AdaptiveLimit(max_concurrency, label=connection_id)
        self._workers = max_concurrency
        self._busy = 0
        self._inflight = metrics.INFLIGHT_REQUESTS.labels(connection_id)

    def submit(self, batch: EncodedBatch) -> None:
        self._queue.put_nowait(batch)

    @property
    def backlog(self) -> int:
        """Batches queued or being delivered."""
        return self._queue.qsize() + self._busy

    async def run(self) -> None:
        """Run the workers until cancelled."""
        async with asyncio.TaskGroup() as tg:
            for _ in range(self._workers):
                tg.create_task(self._worker())

    async def drained(self) -> None:
        """Return once every submitted batch is delivered (or rejected)."""
        await self._queue.join()

    async def _worker(self) -> None:
        while True:
            encoded = await self._queue.get()
            self._busy += 1
            try:
                async with self._limit:
                    self._inflight.inc()
                    try:
                        await self._deliver(encoded)
                    finally:
                        self._inflight.dec()
            finally:
                self._busy -= 1
                self._queue.task_done()

    async def _deliver(self, encoded: EncodedBatch) -> None:
        batch = encoded.batch
        dest = batch.destination
        labels = (dest.connection_id, dest.audience)
        while True:
            reservation = await self._budget.acquire(dest.connection_id, len(batch.records))
            try:
                job_id = await self._poster.post_records(
                    encoded.body,
                    connection_id=dest.connection_id,
                    on_throttle=self._limit.on_throttle,
                )
            except AuthError:
                await self._budget.release(reservation)
                raise
            except FatalError as exc:
                await self._budget.release(reservation)
                metrics.BATCHES_SENT.labels(*labels, "rejected").inc()
                log.error(
                    "batch rejected by amazon",
                    connection=dest.connection_id,
                    audience=dest.audience,
                    records=len(batch.records),
                    status=exc.status,
                    error=str(exc),
                )
                await self._reject(encoded, f"amazon_rejected status={exc.status}: {exc}")
                return
            except AmazonError as exc:
                outcome_unknown = exc.status is None
                if not outcome_unknown:
                    await self._budget.release(reservation)
                metrics.BATCHES_SENT.labels(*labels, "failed").inc()
                log.warning(
                    "batch not delivered; will resend",
                    connection=dest.connection_id,
                    audience=dest.audience,
                    records=len(batch.records),
                    error=str(exc),
                    outcome_unknown=outcome_unknown,
                    retry_in_s=self._retry_pause_s,
                )
                await asyncio.sleep(self._retry_pause_s)
                continue
            break
        self._limit.on_success()
        await self._budget.confirm(reservation)
        await self._store_job(batch, job_id)
        self._record_sent(batch, len(encoded.body))
        self._ack(batch, job_id)

    async def _store_job(self, batch: Batch, job_id: str) -> None:
        adds = sum(1 for r in batch.records if r.action is Action.ADD)
        job = NewJob(
            job_request_id=job_id,
            connection_id=batch.destination.connection_id,
            audience_id=batch.destination.audience_id,
            audience=batch.destination.audience,
            records=len(batch.records),
            adds=adds,
            removes=len(batch.records) - adds,
        )
        await persist(
            lambda: self._jobs.add_job(job, first_poll_after_s=self._first_poll_after_s),
            what=f"job row {job_id}",
        )

    def _record_sent(self, batch: Batch, body_bytes: int) -> None:
        dest = batch.destination
        adds = sum(1 for r in batch.records if r.action is Action.ADD)
        removes = len(batch.records) - adds
        if adds:
            metrics.RECORDS_SENT.labels(dest.connection_id, dest.audience, "add").inc(adds)
        if removes:
            metrics.RECORDS_SENT.labels(dest.connection_id, dest.audience, "remove").inc(removes)
        metrics.BATCHES_SENT.labels(dest.connection_id, dest.audience, "accepted").inc()
        metrics.BATCH_RECORDS.observe(len(batch.records))
        metrics.BATCH_BYTES.observe(body_bytes)
        if batch.first_event_at is not None:
            metrics.END_TO_END_LATENCY.observe(max(0.0, time.time() - batch.first_event_at))


async def cancel_and_wait(task: asyncio.Task[None]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
