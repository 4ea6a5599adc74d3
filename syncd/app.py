"""The one place that wires syncd's stages, in flow order (see README "How it works"):

    ingest:  source -> transform (decode, route, hash; worker processes)
             -> record (member table: one write per chunk) -> commit
    senders: per connection, claim due members -> batch -> deliver (budget, POST)
             -> job row + members' sent state (one transaction); a connection the start-up
             checks (those of check-config --online) find a setup fault in starts blocked
    side loops: job poller (outcomes -> members), audiences (metadata, TTL refresh, tombstone
                purge), offset commits, store health, token, HTTP

Ingest and sending meet only in the member table: a connection out of budget or blocked keeps
its changes there (one per member) while reading goes on; a commit follows the recording, not
Amazon's answer, and a replay of recorded events sends nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import itertools
import os
import socket
import time
import uuid
from asyncio import FIRST_COMPLETED
from collections.abc import Awaitable, Callable
from typing import Any

from syncd import config as config_mod
from syncd.amazon.client import AmazonClient
from syncd.audiences import AudienceWatcher
from syncd.budget import Budget
from syncd.config import Config
from syncd.deliver import BlockLog, ConnectionSender, MemberFeed, cancel_and_wait
from syncd.errors import AmazonError, AuthError, RetryableError
from syncd.events.canonical import MAX_FUTURE_S
from syncd.jobs import MemberOutcomes, Poller
from syncd.members import (
    ADD,
    MemberChange,
    MemberTable,
    RecordCounts,
    dead_letter_value,
    member_change,
)
from syncd.model import Destination, Erase, MemberRecord, SourceRef
from syncd.observability import metrics
from syncd.observability.http import bound_port, start_http
from syncd.observability.logging import get_logger
from syncd.operate import report_at_start, watch_store_size
from syncd.preflight import AmazonUnreachableError, Finding, setup_faults
from syncd.routing import RouteCounts
from syncd.runtime import compiled
from syncd.source import DLQ_RETRY_BACKOFF_S, KafkaSource, Message, OffsetTracker
from syncd.store import Store, persist
from syncd.store.store import require_writable, store_problems
from syncd.transform import Outcome, Refused, Spec
from syncd.transform_pool import Transformer

log = get_logger("syncd.app")

Chunk = tuple[list[Message], Awaitable[tuple[list[Outcome], RouteCounts]]]
HEALTH_INTERVAL_S = 2.0
CHUNK_EVENTS = 2000  # messages per fetch, transformed as one chunk (fewer when less is buffered)
MAX_CHUNKS = 3  # chunks fetched and not yet recorded (in the transform, or waiting for their turn)
CAP_PAUSE_AFTER_S = 1.0  # at max_pending_events: wait this long unpaused (see _wait_for_room)
BLOCKED_PROBE_FACTOR = 5  # a blocked connection's probes back off to 5 x amazon.backoff_max_s
# Claims of due members are leased for this long and renewed every third of it while held: a
# replica that dies (SIGKILL, OOM) leaves its members to the others this soon.
CLAIM_LEASE_S = 30.0
# The start-up checks of the setup (and a blocked connection's checks again) are given up after
# this: Amazon's retries through an outage must not hold the start back (nothing is blocked).
SETUP_CHECK_TIMEOUT_S = 30.0
# An SQLite write waits this long for another process's lock, then fails and is retried
# (`persist`): a shutdown waits for one such statement at most, not the commands' 30 s.
DAEMON_BUSY_TIMEOUT_S = 5.0


class Pipeline:
    """Ingest: consumes, transforms and records each chunk's member changes in the member
    table; marks the chunk's events done once that is durable (their offsets commit then)."""

    def __init__(
        self,
        cfg: Config,
        source: KafkaSource,
        tracker: OffsetTracker,
        members: MemberTable,
        transformer: Transformer,
        wake: Callable[[str], None] = lambda connection_id: None,
    ) -> None:
        self._cfg = cfg
        self._source = source
        self._tracker = tracker
        self._members = members
        self._transformer = transformer
        self._wake = wake  # tells a connection's feed that changes of it were recorded
        self._destinations = cfg.destinations
        self._audience_ids = sorted({d.audience_id for d in cfg.destinations})
        self._dead_letters: set[asyncio.Task[None]] = set()
        self._unapplied = 0  # events fetched whose chunk is not recorded yet
        self._progress = asyncio.Event()  # set whenever events become done

    # -- consume ---------------------------------------------------------------------------
    async def consume(self, stop: asyncio.Event) -> None:
        """Fetch and hand chunks to the transform until `stop`; record their outcomes in fetch
        order, meanwhile, to the last chunk fetched."""
        chunks: asyncio.Queue[Chunk | None] = asyncio.Queue()
        slots = asyncio.Semaphore(MAX_CHUNKS)  # a chunk holds one from its fetch to its record
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self._fetch(stop, chunks, slots))
            tg.create_task(self._apply(chunks, slots))

    async def _fetch(
        self, stop: asyncio.Event, chunks: asyncio.Queue[Chunk | None], slots: asyncio.Semaphore
    ) -> None:
        limit = self._cfg.kafka.max_pending_events
        while not stop.is_set():
            metrics.PENDING_EVENTS.set(self.pending)
            await slots.acquire()
            if stop.is_set():
                break
            if self.pending >= limit:
                messages = await self._wait_for_room(limit, stop)
            else:
                if self._source.paused:
                    self._source.resume_all()
                room = min(CHUNK_EVENTS, limit - self.pending)
                messages = await self._source.fetch(timeout_ms=200, max_records=room)
            if messages:
                self._unapplied += len(messages)
                chunks.put_nowait((messages, self._transformer.submit([m.value for m in messages])))
            else:
                slots.release()
        chunks.put_nowait(None)

    async def _wait_for_room(self, limit: int, stop: asyncio.Event) -> list[Message]:
        """At `max_pending_events` (ingest is behind: the store is slow or down, or dead
        letters wait for the broker): wait for progress. Waits unpaused for
        `CAP_PAUSE_AFTER_S` first, which keeps what aiokafka has fetched (pausing drops a
        partition's fetched records, to fetch them again on resume); then pauses every
        partition and keeps polling the consumer, so that the group does not evict it (what a
        partition assigned meanwhile returns is handed on as usual)."""
        self._progress.clear()
        await _first(self._progress.wait(), stop.wait(), asyncio.sleep(CAP_PAUSE_AFTER_S))
        if self.pending < limit or stop.is_set():
            return []
        self._source.pause_all()
        return await self._source.fetch(timeout_ms=200, max_records=1)

    async def _apply(self, chunks: asyncio.Queue[Chunk | None], slots: asyncio.Semaphore) -> None:
        while (item := await chunks.get()) is not None:
            messages, transformed = item
            outcomes, counts = await transformed
            _publish(counts)
            assigned = self._source.assigned  # a partition that moved meanwhile is its new owner's
            mine = [
                (message, outcome)
                for message, outcome in zip(messages, outcomes, strict=True)
                if message.ref.topic_partition in assigned
            ]
            await self._record(mine)
            self._unapplied -= len(messages)
            self._progress.set()
            slots.release()

    async def _record(self, chunk: list[tuple[Message, Outcome]]) -> None:
        """Record the chunk: its changes in one `record_changes` per run between erases (an
        erase applies after the changes before it and before those after it), then mark its
        events done. Unusable events, and records a policy kept back (`consent_missing`), are
        dead-lettered instead (their event is done once the broker has them all); of an
        identifiers-only event, only where the profile is a member (`_settle_updates`)."""
        recorded: list[SourceRef] = []
        changes: list[MemberChange] = []
        connections: set[str] = set()
        updates: list[tuple[SourceRef, list[tuple[int, MemberRecord]]]] = []
        latest_ms = (time.time() + MAX_FUTURE_S) * 1000  # a message timestamp's latest use
        for message, outcome in chunk:
            ref = message.ref
            if _future_stand_in(outcome, message, latest_ms):
                outcome = Refused(
                    "bad_occurred_at",
                    "no occurred_at, and the Kafka message timestamp standing in for it is "
                    "more than 5 minutes in the future",
                )
            if isinstance(outcome, Refused):
                self._dead_letter(message, outcome)
                continue
            if not outcome:  # a tombstone (counted as filtered): nothing to do
                self._tracker.track(ref, 0)
                continue
            if isinstance(outcome, Erase):
                self._tracker.track(ref, 1)
                recorded.append(ref)
                await self._record_changes(changes)
                changes = []
                await self._erase(outcome, message)
                connections.update(d.connection_id for d in self._destinations)
                continue
            held = [(i, r) for i, r in outcome if r.dead_letter]
            self._tracker.track(ref, 1 + len(held))  # done once recorded and each dead letter sent
            recorded.append(ref)
            if all(r.identifiers_only for _, r in outcome):
                updates.append((ref, outcome))
            else:
                for index, record in held:
                    self._send_dead_letter(ref, self._member_dead_letter(index, record))
            for index, record in outcome:
                if record.dead_letter:
                    continue
                destination = self._destinations[index]
                connections.add(destination.connection_id)
                changes.append(
                    member_change(
                        destination.audience_id,
                        record,
                        occurred_at=_occurred_at(record.occurred_at, message),
                        position=ref.offset,
                        identifiers_only=record.identifiers_only,
                    )
                )
        counts = await self._record_changes(changes)
        if updates:
            await self._settle_updates(updates)
        for ref in recorded:
            self._tracker.done(ref)
        if counts.recorded:  # no-ops and older changes leave nothing to claim (a replay)
            for connection_id in connections:
                self._wake(connection_id)

    async def _settle_updates(
        self, updates: list[tuple[SourceRef, list[tuple[int, MemberRecord]]]]
    ) -> None:
        """Identifiers-only events, once recorded: each applies where the profile is a member.
        A record a policy kept back is dead-lettered there, and nowhere else; an event of a
        profile that is a member nowhere had nothing to do (filtered)."""
        keys = {
            (self._destinations[i].audience_id, r.external_user_id)
            for _, outcome in updates
            for i, r in outcome
        }
        members = await persist(lambda: self._members.members_among(keys), what="member lookup")
        nowhere = 0
        for ref, outcome in updates:
            member_of = {
                i
                for i, r in outcome
                if (self._destinations[i].audience_id, r.external_user_id) in members
            }
            nowhere += not member_of
            for index, record in outcome:
                if not record.dead_letter:
                    continue
                if index in member_of:
                    self._send_dead_letter(ref, self._member_dead_letter(index, record))
                else:
                    self._tracker.done(ref)  # nothing to keep back where it is no member
        if nowhere:
            metrics.EVENTS_FILTERED.labels("not_member").inc(nowhere)

    async def _record_changes(self, changes: list[MemberChange]) -> RecordCounts:
        if not changes:
            return RecordCounts()
        counts = await persist(lambda: self._members.record_changes(changes), what="member changes")
        for outcome, n in dataclasses.asdict(counts).items():
            if n:
                metrics.MEMBER_CHANGES.labels(outcome).inc(n)
        return counts

    async def _erase(self, erase: Erase, message: Message) -> None:
        await persist(
            lambda: self._members.erase(
                [erase.external_user_id],
                self._audience_ids,
                occurred_at=_occurred_at(erase.occurred_at, message),
                position=message.ref.offset,
            ),
            what="member erase",
        )

    def _member_dead_letter(
        self, index: int, record: MemberRecord
    ) -> Callable[[], Awaitable[None]]:
        """The send of a record a policy kept back (see routing: `consent_missing`)."""
        dest = self._destinations[index]
        value = dead_letter_value(
            dest.audience, dest.audience_id, record.external_user_id, ADD, record.json
        )
        detail = f"consent_policy strict: {dest.audience!r} needs consent.amzn_user_data"
        return lambda: self._source.dead_letter_member(value, record.dead_letter, detail)

    def _dead_letter(self, message: Message, refused: Refused) -> None:
        """Dead-letter an unusable event; it is done once the broker has it."""
        self._tracker.track(message.ref, 1)
        self._send_dead_letter(
            message.ref,
            functools.partial(self._source.dead_letter, message, refused.reason, refused.detail),
        )

    def _send_dead_letter(self, ref: SourceRef, send: Callable[[], Awaitable[None]]) -> None:
        """Send a dead letter (of an event, or of a member a policy kept back) without holding
        up the partition; one part of the event at `ref` (tracked by the caller) is done only
        once the broker has it. A failed send is retried with backoff; a cancelled one (the
        drain budget ran out) stays not done, so its event is read again."""

        async def run() -> None:
            for attempt in itertools.count():
                try:
                    await send()
                except Exception as exc:  # the source retries broker errors; this is the rest
                    delay = DLQ_RETRY_BACKOFF_S[min(attempt, len(DLQ_RETRY_BACKOFF_S) - 1)]
                    log.warning(
                        "dead letter not sent; retrying", error=repr(exc)[:300], retry_in_s=delay
                    )
                    await asyncio.sleep(delay)
                else:
                    self._tracker.done(ref)
                    self._progress.set()
                    return

        task = asyncio.create_task(run())
        self._dead_letters.add(task)
        task.add_done_callback(self._dead_letters.discard)

    async def dead_letters_sent(self) -> None:
        if self._dead_letters:
            await asyncio.gather(*self._dead_letters, return_exceptions=True)

    @property
    def pending(self) -> int:
        """Events read and not yet recorded or dead-lettered (`kafka.max_pending_events` at
        most)."""
        return self._tracker.pending() + self._unapplied


