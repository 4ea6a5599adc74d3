"""Deliver: per connection, claim due members, send them as batches under the budget and an
adaptive concurrency limit, and store each job with its members' sent state.

    member table -> claim (MemberFeed) -> batches -> [connection open?] -> budget.acquire
                 -> [limit slot] -> POST -> settle -> job row + members sent (one transaction)

The feed claims what is due (live changes first, shared fairly between the connection's
audiences), waits up to `batch.linger_ms` for more when a claim is not full, renews the leases
of everything it holds while it waits, retries or pauses, and gives them back at shutdown: a
member out of budget or behind a blocked connection waits in the table, one per member.

Every POST has a reservation of its own, settled by what the answer proves: confirmed when
Amazon accepted it or may have (202, 5xx: re-stamped now), kept unconfirmed when no answer came
(a timeout: it counts two windows), released only when nothing was accepted (429, 400/401/403/
404/413, a connection that could not be opened, a failed token request). Then, per outcome:

- 202: store the job row and the members' sent state, fenced on the claims (a store outage
  holds the sender until it is back; a lost lease stores the job row alone).
- 400 (the records): bisect. The part is split in halves, each POSTed on its own, level by
  level, until the refused records stand alone; only those are refused (member dead letters
  with Amazon's message, marked invalid until they change), the rest is delivered. Bounded:
  once `BISECT_LIMIT` parts of two or more records were refused and none accepted, refusals
  are not about single records (a bad audienceId): a setup fault, cause `bad_request`. Refusals
  naming a field a record takes from its event (`records[i].hashedPII...`) never count.
- 401 (after a fresh token), 403, 404: a setup fault. The connection is blocked: the worker
  that met it holds its batch and probes with it after a pause (doubling up to `max_pause_s`),
  the other workers wait and the feed claims nothing more; nothing is dead-lettered.
  syncd_connection_blocked{connection,cause} is 1 until a probe is accepted.
- 429 the client could not wait out (a Retry-After longer than its retry time): the connection
  pauses for the Retry-After (cause `throttled`), then resends.
- 5xx, timeouts, anything unexpected: resent after a pause; failing for longer than
  `failing_after_s`, the connection is blocked the same way (cause `failing`).
A setup fault `syncd run`'s start-up checks find (those of `check-config --online`: terms,
connection, an audience's metadata) blocks the connection the same way before its first POST
(`block`); its prober re-runs the checks instead of resending a part, never POSTing records.
LwA refusing the refresh token (AuthError) is not the connection's: it stops the sender and
makes the daemon fatal (unready, waiting for new credentials); nothing is marked sent.
429s also halve the connection's concurrency (AIMD) and successes grow it back.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from syncd.amazon.retry import nothing_accepted, retry_reason
from syncd.batching import EncodedBatch, build_batches
from syncd.errors import AmazonError, AuthError, RejectedError, RetryableError, ThrottledError
from syncd.members import RECONCILE, Claim, JobIdReused, MemberDeadLetters, dead_letter_value
from syncd.model import Action, Batch, Destination
from syncd.observability import metrics
from syncd.observability.logging import get_logger
from syncd.store import NewJob, persist
from syncd.store.reasons import OTHER, classify_invalid_reason

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


class Outcomes(Protocol):
    """Where a sender's answers go (the MemberFeed in the daemon)."""

    async def accepted(self, part: EncodedBatch, job: NewJob) -> None:
        """Store the job and its members' sent state; raises while the store is unreachable."""

    async def refused(self, part: EncodedBatch, detail: str) -> None:
        """Amazon refused these records alone (`detail`: its message). Must not raise."""


