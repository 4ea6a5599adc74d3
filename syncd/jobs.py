"""The job poller: follows every stored job until Amazon reports a terminal state.

Each round claims due jobs, no more than it GETs at once (`poll.concurrency`; atomically and
leased, so replicas share the work), GETs each one's status at once and records it. The lease
therefore starts at the GET, and a GET still under way when the lease would run out is given up
(a failed poll): no other replica can claim a job while its GET is under way. A result is
recorded through `persist` (a store hiccup delays it, never loses it), fenced on the claim (see
Store.record_poll). A PENDING job is polled again after an interval that doubles from
`poll.first_delay_s` up to `poll.max_interval_s`; a terminal job is never claimed, so never
polled, again. A failed GET is retried on the same schedule, except once Amazon has answered
404 ("unknown job") for UNKNOWN_JOB_GIVE_UP_S with no status of the job between (the hour
starts at the first 404 since its last status, stored with the job): it is EXPIRED then rather
than at `poll.max_job_age_s`, a failed send of its members (UNKNOWN_JOB). A refused credential
(AuthError) stops the poller. Every HOUSEKEEPING_EVERY_S: jobs older than `poll.max_job_age_s`
are expired (EXPIRED, terminal), terminal jobs older than `poll.retention_days` deleted, and the
jobs-by-state gauge refreshed.

A terminal job's outcome goes to its members (`MemberOutcomes`) before the terminal state is
stored: SUCCEEDED/COMPLETED confirm them; PARTIALLYSUCCEEDED marks its invalidRecords invalid and
dead-letters them with Amazon's reason; FAILED and EXPIRED make them due again (FAILED ones, and
those of a job given up on 404s, are dead-lettered after MAX_FAILED_SENDS failed sends, counted
until one is accepted). Applying first means a crash in between polls the job again and
applies nothing twice (the members no longer reference it). The dead letters are queued in the
store by the transaction that applies the outcome, and `MemberOutcomes.run` sends them apart
from polling: a broker outage holds them, not the polls; a crash or a stop before they are sent
(or a write retried after its COMMIT's reply was lost) loses none.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from collections import Counter
from collections.abc import Callable, Mapping
from typing import Protocol

from syncd.amazon.api import JobStatus
from syncd.config import PollConfig
from syncd.errors import AmazonError, AuthError, RejectedError
from syncd.members import DeadMember, MemberDeadLetters, MemberTable, dead_letter_value
from syncd.observability import metrics
from syncd.observability.logging import get_logger
from syncd.store import JobRow, persist
from syncd.store.reasons import classify_invalid_reason, invalid_reason_counts
from syncd.vocabulary import JobState

log = get_logger("syncd.jobs")

IDLE_MAX_S = 1.0  # longest sleep between rounds: jobs added meanwhile (any replica) are noticed
HOUSEKEEPING_EVERY_S = 10.0  # expiry, retention and the jobs-by-state gauge
GET_SHARE_OF_LEASE = 0.9  # a GET is given up after this share of the lease (the rest: margin)
DAY_S = 86400.0
MAX_FAILED_SENDS = 5  # a member whose sends ended FAILED this often in a row is dead-lettered
DEAD_LETTERS_PER_LEASE = 100
# a queued dead letter being sent is leased this long, renewed while its send lasts: taken by
# another process only once its sender died
DEAD_LETTER_LEASE_S = 30.0
# a job Amazon has answered 404 ("unknown job") for this long, with no status between, is given
# up: EXPIRED, a failed send of its members (UNKNOWN_JOB). Sooner, a 404 may be Amazon not
# showing a new job yet, or a fault on the way (a gateway) while Amazon still processes the
# job: sending its members again then spends their budget twice and may let the older change
# overtake a newer one.
UNKNOWN_JOB_GIVE_UP_S = 3600.0
# the members' reason class of such a give-up: counted as a failed send, since were every GET
# to answer 404 (an api_url of another region that still takes POSTs), resending without a
# count would spend their budget each hour for good
UNKNOWN_JOB = "unknown_job"
DEAD_LETTER_SWEEP_S = 10.0  # how often queued dead letters left by another process are looked for


class JobClient(Protocol):
    async def get_job(self, job_request_id: str) -> JobStatus: ...


class JobStore(Protocol):
    async def expire_jobs(self, max_age_s: float) -> int: ...
    async def claim_due_jobs(self, owner: str, limit: int, lease_s: float) -> list[JobRow]: ...
    async def record_poll(
        self,
        claim: JobRow,
        status: JobStatus | None,
        *,
        next_poll_in_s: float,
        error: str | None = None,
        unknown_since: float | None = None,
    ) -> bool: ...
    async def purge_jobs(self, older_than_s: float) -> int: ...
    async def next_due_in(self) -> float | None: ...
    async def job_counts(self) -> dict[str, int]: ...


class JobOutcomes(Protocol):
    async def finished(self, job: JobRow, status: JobStatus, *, unknown: bool = False) -> None: ...
    async def settle_expired(self) -> None: ...


class MemberOutcomes:
    """Applies terminal jobs to the member table and dead-letters the members they refuse
    (value and headers: see `members.dead_letter_value`, `KafkaSource.dead_letter_member`)."""

    def __init__(
        self,
        members: MemberTable,
        dead_letters: MemberDeadLetters,
        audiences: Mapping[int, str],
        *,
        max_attempts: int = MAX_FAILED_SENDS,
        lease_s: float = DEAD_LETTER_LEASE_S,
    ) -> None:
        self._members = members
        self._lease_s = lease_s  # of the dead letters being sent
        self._dead_letters = dead_letters
        self._audiences = audiences  # audience_id -> the config's audience key
        self._max_attempts = max_attempts
        self._queued = asyncio.Event()  # an outcome queued dead letters: `run` sends them

    async def finished(self, job: JobRow, status: JobStatus, *, unknown: bool = False) -> None:
        """Applies the outcome to the members, retried until the store takes it, and queues
        the dead letters it calls for in the same transaction (`run` sends them). A job given
        up as `unknown` to Amazon is a failed send of its members (UNKNOWN_JOB)."""
        details = {r.external_id: r.error for r in status.invalid_records if r.external_id}
        invalid = {euid: classify_invalid_reason(error) for euid, error in details.items()}
        outcome = await persist(
            lambda: self._members.apply_job_outcome(
                job.job_request_id,
                JobState.FAILED if unknown else status.job_state,
                invalid,
                max_attempts=self._max_attempts,
                reason=UNKNOWN_JOB if unknown else None,
                details=details,
            ),
            what=f"members of job {job.job_request_id}",
        )
        # none confirmed nor marked: a write retried after its COMMIT's reply was lost found
        # the members settled by the first (whose dead letters are queued)
        if outcome.confirmed or outcome.invalid:
            marked = {dead.external_user_id for dead in outcome.invalid}
            unmatched = sum(1 for r in status.invalid_records if r.external_id not in marked)
            if unmatched:  # nothing says which members they were: those count as confirmed
                log.warning(
                    "invalid records name no member of their job; its members count as confirmed",
                    job_request_id=job.job_request_id,
                    invalid_records=len(status.invalid_records),
                    unmatched=unmatched,
                )
        if outcome.invalid or outcome.dead:
            self._queued.set()

    async def run(self, stop: asyncio.Event) -> None:
        """Sends the queued member dead letters until `stop` is set: those a job outcome just
        queued, and every DEAD_LETTER_SWEEP_S those a crashed or stopped process left (once
        their lease ran out). Apart from polling: a broker outage holds the dead letters, not
        the polls."""
        while not stop.is_set():
            self._queued.clear()  # those queued from now on: another round at once
            try:
                await self.send_dead_letters()
                await self._count_queued()
            except Exception as exc:  # the store or the broker: try again at the next sweep
                log.warning("member dead letters not sent; retrying", error=repr(exc)[:300])
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._queued.wait(), timeout=DEAD_LETTER_SWEEP_S)

    async def send_dead_letters(self) -> None:
        """Sends the queued member dead letters no other process is sending, each forgotten
        only after the broker acknowledged it; the source retries the broker until it does."""
        lease = functools.partial(
            self._members.lease_dead_letters, DEAD_LETTERS_PER_LEASE, self._lease_s
        )
        while letters := await persist(lease, what="member dead letters"):
            ids = [x.id for x in letters]
            renewing = asyncio.create_task(self._renew(ids))
            try:
                for letter in letters:
                    await self._dead_letter(letter.member, letter.detail)
            finally:
                renewing.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await renewing
            sent = functools.partial(self._members.dead_letters_sent, ids)
            await persist(sent, what="member dead letters sent")

    async def _renew(self, ids: list[int]) -> None:
        """Keep the lease of dead letters being sent while the broker takes its time (an
        outage): no other process sends them meanwhile."""
        while True:
            await asyncio.sleep(self._lease_s / 3)
            try:
                await self._members.renew_dead_letters(ids, self._lease_s)
                await self._count_queued()  # a broker outage: they pile up meanwhile
            except Exception as exc:  # the store: the lease may run out, a duplicate at worst
                log.warning("member dead-letter lease not renewed", error=repr(exc)[:300])

    async def _count_queued(self) -> None:
        metrics.MEMBER_DEAD_LETTERS_QUEUED.set(await self._members.dead_letters_queued())

    async def settle_expired(self) -> None:
        """Make the members of every expired job due again (the same action is sent again).
        Looks for them in the member table, so an expiry a crash interrupted is settled too."""
        while expired := await self._members.expired_jobs():
            for job_request_id in expired:
                await self._members.apply_job_outcome(job_request_id, JobState.EXPIRED)

    async def _dead_letter(self, dead: DeadMember, detail: str) -> None:
        value = dead_letter_value(
            self._audiences.get(dead.audience_id, ""),
            dead.audience_id,
            dead.external_user_id,
            dead.action,
            dead.record,
        )
        await self._dead_letters.dead_letter_member(value, dead.reason, detail)


def poll_interval(polls: int, cfg: PollConfig) -> float:
    """Seconds until the next poll of a job polled `polls` times: first_delay_s doubled per poll,
    capped at max_interval_s."""
    return min(cfg.max_interval_s, cfg.first_delay_s * 2.0 ** min(polls, 40))


class Poller:
    """Polls due jobs until `run`'s stop event is set."""

    def __init__(
        self,
        store: JobStore,
        client: JobClient,
        cfg: PollConfig,
        *,
        owner: str,
        lease_s: float = 330.0,
        outcomes: JobOutcomes | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """`lease_s`: how long a claim holds. It should outlive one GET with all its retries (a
        GET is given up at GET_SHARE_OF_LEASE of it); a crashed owner's jobs come back to the
        others when it runs out. `outcomes`: where terminal jobs go (None: polling alone)."""
        self._store = store
        self._client = client
        self._cfg = cfg
        self._owner = owner
        self._lease_s = lease_s
        self._outcomes = outcomes
        self._clock = clock
        self._auth_error: AuthError | None = None
        self._housekept_at: float | None = None
        self._failed_in_row: Counter[str] = Counter()  # audience key -> FAILED jobs in a row

    async def run(self, stop: asyncio.Event) -> None:
        """Poll rounds until `stop` is set. Refused credentials (AuthError) end the loop with
        the error, which makes the daemon fatal (and unready) instead of polling in vain."""
        while not stop.is_set():
            try:
                wait_s = await self.poll_once()
            except AuthError as exc:
                log.error("job polling stopped: credentials refused", error=str(exc))
                raise
            except Exception as exc:  # store unreachable: keep the loop alive, try again
                log.warning("job poll round failed; retrying", error=repr(exc))
                wait_s = IDLE_MAX_S
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=wait_s)

    async def poll_once(self) -> float:
        """One round. Returns the seconds until the next round is due (0 = more are due now)."""
        limit = min(self._cfg.claim_batch, self._cfg.concurrency)
        claimed = await self._store.claim_due_jobs(self._owner, limit, self._lease_s)
        if claimed:
            async with asyncio.TaskGroup() as tg:
                for job in claimed:
                    tg.create_task(self._poll(job))
            if self._auth_error is not None:
                raise self._auth_error
        await self._housekeeping()
        if len(claimed) >= limit:
            return 0.0
        due_in = await self._store.next_due_in()
        return IDLE_MAX_S if due_in is None else min(due_in, IDLE_MAX_S)

    async def _poll(self, job: JobRow) -> None:
        next_poll_in_s = poll_interval(job.polls + 1, self._cfg)
        try:
            async with asyncio.timeout(self._lease_s * GET_SHARE_OF_LEASE):
                status = await self._client.get_job(job.job_request_id)
        except AuthError as exc:
            self._auth_error = exc
            return
        except Exception as exc:  # this job's poll failed; the round's other polls go on
            unknown_since = self._unknown_since(job, exc)
            if (
                unknown_since is not None
                and self._clock() - unknown_since >= UNKNOWN_JOB_GIVE_UP_S
                and isinstance(exc, RejectedError)
                and exc.status == 404
            ):
                status = JobStatus(job.job_request_id, JobState.EXPIRED)
                error = f"Amazon does not know the job ({exc}); given up"
                log.warning(
                    "Amazon does not know a job; given up as EXPIRED, a failed send of its"
                    " members (due again, or dead-lettered after max attempts)",
                    job_request_id=job.job_request_id,
                    age_s=round(self._clock() - job.created_at),
                    unknown_for_s=round(self._clock() - unknown_since),
                )
                await self._store_status(job, status, next_poll_in_s, error, unknown=True)
                return
            if isinstance(exc, AmazonError):
                error = str(exc)
            elif isinstance(exc, TimeoutError):
                error = "no answer within the lease"
            else:  # an answer of a shape no one foresaw: a bug to report, not a reason to stop
                error = f"unexpected answer ({type(exc).__name__})"
            metrics.JOB_POLLS.labels("error").inc()
            log.warning(
                "job poll failed; will retry",
                job_request_id=job.job_request_id,
                status=getattr(exc, "status", None),
                error=error,
            )
            await self._record(job, None, next_poll_in_s, error, unknown_since)
            return
        await self._store_status(job, status, next_poll_in_s)

    def _unknown_since(self, job: JobRow, exc: Exception) -> float | None:
        """When the 404s Amazon answers to the job began, this failed poll included: the first
        since its last status (another failure, a 5xx or a timeout, neither starts nor ends
        them). The stored start counts only while the job's last poll failed: a status that an
        older release recorded leaves it as it was."""
        since = job.unknown_since if job.error is not None else None
        if since is None and isinstance(exc, RejectedError) and exc.status == 404:
            return self._clock()
        return since

    async def _store_status(
        self,
        job: JobRow,
        status: JobStatus,
        next_poll_in_s: float,
        error: str | None = None,
        *,
        unknown: bool = False,
    ) -> None:
        """Store a poll's status; a terminal one goes to the job's members first (`unknown`: a
        job given up on Amazon's 404s)."""
        if status.terminal and self._outcomes is not None:
            await self._outcomes.finished(job, status, unknown=unknown)
        stored = await self._record(job, status, next_poll_in_s, error)
        if status.terminal:
            metrics.JOB_POLLS.labels("terminal").inc()
            if stored:  # else another replica stored the end first (and counted it)
                self._finished(job, status)
        else:
            metrics.JOB_POLLS.labels("pending").inc()

    def _count_for_audience(self, audience: str, status: JobStatus) -> None:
        """The audience's match figures and its run of FAILED jobs (the audience alerts)."""
        if status.received_record_size is not None:
            received = metrics.AUDIENCE_JOB_RECORDS.labels(audience, "received")
            received.inc(status.received_record_size)
        if status.id_resolution_count is not None:
            matched = metrics.AUDIENCE_JOB_RECORDS.labels(audience, "matched")
            matched.inc(status.id_resolution_count)
        failed = self._failed_in_row[audience] + 1 if status.job_state == JobState.FAILED else 0
        self._failed_in_row[audience] = failed
        metrics.AUDIENCE_FAILED_JOBS.labels(audience).set(failed)

    async def _record(
        self,
        job: JobRow,
        status: JobStatus | None,
        next_poll_in_s: float,
        error: str | None = None,
        unknown_since: float | None = None,
    ) -> bool:
        """Store one poll's result, retried until the store takes it."""
        return await persist(
            lambda: self._store.record_poll(
                job,
                status,
                next_poll_in_s=next_poll_in_s,
                error=error,
                unknown_since=unknown_since,
            ),
            what="job poll result",
        )

    def _finished(self, job: JobRow, status: JobStatus) -> None:
        metrics.JOBS_FINISHED.labels(status.job_state).inc()
        self._count_for_audience(job.audience, status)
        metrics.JOB_COMPLETION.observe(max(0.0, self._clock() - job.created_at))
        if status.processed_rate is not None:
            metrics.JOB_PROCESSED_RATE.observe(status.processed_rate)
        for reason, n in invalid_reason_counts(status.invalid_records).items():
            metrics.INVALID_RECORDS.labels(reason).inc(n)
        log.info(
            "job finished",
            job_request_id=job.job_request_id,
            connection=job.connection_id,
            audience=job.audience,
            state=status.job_state,
            records=job.records,
            polls=job.polls + 1,
            processed_rate=status.processed_rate,
            invalid_records=len(status.invalid_records),
        )

    async def _housekeeping(self) -> None:
        """Expire, delete past retention and refresh the gauge, every HOUSEKEEPING_EVERY_S."""
        now = time.monotonic()
        if self._housekept_at is not None and now - self._housekept_at < HOUSEKEEPING_EVERY_S:
            return
        self._housekept_at = now
        expired = await self._store.expire_jobs(self._cfg.max_job_age_s)
        if expired:
            metrics.JOBS_FINISHED.labels(JobState.EXPIRED).inc(expired)
            log.warning(
                "jobs expired without a terminal state; no longer polled, their members due",
                jobs=expired,
                max_job_age_s=self._cfg.max_job_age_s,
            )

        if self._outcomes is not None:
            await self._outcomes.settle_expired()
        deleted = await self._store.purge_jobs(self._cfg.retention_days * DAY_S)
        if deleted:
            log.info(
                "terminal jobs past retention deleted",
                jobs=deleted,
                retention_days=self._cfg.retention_days,
            )
        counts = await self._store.job_counts()
        for state in {*JobState, *counts}:
            metrics.JOBS.labels(state).set(counts.get(state, 0))