async def _check_again(
    cfg: Config, client: AmazonClient, sender: ConnectionSender, destinations: list[Destination]
) -> tuple[str, AmazonError] | None:
    """A blocked connection's start-up checks again: its fault (cause, error), None once they
    pass. No verdict (Amazon unreachable, a failure of the check itself) keeps it blocked."""
    try:
        async with asyncio.timeout(SETUP_CHECK_TIMEOUT_S):
            mine = dataclasses.replace(cfg, destinations=tuple(destinations))
            faults = await setup_faults(mine, client)
    except Exception as exc:
        error = AmazonError(f"start-up checks got no verdict: {str(exc)[:300] or repr(exc)}")
        return sender.blocked, error
    finding = faults.get(sender.connection_id)
    return None if finding is None else (finding.cause, _setup_error(finding))


def _setup_error(finding: Finding) -> AmazonError:
    """A failed start-up check as the error a blocked connection reports."""
    return AmazonError(
        f"start-up check: {finding.item}: {finding.detail}",
        status=finding.status,
        operation="setup_check",
    )


def refused_credentials(exc: BaseException | None) -> AuthError | None:
    """The AuthError a task failed with, also where a task group wrapped it (a sender's workers
    meeting the refused token all at once), so that the daemon stays up unready instead of
    exiting; None when the failure is anything else too."""
    if isinstance(exc, AuthError):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        auth, rest = exc.split(AuthError)
        if auth is not None and rest is None:
            return refused_credentials(auth.exceptions[0])
    return None