RECORD_REFUSALS = frozenset({400, 413})  # about the records: bisect
SETUP_FAULTS = {401: "unauthorized", 403: "forbidden", 404: "not_found"}
# Refused parts of 2+ records, with nothing of the batch accepted, that make a bisect a setup
# fault: a bad audienceId costs 15 POSTs (every eighth of the batch refused), not thousands.
# Refusals naming a field of a record that comes from its event (`records[i].hashedPII...`,
# `.userConsent...`, `.externalUserId...`) do not count: a batch of bad events is not a setup
# fault. Any other field (`countryCode`: the destination's default) may be wrong for all.
BISECT_LIMIT = 15
_NAMES_AN_EVENT_FIELD = re.compile(r"records\[\d+\]\.(hashedPII|userConsent|externalUserId)")
# A 400 whose message names one of these is about the request, not a record: a setup fault
# at once, whatever the batch's size (a small batch never reaches BISECT_LIMIT).
_REQUEST_FIELDS = ("audienceid", "targetresource", "connectionid", "request body")
ADVICE = {
    "unauthorized": "Amazon refuses requests for this connection even with a fresh access "
    "token: check that the user of the refresh token still has access to it",
    "forbidden": "Amazon forbids sending to this connection: accept the AMC terms (`syncd "
    "terms accept`) or restore the user's permission on the connection",
    "not_found": "the audience or the connection is gone: check the destination's audience_id "
    "and connection_id (`syncd connections list`)",
    "bad_request": "Amazon refuses every part of the batch, not single records: check the "
    "destination's audience_id and connection_id",
    "throttled": "Amazon asked to wait (Retry-After); sending resumes after it",
    "failing": "record POSTs keep failing (5xx, timeouts): check Amazon's status and the network",
}


@dataclass(slots=True)
class _Delivery:
    """One batch on its way: its parts still to send (level by level) and what they met."""

    parts: deque[EncodedBatch]
    accepted: int = 0  # parts Amazon accepted
    refused_groups: int = 0  # parts of 2+ records Amazon refused
    failures: int = 0  # pauses in a row (sets the next one)
    failing_since: float | None = None


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
    """Sends one connection's batches; `run()` owns the worker tasks. The connection is open,
    or blocked while one worker (the prober) waits out a fault and resends to find its end."""

    def __init__(
        self,
        connection_id: str,
        *,
        poster: RecordsPoster,
        budget: BudgetGate,
        outcomes: Outcomes,
        max_concurrency: int,
        pause_s: float = 5.0,
        max_pause_s: float = 300.0,
        failing_after_s: float = 300.0,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        on_block: Callable[[str, str], None] = lambda connection_id, cause: None,
    ) -> None:
        self.connection_id = connection_id
        self._on_block = on_block  # told (connection_id, cause) when it blocks, "" when it opens
        self._poster = poster
        self._budget = budget
        self._outcomes = outcomes
        self._pause_s = pause_s
        self._max_pause_s = max_pause_s
        self._failing_after_s = failing_after_s
        self._clock = clock
        self._sleep = sleep
        self._queue: asyncio.Queue[EncodedBatch] = asyncio.Queue()
        self._limit = AdaptiveLimit(max_concurrency, label=connection_id)
        self._workers = max_concurrency
        self._busy = 0
        self._inflight = metrics.INFLIGHT_REQUESTS.labels(connection_id)
        # set while the connection is blocked: the task probing it (or `block`'s token until
        # its prober runs)
        self._prober: object | None = None
        self._cause = ""
        self._blocked_at = 0.0
        self._open = asyncio.Event()
        self._open.set()
        self._changed = asyncio.Event()  # set when a batch finished or the connection opened
        for cause in ADVICE:  # every cause is a series from the start: 0 until it blocks
            metrics.CONNECTION_BLOCKED.labels(connection_id, cause).set(0)

    def submit(self, batch: EncodedBatch) -> None:
        self._queue.put_nowait(batch)

    @property
    def backlog(self) -> int:
        """Batches queued or being delivered."""
        return self._queue.qsize() + self._busy

    @property
    def blocked(self) -> str:
        """The cause the connection is blocked for, or "" while it is open."""
        return self._cause

    @property
    def workers(self) -> int:
        return self._workers

    async def wait_for_room(self, max_backlog: int) -> None:
        """Return once the connection is open and fewer than `max_backlog` batches wait or are
        under way (the feed claims no more than the sender can start on soon)."""
        while self._cause or self.backlog >= max_backlog:
            self._changed.clear()
            await self._changed.wait()

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
                await self._deliver(encoded)
            finally:
                self._busy -= 1
                self._queue.task_done()
                self._changed.set()

    async def _deliver(self, encoded: EncodedBatch) -> None:
        """Send the batch until each of its records is accepted or rejected on its own."""
        delivery = _Delivery(deque([encoded]))
        while delivery.parts:
            part = delivery.parts[0]
            await self._wait_until_open()
            outcome = await self._attempt(part)
            if isinstance(outcome, str):
                delivery.parts.popleft()
                delivery.accepted += 1
                delivery.failures = 0
                delivery.failing_since = None
                self._resume()
                await self._accepted(part, outcome)
            else:
                await self._failed(delivery, part, outcome)

    async def _attempt(self, part: EncodedBatch) -> str | AmazonError:
        """One POST under a reservation of its own, settled by what the answer proves. Returns
        the jobRequestId or the error; raises only AuthError (LwA refused the credentials)."""
        dest = part.batch.destination
        async with self._limit:
            reservation = await self._budget.acquire(dest.connection_id, len(part.batch.records))
            self._inflight.inc()
            try:
                job_id = await self._poster.post_records(
                    part.body, connection_id=dest.connection_id, on_throttle=self._limit.on_throttle
                )
            except AuthError:
                await self._budget.release(reservation)
                raise
            except AmazonError as exc:
                error = exc
            except Exception as exc:  # a sender survives any answer: outcome unknown, resent
                log.error("records POST failed unexpectedly", error=repr(exc)[:300])
                error = AmazonError(f"records_post: unexpected failure ({type(exc).__name__})")
            else:
                self._limit.on_success()
                await self._budget.confirm(reservation)
                return job_id
            finally:
                self._inflight.dec()
        if nothing_accepted(error):
            await self._budget.release(reservation)
        elif error.status is not None:
            await self._budget.confirm(reservation)  # answered: whatever Amazon did is done
        # else no answer: Amazon may still take it in; unconfirmed, it counts longer (store)
        outcome = "rejected" if isinstance(error, RejectedError) else "failed"
        metrics.BATCHES_SENT.labels(dest.connection_id, dest.audience, outcome).inc()
        return error

    async def _failed(self, delivery: _Delivery, part: EncodedBatch, exc: AmazonError) -> None:
        status = exc.status if isinstance(exc, RejectedError) else None
        if status in RECORD_REFUSALS:
            await self._refused(delivery, part, exc)
        elif status in SETUP_FAULTS:
            await self._hold(SETUP_FAULTS[status], exc, self._pause(delivery))
        elif isinstance(exc, ThrottledError):
            # the client could not wait this out: the whole connection waits the Retry-After
            await self._hold("throttled", exc, max(exc.retry_after or 0.0, self._pause(delivery)))
        else:  # 5xx, no answer, another refusal: resent; reported once it lasts
            now = self._clock()
            if delivery.failing_since is None:
                delivery.failing_since = now
            pause = self._pause(delivery)
            if isinstance(exc, RetryableError):
                metrics.REQUEST_RETRIES.labels("records_post", retry_reason(exc)).inc()
            if now - delivery.failing_since >= self._failing_after_s:
                await self._hold("failing", exc, pause)
                return
            log.warning(
                "batch not delivered; will resend",
                connection=self.connection_id,
                audience=part.batch.destination.audience,
                records=len(part.batch.records),
                status=exc.status,
                error=str(exc),
                retry_in_s=round(pause, 3),
            )
            await self._sleep(pause)

    async def _refused(self, delivery: _Delivery, part: EncodedBatch, exc: AmazonError) -> None:
        """Amazon refused the part's records (400): bisect down to the refusing records."""
        if self._is_prober() and self._cause == "bad_request":
            delivery.parts.rotate(-1)  # still refused: probe with another part next time
            await self._hold("bad_request", exc, self._pause(delivery))
            return
        if any(field in str(exc).lower() for field in _REQUEST_FIELDS):
            await self._hold("bad_request", exc, self._pause(delivery))
            return
        records = len(part.batch.records)
        if records > 1:
            if not _NAMES_AN_EVENT_FIELD.search(str(exc)):
                delivery.refused_groups += 1
            if delivery.accepted == 0 and delivery.refused_groups >= BISECT_LIMIT:
                await self._hold("bad_request", exc, self._pause(delivery))
                return
            halves = part.halves()
            if halves is not None:
                self._resume()  # Amazon read the request: the setup is not what fails
                delivery.parts.popleft()
                delivery.parts.extend(halves)
                return
        self._resume()
        delivery.parts.popleft()
        dest = part.batch.destination
        log.warning(
            "records refused by amazon; dead-lettered",
            connection=dest.connection_id,
            audience=dest.audience,
            records=records,
            status=exc.status,
            error=str(exc),
        )
        await self._outcomes.refused(part, f"status={exc.status}: {exc}"[:300])

    def _pause(self, delivery: _Delivery) -> float:
        """The next pause of this delivery: `pause_s`, doubling up to `max_pause_s`."""
        pause = min(self._max_pause_s, self._pause_s * 2.0 ** min(delivery.failures, 30))
        delivery.failures += 1
        return pause

    # -- blocking ------------------------------------------------------------------------------

    def _is_prober(self) -> bool:
        return self._prober is not None and self._prober is asyncio.current_task()

    async def _wait_until_open(self) -> None:
        while self._prober is not None and not self._is_prober():
            await self._open.wait()

    async def _hold(self, cause: str, exc: AmazonError, pause_s: float) -> None:
        """Block the connection for `cause`. The first worker to block it probes: it waits
        `pause_s` and returns to resend its part; any other waits until the connection opens."""
        if self._prober is not None and not self._is_prober():
            await self._wait_until_open()
            return
        if self._prober is None:
            self._prober = asyncio.current_task()
            self._open.clear()
            self._blocked_at = self._clock()
        self._report(cause, exc, pause_s)
        await self._sleep(pause_s)

    def block(
        self,
        cause: str,
        exc: AmazonError,
        check: Callable[[], Awaitable[tuple[str, AmazonError] | None]],
    ) -> Callable[[], Awaitable[None]]:
        """Block the connection now for a setup fault found without a POST (`syncd run`'s
        start-up checks), as a refused POST would: the feed claims nothing, the metric and the
        log say why. Returns the prober, to run as a task: where a worker would resend its part
        after each pause, it runs `check` (the fault's cause and error while it lasts, None once
        it cleared; never a records POST), and it opens the connection once the fault cleared."""
        token = object()  # the prober until its task runs
        self._prober = token
        self._open.clear()
        self._blocked_at = self._clock()
        self._report(cause, exc, self._pause_s)

        async def probe() -> None:
            if self._prober is not token:
                return
            self._prober = asyncio.current_task()
            delivery = _Delivery(deque())  # paces the checks as a part's resends are paced
            await self._sleep(self._pause(delivery))
            while (fault := await check()) is not None:
                await self._hold(*fault, self._pause(delivery))
            self._resume()

        return probe

    def _report(self, cause: str, exc: AmazonError, pause_s: float) -> None:
        """Set the metric and log the block (once per cause: a probe that meets it again logs
        at info)."""
        if cause != self._cause:
            if self._cause:
                metrics.CONNECTION_BLOCKED.labels(self.connection_id, self._cause).set(0)
            metrics.CONNECTION_BLOCKED.labels(self.connection_id, cause).set(1)
            self._cause = cause
            self._on_block(self.connection_id, cause)
            level = log.warning if cause == "throttled" else log.error
            level(
                f"connection blocked ({cause}): its records and offsets wait; {ADVICE[cause]}",
                connection=self.connection_id,
                cause=cause,
                status=exc.status,
                error=str(exc),
                retry_in_s=round(pause_s, 3),
            )
        else:
            log.info(
                "connection still blocked; will probe again",
                connection=self.connection_id,
                cause=cause,
                status=exc.status,
                retry_in_s=round(pause_s, 3),
            )

    def _resume(self) -> None:
        """The prober got through: open the connection again."""
        if not self._is_prober():
            return
        metrics.CONNECTION_BLOCKED.labels(self.connection_id, self._cause).set(0)
        log.info(
            "connection resumed",
            connection=self.connection_id,
            cause=self._cause,
            blocked_for_s=round(self._clock() - self._blocked_at, 3),
        )
        self._prober = None
        self._cause = ""
        self._on_block(self.connection_id, "")
        self._open.set()
        self._changed.set()

    # -- accepted ------------------------------------------------------------------------------

    async def _accepted(self, part: EncodedBatch, job_id: str) -> None:
        batch = part.batch
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
        await persist(lambda: self._outcomes.accepted(part, job), what=f"job row {job_id}")
        self._record_sent(batch)

    def _record_sent(self, batch: Batch) -> None:
        dest = batch.destination
        adds = sum(1 for r in batch.records if r.action is Action.ADD)
        removes = len(batch.records) - adds
        if adds:
            metrics.RECORDS_SENT.labels(dest.connection_id, dest.audience, "add").inc(adds)
        if removes:
            metrics.RECORDS_SENT.labels(dest.connection_id, dest.audience, "remove").inc(removes)
        metrics.BATCHES_SENT.labels(dest.connection_id, dest.audience, "accepted").inc()
        metrics.BATCH_RECORDS.observe(len(batch.records))
        metrics.BATCH_BYTES.observe(batch.size_bytes)
        if batch.first_event_at is not None:
            metrics.END_TO_END_LATENCY.observe(max(0.0, time.time() - batch.first_event_at))