def _wake(feeds: dict[str, MemberFeed], connection_id: str) -> None:
    """Wake the connection's feed; a connection whose destinations are all paused has none."""
    if (feed := feeds.get(connection_id)) is not None:
        feed.wake()


def _publish(counts: RouteCounts) -> None:
    """What routing counted in a chunk (in a transform worker, or inline), as metrics."""
    for reason, n in counts.filtered.items():
        metrics.EVENTS_FILTERED.labels(reason).inc(n)
    for audience, n in counts.default_country.items():
        metrics.RECORDS_DEFAULT_COUNTRY.labels(audience).inc(n)
    for (pii_field, reason), n in counts.dropped.items():
        metrics.PII_VALUES_DROPPED.labels(pii_field, reason).inc(n)


def _occurred_at(occurred_at: float | None, message: Message) -> float:
    """The event's time, else the Kafka message's. A message without a timestamp (message
    format v0, or -1: none) counts as older than any change: the same on every read, where the
    time it is read would let a replay outrank the changes recorded since."""
    if occurred_at is not None:
        return occurred_at
    stamp = message.timestamp_ms
    return 0.0 if stamp is None or stamp < 0 else stamp / 1000


def _future_stand_in(outcome: Outcome, message: Message, latest_ms: float) -> bool:
    """An event without occurred_at whose message timestamp (its producer's clock) is past
    `latest_ms` (MAX_FUTURE_S ahead): as unusable as such an occurred_at (it would outrank every
    later change of the member), so it is dead-lettered as the decoder does one."""
    stamp = message.timestamp_ms
    if stamp is None or stamp <= latest_ms:
        return False
    if isinstance(outcome, Erase):
        return outcome.occurred_at is None
    return isinstance(outcome, list) and any(r.occurred_at is None for _, r in outcome)