# -- the feed: claims of the member table -> batches -------------------------------------------


class Members(Protocol):
    """What the feed needs of `MemberTable` (fakes in tests)."""

    async def claim_due(
        self, audience_ids: Sequence[int], limit: int, lease_s: float, owner: str
    ) -> list[Claim]: ...
    async def renew(self, claims: Sequence[Claim], lease_s: float) -> list[Claim]: ...
    async def release(self, claims: Sequence[Claim]) -> None: ...
    async def store_job(
        self, claims: Sequence[Claim], job: NewJob, *, first_poll_after_s: float
    ) -> list[Claim]: ...
    async def refuse(self, claims: Sequence[Claim], reason: str) -> list[Claim]: ...
    async def waiting(self, audience_ids: Sequence[int], rank: int | None = None) -> int: ...


class BlockStore(Protocol):
    async def set_blocked(self, connection_id: str, cause: str) -> None: ...


class BlockLog:
    """The store's copy of which connections are blocked and why, for `syncd members show`
    (the metric is this replica's alone): a sender's `on_block`. Each connection's newest state
    is written, in the background, and written again after a store error."""

    def __init__(self, store: BlockStore, retry_s: float = 5.0) -> None:
        self._store = store
        self._retry_s = retry_s
        self._wanted: dict[str, str] = {}
        self._written: dict[str, str] = {}
        self._changed = asyncio.Event()

    def __call__(self, connection_id: str, cause: str) -> None:
        self._wanted[connection_id] = cause
        self._changed.set()

    async def run(self) -> None:
        while True:
            await self._changed.wait()
            self._changed.clear()
            for connection_id, cause in list(self._wanted.items()):
                if self._written.get(connection_id) == cause:
                    continue
                try:
                    await self._store.set_blocked(connection_id, cause)
                except Exception as exc:  # the store is down: try again
                    log.warning(
                        "blocked connection not recorded in the store; retrying",
                        connection=connection_id,
                        error=repr(exc)[:300],
                    )
                    self._changed.set()
                    await asyncio.sleep(self._retry_s)
                    break
                self._written[connection_id] = cause