async def _first(*waits: Awaitable[Any]) -> None:
    """Return once the first of `waits` is done; cancel the others."""
    tasks = {asyncio.ensure_future(w) for w in waits}
    _, pending = await asyncio.wait(tasks, return_when=FIRST_COMPLETED)
    for task in pending:
        task.cancel()


class Daemon:
    """`syncd run`: owns every resource and task; `run()` returns the exit code."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.owner = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.store_ok = False
        self.kafka_ok = False
        self.fatal: BaseException | None = None
        self.pipeline: Pipeline | None = None
        self.client: AmazonClient | None = None
        self.source: KafkaSource | None = None
        self.http_port: int | None = None

    def readiness(self) -> dict[str, bool]:
        client = self.client
        return {
            "partitions_assigned": self.source is not None and self.source.ready,
            "kafka": self.kafka_ok,
            "store": self.store_ok,
            "access_token": client is not None and client.token_held and client.fatal_error is None,
            "running": self.fatal is None,
        }

    async def run(self, stop: asyncio.Event) -> int:
        cfg = self.cfg
        config_mod.require_credentials(cfg)
        config_mod.require_destinations(cfg)
        store = await Store.connect(
            cfg.store.url,
            busy_timeout_s=DAEMON_BUSY_TIMEOUT_S,
            statement_timeout_s=cfg.store.statement_timeout_s,
        )
        try:
            with store_problems(cfg.store.url):  # one line naming the store, not a traceback
                await require_writable(store, cfg.store.url)
                created = await store.ensure_schema(auto_upgrade=cfg.store.auto_upgrade)
            if created:
                log.warning(  # expected once; else store.url may not name the store in use
                    "the store had no schema: created it (a new, empty member table)",
                    store=config_mod.mask_urls(cfg.store.url),
                )
            self.store_ok = True
            spec = Spec(
                cfg.destinations,
                cfg.kafka.input_format,
                cfg.kafka.max_message_bytes,
                cfg.pii.strict_reference,
            )
            async with (
                AmazonClient(cfg.amazon) as client,
                Transformer(spec, workers=cfg.transform.workers) as transformer,
            ):
                self.client = client
                await client.ensure_token()
                return await self._run_pipeline(cfg, store, client, transformer, stop)
        finally:
            await store.close()

    async def _run_pipeline(
        self,
        cfg: Config,
        store: Store,
        client: AmazonClient,
        transformer: Transformer,
        stop: asyncio.Event,
    ) -> int:
        tracker = OffsetTracker()
        source = self.source = KafkaSource(cfg.kafka, tracker)
        members = MemberTable(store)
        budget = Budget(store, cfg.budget, hold_s=cfg.amazon.post_flight_s)
        # a GET with all its retries ends within max_retry_time_s + one attempt (+ a token
        # refresh): a job poll's lease
        lease_s = cfg.amazon.max_retry_time_s + 2 * cfg.amazon.request_timeout_s
        feeds: dict[str, MemberFeed] = {}
        senders: dict[str, ConnectionSender] = {}
        blocks = BlockLog(store)
        # a paused destination's changes are recorded and wait: no feed claims its members
        sending = [d for d in cfg.destinations if not d.paused]
        for conn in sorted({d.connection_id for d in sending}):
            feed = feeds[conn] = MemberFeed(
                conn,
                [d for d in sending if d.connection_id == conn],
                members=members,
                dead_letters=source,
                owner=self.owner,
                lease_s=CLAIM_LEASE_S,
                max_records=cfg.batch.max_records,
                max_bytes=cfg.batch.max_bytes,
                linger_s=cfg.batch.linger_ms / 1000,
                first_poll_after_s=cfg.poll.first_delay_s,
                target_types=cfg.amazon.target_types,
            )
            senders[conn] = ConnectionSender(
                conn,
                poster=client,
                budget=budget,
                outcomes=feed,
                max_concurrency=cfg.amazon.max_concurrency,
                # a blocked connection is probed more rarely than a request is retried
                pause_s=cfg.amazon.backoff_base_s,
                max_pause_s=BLOCKED_PROBE_FACTOR * cfg.amazon.backoff_max_s,
                failing_after_s=cfg.amazon.max_retry_time_s,
                on_block=blocks,
            )
            blocks(conn, "")  # open until found blocked: no stale record of an earlier run
        pipeline = self.pipeline = Pipeline(
            cfg, source, tracker, members, transformer, wake=lambda c: _wake(feeds, c)
        )
        runner = await start_http(cfg.http.address, self.readiness)
        self.http_port = bound_port(runner)
        await source.start()
        log.info(
            "syncd started",
            owner=self.owner,
            destinations=len(cfg.destinations),
            connections=len(senders),
            metrics_port=self.http_port,
            transform_compiled=compiled(),
        )
        halt = asyncio.Event()  # stop consuming and claiming: shutdown or a fatal error
        poll_stop = asyncio.Event()
        background: list[asyncio.Task[None]] = []

        def spawn(coro: Awaitable[None], name: str) -> asyncio.Task[None]:
            task = asyncio.ensure_future(coro)
            task.set_name(name)
            task.add_done_callback(lambda t: self._on_task_done(t, halt))
            background.append(task)
            return task

        for conn, probe in (await self._check_setup(cfg, client, senders, sending)).items():
            spawn(probe(), f"setup-check:{conn}")
        for conn, sender in senders.items():
            spawn(sender.run(), f"sender:{conn}")
            spawn(feeds[conn].run(sender, halt), f"feed:{conn}")
        audiences = {d.audience_id: d.audience for d in cfg.destinations}
        outcomes = MemberOutcomes(members, source, audiences)
        poller = Poller(
            store, client, cfg.poll, owner=self.owner, lease_s=lease_s, outcomes=outcomes
        )
        spawn(poller.run(poll_stop), "poller")
        spawn(outcomes.run(poll_stop), "member-dead-letters")
        spawn(blocks.run(), "blocked-connections")
        watcher = AudienceWatcher(client, members, cfg.destinations, cfg.members)
        spawn(watcher.run(halt), "audiences")
        spawn(report_at_start(cfg.destinations, members), "report")
        spawn(watch_store_size(store, halt), "store-size")
        spawn(self._commit_loop(source, halt), "commit")
        spawn(self._health_loop(store, source, halt), "health")
        spawn(self._token_loop(client, halt), "token")
        consume = asyncio.ensure_future(pipeline.consume(halt))
        consume.set_name("consume")
        consume.add_done_callback(lambda t: self._on_task_done(t, halt))
        stop_wait = asyncio.ensure_future(stop.wait())
        halt_wait = asyncio.ensure_future(halt.wait())
        await asyncio.wait({stop_wait, halt_wait}, return_when=asyncio.FIRST_COMPLETED)
        halt.set()
        drain_until = time.monotonic() + cfg.shutdown.drain_seconds
        # the chunks read are recorded within the drain budget; a store that takes no write
        # (down, locked) does not hold the shutdown: their events are not committed, so read again
        await asyncio.wait({consume}, timeout=cfg.shutdown.drain_seconds)
        drained = consume.done()  # else the store is slow or down: claims' leases run out
        if not drained:
            log.warning("events not recorded within the drain budget; they will be read again")
            await cancel_and_wait(consume)
        if isinstance(self.fatal, AuthError):
            # A restart cannot help until someone fixes the credentials: stay up, unready, and
            # quiet (no refresh loop against LwA) until told to stop.
            log.error(
                "syncd stopped delivering: fatal error; waiting for SIGTERM", error=str(self.fatal)
            )
            await stop.wait()
        else:
            # Shutdown, or a task failed (a bug, a broken worker): finish the POSTs under way
            # and store their jobs, then commit what is recorded and exit (1 after a failure,
            # so that the orchestrator restarts syncd).
            left_s = max(0.0, drain_until - time.monotonic())
            finished = await self._drain(feeds, senders, pipeline, left_s)
            drained = drained and finished
        poll_stop.set()
        for task in background:
            task.cancel()
        await asyncio.gather(*background, return_exceptions=True)
        if drained:  # claims given back: due again for any replica at once
            for feed in feeds.values():
                await feed.release_held()
        stop_wait.cancel()
        halt_wait.cancel()
        await source.stop()
        await runner.cleanup()
        log.info("syncd stopped", pending_events=tracker.pending())
        return 1 if self.fatal is not None else 0

    async def _check_setup(
        self,
        cfg: Config,
        client: AmazonClient,
        senders: dict[str, ConnectionSender],
        sending: list[Destination],
    ) -> dict[str, Callable[[], Awaitable[None]]]:
        """The start-up checks (those of `check-config --online`) of the destinations that
        send: a connection a setup fault keeps from sending (terms, connection, an audience's
        metadata) is blocked before its first POST, its changes wait; its prober re-runs its
        checks and opens it once they pass. No verdict blocks nothing (a records POST finds the
        fault then): Amazon unreachable, or the checks failing on their own (a bug, an answer
        they do not expect; a single answer must not stop syncd). Refused credentials are the
        token loop's."""
        try:
            async with asyncio.timeout(SETUP_CHECK_TIMEOUT_S):
                checked = dataclasses.replace(cfg, destinations=tuple(sending))
                faults = await setup_faults(checked, client)
        except (AmazonUnreachableError, TimeoutError) as exc:
            log.warning(
                "start-up checks got no verdict from amazon; nothing blocked",
                error=str(exc)[:300] or type(exc).__name__,
            )
            return {}
        except Exception as exc:
            log.warning("start-up checks failed; nothing blocked", error=repr(exc)[:300])
            return {}
        probes = {}
        for conn, finding in faults.items():
            mine = [d for d in sending if d.connection_id == conn]
            check = functools.partial(_check_again, cfg, client, senders[conn], mine)
            probes[conn] = senders[conn].block(finding.cause, _setup_error(finding), check)
        log.info("start-up checks done", connections=len(senders), blocked=sorted(probes))
        return probes

    def _on_task_done(self, task: asyncio.Task[None], halt: asyncio.Event) -> None:
        if task.cancelled() or task.exception() is None:
            return
        exc = refused_credentials(task.exception()) or task.exception()
        self.fatal = exc
        if isinstance(exc, AuthError):
            log.error("amazon credentials refused", task=task.get_name(), error=str(exc))
        else:
            log.error("task failed", task=task.get_name(), error=repr(exc))
        halt.set()

    async def _drain(
        self,
        feeds: dict[str, MemberFeed],
        senders: dict[str, ConnectionSender],
        pipeline: Pipeline,
        budget_s: float,
    ) -> bool:
        """Finish the batches claimed, within the drain budget; what is left stays due. Whether
        all was finished in time."""

        async def all_sent() -> None:
            await asyncio.gather(*(f.stopped_claiming() for f in feeds.values()))
            await asyncio.gather(*(s.drained() for s in senders.values()))
            await pipeline.dead_letters_sent()

        try:
            await asyncio.wait_for(all_sent(), timeout=budget_s)
        except TimeoutError:
            log.warning(
                "drain budget exhausted; unsent members stay due, unrecorded events are read again"
            )
            return False
        return True

    async def _commit_loop(self, source: KafkaSource, halt: asyncio.Event) -> None:
        interval = self.cfg.kafka.commit_interval_ms / 1000
        while not halt.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(halt.wait(), timeout=interval)
            await source.commit()
            source.update_lag()

    async def _token_loop(self, client: AmazonClient, halt: asyncio.Event) -> None:
        """Keep an access token fresh while idle too (readiness means "a token is held"). A
        refused refresh token raises AuthError: the daemon turns fatal, without a retry loop."""
        while not halt.is_set():
            try:
                await client.ensure_token()
                wait_s = max(client.token_refresh_in, 0.5)
            except RetryableError as exc:
                log.warning("access token refresh failed; retrying", error=str(exc))
                wait_s = 5.0
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(halt.wait(), timeout=min(wait_s, 60.0))

    async def _health_loop(self, store: Store, source: KafkaSource, halt: asyncio.Event) -> None:
        """Readiness of the two dependencies, probed every few seconds."""
        while not halt.is_set():
            self.store_ok = await store.ping() and store.takes_writes
            self.kafka_ok = await source.reachable() and source.dead_letters_flowing
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(halt.wait(), timeout=HEALTH_INTERVAL_S)