IDLE_CLAIM_S = 1.0  # nothing due: look again this often (changes other replicas recorded)
RECORD_TOO_LARGE = "record_too_large"


class MemberFeed:
    """One connection's feed: claims its due members, builds the batches its sender delivers,
    and stores what each answer proves (`Outcomes`). Every claim it holds (lingering, queued,
    under way, blocked, waiting for budget) is renewed until the answer is stored."""

    def __init__(
        self,
        connection_id: str,
        destinations: Sequence[Destination],
        *,
        members: Members,
        dead_letters: MemberDeadLetters,
        owner: str,
        lease_s: float,
        max_records: int,
        max_bytes: int,
        linger_s: float,
        first_poll_after_s: float,
        target_types: tuple[str, ...] = (),
        idle_s: float = IDLE_CLAIM_S,
    ) -> None:
        self.connection_id = connection_id
        self._destinations = {d.audience_id: d for d in destinations}
        self._audience_ids = sorted(self._destinations)
        self._members = members
        self._dead_letters = dead_letters
        self._owner = owner
        self._lease_s = lease_s
        self._max_records = max_records
        self._max_bytes = max_bytes
        self._linger_s = linger_s
        self._first_poll_after_s = first_poll_after_s
        self._target_types = target_types
        self._idle_s = idle_s
        self._held: set[Claim] = set()  # claimed and not yet stored as sent, refused or released
        # accepted jobs whose row the store did not take yet (retried by the sender): nothing is
        # claimed meanwhile, since their members' leases may have run out
        self._unstored: set[str] = set()
        self._wake = asyncio.Event()
        self._claiming_done = asyncio.Event()
        self._waiting = metrics.MEMBER_CHANGES_WAITING.labels(connection_id)
        self._reconcile_waiting = metrics.RECONCILE_WAITING.labels(connection_id)

    def wake(self) -> None:
        """Changes of this connection were recorded: claim now rather than at the next look."""
        self._wake.set()

    @property
    def held(self) -> int:
        return len(self._held)

    async def run(self, sender: ConnectionSender, stop: asyncio.Event) -> None:
        """Claim and hand batches to `sender` until `stop`; keep renewing the leases of what is
        held until cancelled (the sender finishes its batches after `stop`)."""
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self._renew_forever())
            try:
                while not stop.is_set():
                    # one claim ahead of the sender's workers: what is claimed waits in
                    # memory (a batch's records, in its claims) until its POST
                    await _until(sender.wait_for_room(sender.workers + 1), stop)
                    if stop.is_set():
                        break
                    for batch in await self._claim_batches(stop):
                        sender.submit(batch)
            finally:
                self._claiming_done.set()

    async def stopped_claiming(self) -> None:
        """Return once `run` claims no more (after its stop: what it lingered on is submitted)."""
        await self._claiming_done.wait()

    async def release_held(self) -> None:
        """Give back every claim still held (shutdown): due again for any replica at once."""
        held, self._held = list(self._held), set()
        if held:
            try:
                await self._members.release(held)
            except Exception as exc:  # their leases run out instead
                log.warning("claims not released", error=repr(exc)[:300], members=len(held))

    # -- claiming ------------------------------------------------------------------------------
    async def _claim_batches(self, stop: asyncio.Event) -> list[EncodedBatch]:
        """What is due now; when fewer than max_records, what else comes within linger_ms
        (not at shutdown). None due: waits for a wake-up or `idle_s`, returns nothing."""
        self._wake.clear()
        claims = await self._claim(self._max_records)
        if not claims:
            await _until(self._wake.wait(), stop, self._idle_s)
            return []
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._linger_s
        while (
            len(claims) < self._max_records
            and not stop.is_set()
            and (left := deadline - loop.time()) > 0
        ):
            self._wake.clear()
            await _until(self._wake.wait(), stop, min(left, self._idle_s))
            if not stop.is_set():
                claims += await self._claim(self._max_records - len(claims))
        return await self._batches(claims)

    async def _claim(self, limit: int) -> list[Claim]:
        if self._unstored:  # its members would be claimed again, and sent twice
            await asyncio.sleep(self._idle_s)
            return []
        try:
            claims = await self._members.claim_due(
                self._audience_ids, limit, self._lease_s, self._owner
            )
        except Exception as exc:  # store outage: nothing claimed, try again later
            log.warning("claiming due members failed", error=repr(exc)[:300])
            await asyncio.sleep(self._idle_s)
            return []
        self._held.update(claims)
        return claims

    async def _batches(self, claims: list[Claim]) -> list[EncodedBatch]:
        by_audience: dict[int, list[Claim]] = {}
        for claim in claims:
            by_audience.setdefault(claim.audience_id, []).append(claim)
        out: list[EncodedBatch] = []
        for audience_id, group in by_audience.items():
            batches, too_large = build_batches(
                self._destinations[audience_id],
                group,
                max_records=self._max_records,
                max_bytes=self._max_bytes,
                target_types=self._target_types,
            )
            out += batches
            if too_large:
                detail = f"record larger than the {self._max_bytes} bytes a batch has room for"
                await self._refuse(too_large, RECORD_TOO_LARGE, detail)
        return out

    async def _renew_forever(self) -> None:
        """Renew every third of the lease; the first round at once counts what is waiting."""
        while True:
            try:
                await self.renew_held()
            except Exception as exc:  # store outage: try again next round
                log.warning("renewing claims failed", error=repr(exc)[:300])
            await asyncio.sleep(self._lease_s / 3)

    async def renew_held(self) -> None:
        """Extend the lease of every claim held; drop those another sender took over."""
        if self._held:
            lost = await self._members.renew(list(self._held), self._lease_s)
            lost = [c for c in lost if c in self._held]  # not settled meanwhile
            if lost:
                self._held.difference_update(lost)
                log.warning(
                    "claims lost (lease ran out); another sender may send them",
                    connection=self.connection_id,
                    members=len(lost),
                )
        self._waiting.set(await self._members.waiting(self._audience_ids))
        self._reconcile_waiting.set(await self._members.waiting(self._audience_ids, RECONCILE))

    # -- outcomes ------------------------------------------------------------------------------
    async def accepted(self, part: EncodedBatch, job: NewJob) -> None:
        # no longer renewed: a renewal racing this write would take the claims it settles for
        # lost ones (their token is cleared)
        self._held.difference_update(part.claims)
        try:
            lost = await self._members.store_job(
                part.claims, job, first_poll_after_s=self._first_poll_after_s
            )
        except JobIdReused as exc:  # settled as a refusal: never resent in a loop
            log.warning(
                "Amazon answered a POST with the jobRequestId of another POST's job; its "
                "members are dead-lettered",
                job_request_id=job.job_request_id,
                members=len(part.claims),
            )
            await self._refuse(part.claims, OTHER, str(exc))
            return
        except Exception:
            self._unstored.add(job.job_request_id)
            raise
        self._unstored.discard(job.job_request_id)
        if lost:
            log.warning(
                "job stored, but some members' claims were lost before its 202 was; the job "
                "alone follows them",
                job_request_id=job.job_request_id,
                members=len(lost),
            )

    async def refused(self, part: EncodedBatch, detail: str) -> None:
        await self._refuse(part.claims, classify_invalid_reason(detail), detail)

    async def _refuse(self, claims: Sequence[Claim], reason: str, detail: str) -> None:
        """Dead-letter each refused member (after the broker's ack), then mark it invalid.
        Never raises: a member not marked is claimed again once its lease runs out."""
        try:
            for claim in claims:
                dest = self._destinations[claim.audience_id]
                value = dead_letter_value(
                    dest.audience,
                    dest.audience_id,
                    claim.external_user_id,
                    claim.action,
                    claim.record,
                )
                await self._dead_letters.dead_letter_member(value, reason, detail)
            self._held.difference_update(claims)  # settled next: see `accepted`
            await persist(lambda: self._members.refuse(claims, reason), what="refused members")
        except Exception as exc:
            log.error("refused members not settled", error=repr(exc)[:300], members=len(claims))
        finally:
            self._held.difference_update(claims)


async def _until(
    awaitable: Awaitable[Any], stop: asyncio.Event, timeout: float | None = None
) -> None:
    """Wait for `awaitable`, `stop` or `timeout`, whichever comes first."""
    waits = {asyncio.ensure_future(awaitable), asyncio.ensure_future(stop.wait())}
    _, pending = await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    for task in pending:
        task.cancel()


async def cancel_and_wait(task: asyncio.Task[None]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
