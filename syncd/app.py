"""The one place that wires syncd's stages, in flow order (see README "How it works"):

    source -> transform (decode, route, hash; worker processes) -> batch
           -> deliver (budget, POST, job row) -> ack -> commit
    side loops: linger flush, offset commits, job poller, store health, HTTP endpoints

Also the `syncd run` and `syncd check-config` commands.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import os
import signal
import socket
import sys
import uuid
from asyncio import FIRST_COMPLETED
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any

import orjson

from syncd import config as config_mod
from syncd.amazon.client import AmazonClient
from syncd.batching import Batcher, EncodedBatch, RecordTooLargeError
from syncd.budget import Budget
from syncd.config import Config
from syncd.deliver import ConnectionSender
from syncd.errors import AuthError, RetryableError
from syncd.inflight import InflightGuard
from syncd.jobs import Poller
from syncd.model import Batch, Destination, Erase, MemberRecord, SourceRef
from syncd.observability import metrics
from syncd.observability.http import bound_port, start_http
from syncd.observability.logging import configure as configure_logging
from syncd.observability.logging import get_logger
from syncd.preflight import AmazonUnreachableError, Finding, check_client_config, check_online
from syncd.routing import RouteCounts
from syncd.runtime import compiled, tune_process
from syncd.source import DLQ_RETRY_BACKOFF_S, KafkaSource, Message, OffsetTracker
from syncd.store import Store
from syncd.transform import Outcome, Spec, Transformer

log = get_logger("syncd.app")

Partition = tuple[str, int]
Chunk = tuple[list[Message], Awaitable[tuple[list[Outcome], RouteCounts]]]
HEALTH_INTERVAL_S = 2.0
CHUNK_EVENTS = 2000  # messages per fetch, transformed as one chunk (fewer when less is buffered)
MAX_CHUNKS = 3  # chunks fetched and not yet applied (in the transform, or waiting for their turn)
CAP_PAUSE_AFTER_S = 1.0  # at max_pending_events: wait this long unpaused (see _wait_for_room)
BLOCKED_PROBE_FACTOR = 5  # a blocked connection's probes back off to 5 x amazon.backoff_max_s


class Pipeline:
    """Consumes, transforms and hands batches to one sender per connection; acknowledges."""

    def __init__(
        self,
        cfg: Config,
        source: KafkaSource,
        tracker: OffsetTracker,
        senders: dict[str, ConnectionSender],
        budget: Budget,
        transformer: Transformer,
    ) -> None:
        self._cfg = cfg
        self._source = source
        self._tracker = tracker
        self._senders = senders
        self._budget = budget
        self._transformer = transformer
        self._destinations = cfg.destinations
        self._batcher = Batcher(
            max_records=cfg.batch.max_records,
            max_bytes=cfg.batch.max_bytes,
            linger_s=cfg.batch.linger_ms / 1000,
            target_types=cfg.amazon.target_types,
        )
        # partitions with unacknowledged record parts, per connection (who feeds whom now)
        self._feeds: defaultdict[str, Counter[Partition]] = defaultdict(Counter)
        # the connections each partition has fed (who it may feed next)
        self._routes: defaultdict[Partition, set[str]] = defaultdict(set)
        self._paused: set[Partition] = set()
        self._guard = InflightGuard()
        self._dead_letters: set[asyncio.Task[None]] = set()
        self._unapplied = 0  # events fetched whose chunk is not applied yet
        self._acked = asyncio.Event()  # set by every acknowledgement

    # -- consume ---------------------------------------------------------------------------
    async def consume(self, stop: asyncio.Event) -> None:
        """Fetch and hand chunks to the transform until `stop`; apply their outcomes in fetch
        order, meanwhile. Then flush what is open."""
        chunks: asyncio.Queue[Chunk | None] = asyncio.Queue(MAX_CHUNKS)
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self._fetch(stop, chunks))
            tg.create_task(self._apply(chunks))
        self.flush(self._batcher.flush_all())

    async def _fetch(self, stop: asyncio.Event, chunks: asyncio.Queue[Chunk | None]) -> None:
        limit = self._cfg.kafka.max_pending_events
        while not stop.is_set():
            if self.pending >= limit:
                await self._wait_for_room(limit, stop)
            self._apply_backpressure()
            room = max(1, min(CHUNK_EVENTS, limit - self.pending))  # all paused when none
            messages = await self._source.fetch(timeout_ms=200, max_records=room)
            if messages:
                self._unapplied += len(messages)
                transformed = self._transformer.submit([m.value for m in messages])
                await chunks.put((messages, transformed))
        await chunks.put(None)

    async def _apply(self, chunks: asyncio.Queue[Chunk | None]) -> None:
        while (item := await chunks.get()) is not None:
            messages, transformed = item
            outcomes, counts = await transformed
            counts.publish()
            assigned = self._source.assigned  # a partition that moved meanwhile is its new owner's
            for message, outcome in zip(messages, outcomes, strict=True):
                ref = message.ref
                if (ref.topic, ref.partition) in assigned:
                    self._handle(message, outcome)
            self._unapplied -= len(messages)

    def _handle(self, message: Message, outcome: Outcome) -> None:
        if isinstance(outcome, str):
            self._dead_letter(message, outcome)
            return
        if isinstance(outcome, Erase) or any(r.identifiers_only for _, r in outcome):
            # these need the member table, not wired here yet: dead-lettered as before
            self._dead_letter(message, "no_audience")
            return
        ref = message.ref
        self._tracker.track(ref, len(outcome))
        partition = (ref.topic, ref.partition)
        routes = self._routes[partition]
        for index, record in outcome:
            destination = self._destinations[index]
            self._feeds[destination.connection_id][partition] += 1
            routes.add(destination.connection_id)
            if self._guard.admit(destination, record, ref):
                self._batch(destination, record, [ref])

    def _batch(self, destination: Destination, record: MemberRecord, refs: list[SourceRef]) -> None:
        try:
            full = self._batcher.add(destination, record, *refs)
        except RecordTooLargeError as exc:
            detail = str(exc)
            self._in_background(
                lambda: self._source.dead_letter_payload(
                    record.json, "record_too_large", refs[-1], detail=detail
                ),
                lambda: self._done(destination.connection_id, refs),
            )
            return
        self.flush(full)

    def flush(self, batches: list[EncodedBatch]) -> None:
        for encoded in batches:
            self._guard.register(encoded.batch)
            self._senders[encoded.batch.destination.connection_id].submit(encoded)

    async def release_finished(self, store: Store, stop: asyncio.Event) -> None:
        """Hand held changes back to batching once the job they waited for is terminal."""
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=0.5)
            metrics.INFLIGHT_MEMBERS.set(self._guard.members)
            metrics.HELD_CHANGES.set(self._guard.held)
            jobs = self._guard.jobs()
            if not jobs:
                continue
            try:
                states = await store.job_states(jobs)
            except Exception as exc:  # store outage: the held changes wait for the next round
                log.warning("job states unavailable; retrying", error=repr(exc)[:300])
                continue
            for job_request_id, state in states.items():
                if state == "PENDING":
                    continue
                for held in self._guard.finished(job_request_id):
                    if self._guard.readmit(held):
                        self._batch(held.destination, held.record, held.refs)

    async def linger(self, stop: asyncio.Event) -> None:
        """Flush batches that waited `linger_ms`, at the moment they are due."""
        while not stop.is_set():
            due_in = self._batcher.next_due_in()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=min(due_in or 0.5, 0.5))
            self.flush(self._batcher.due())

    # -- acknowledge -----------------------------------------------------------------------
    def ack(self, batch: Batch, job_request_id: str) -> None:
        self._guard.bind(batch, job_request_id)
        self._done(batch.destination.connection_id, batch.refs)

    def _done(self, connection_id: str, refs: list[SourceRef]) -> None:
        self._acked.set()
        feeds = self._feeds[connection_id]
        for ref in refs:
            self._tracker.done(ref)
            partition = (ref.topic, ref.partition)
            feeds[partition] -= 1
            if feeds[partition] <= 0:
                del feeds[partition]

    def split(self, batch: Batch, parts: list[Batch]) -> None:
        """A refused batch goes on as `parts` (the sender's bisect): each becomes a job alone."""
        self._guard.split(batch, parts)

    def reject(self, encoded: EncodedBatch, reason: str) -> None:
        """Amazon refused these records alone: dead-letter each (hashed) record; its events are
        acknowledged once the broker has the dead letter. Never raises: a sender calls it."""
        batch = encoded.batch
        connection_id = batch.destination.connection_id
        detail = reason[:300]
        for record, refs in zip(encoded.records, batch.sources, strict=True):
            send = partial(
                self._source.dead_letter_payload, record, "amazon_rejected", refs[-1], detail=detail
            )
            self._in_background(send, partial(self._done, connection_id, refs))
        for held in self._guard.forget(batch):
            if self._guard.readmit(held):
                self._batch(held.destination, held.record, held.refs)

    def _dead_letter(self, message: Message, reason: str) -> None:
        self._tracker.track(message.ref, 1)

        def done() -> None:
            self._tracker.done(message.ref)
            self._acked.set()

        self._in_background(lambda: self._source.dead_letter(message, reason), done)

    def _in_background(self, send: Callable[[], Awaitable[None]], then: Callable[[], None]) -> None:
        """Send a dead letter without holding up the partition; `then` acknowledges it, only
        once the broker has it. A failed send is retried with backoff; a cancelled one (the
        drain budget ran out) stays unacknowledged, so its event is read again."""

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
                    then()
                    return

        task = asyncio.create_task(run())
        self._dead_letters.add(task)
        task.add_done_callback(self._dead_letters.discard)

    async def dead_letters_sent(self) -> None:
        if self._dead_letters:
            await asyncio.gather(*self._dead_letters, return_exceptions=True)

    # -- backpressure ----------------------------------------------------------------------
    async def _wait_for_room(self, limit: int, stop: asyncio.Event) -> None:
        """At `max_pending_events`: wait until acknowledgements leave room for a whole chunk
        again, sending the open batches once nothing else is on its way to Amazon (they cannot
        fill while reading waits; sent any earlier, they would go out small every time the cap
        is reached). Gives up after `CAP_PAUSE_AFTER_S`, and `_apply_backpressure` pauses every
        partition then. Waiting unpaused first keeps what aiokafka has fetched: pausing drops a
        partition's fetched records (to fetch them again on resume), and their buffers, several
        MB each, stay in memory until the cycle collector finds them."""
        resume_at = limit - min(CHUNK_EVENTS, limit // 2)
        metrics.PENDING_EVENTS.set(self.pending)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + CAP_PAUSE_AFTER_S
        while (
            self.pending > resume_at and not stop.is_set() and (left := deadline - loop.time()) > 0
        ):
            if not any(sender.backlog for sender in self._senders.values()):
                self.flush(self._batcher.flush_all())
            self._acked.clear()
            waits = {asyncio.ensure_future(self._acked.wait()), asyncio.ensure_future(stop.wait())}
            _, waiting = await asyncio.wait(waits, timeout=left, return_when=FIRST_COMPLETED)
            for task in waiting:
                task.cancel()

    def _apply_backpressure(self) -> None:
        """Pause what must wait: everything at `max_pending_events`; otherwise the partitions
        that feed only connections which are out of budget, blocked (a setup fault, a long
        Retry-After, failing POSTs) or have a sending backlog. A
        partition that also feeds a flowing connection is read on: the waiting connection's
        records wait in memory, up to `max_pending_events`."""
        assigned = self._source.assigned
        if self.pending >= self._cfg.kafka.max_pending_events:
            want = set(assigned)
            self.flush(self._batcher.flush_all())  # reading stops: they cannot fill
        else:
            waiting = {
                conn
                for conn, sender in self._senders.items()
                if self._budget.is_waiting(conn)
                or sender.blocked
                or sender.backlog > 2 * self._cfg.amazon.max_concurrency
            }
            want = {
                partition
                for conn in waiting
                for partition in self._feeds[conn]
                if self._routes[partition] <= waiting
            } & assigned
        if want != self._paused:
            self._source.resume(self._paused - want)
            self._source.pause(want - self._paused)
            self._paused = want
        metrics.PENDING_EVENTS.set(self.pending)

    @property
    def pending(self) -> int:
        """Events read and not yet acknowledged (`kafka.max_pending_events` at most)."""
        return self._tracker.pending() + self._unapplied


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
        store = await Store.connect(cfg.store.url)
        try:
            await store.ensure_schema(auto_upgrade=cfg.store.auto_upgrade)
            self.store_ok = True
            async with AmazonClient(cfg.amazon) as client:
                self.client = client
                await client.ensure_token()
                return await self._run_pipeline(cfg, store, client, stop)
        finally:
            await store.close()

    async def _run_pipeline(
        self, cfg: Config, store: Store, client: AmazonClient, stop: asyncio.Event
    ) -> int:
        tracker = OffsetTracker()
        source = self.source = KafkaSource(cfg.kafka, tracker)
        budget = Budget(store, cfg.budget)
        senders: dict[str, ConnectionSender] = {}
        transformer = Transformer(
            Spec(
                cfg.destinations,
                cfg.kafka.input_format,
                cfg.kafka.max_message_bytes,
                cfg.pii.strict_reference,
            ),
            workers=cfg.transform.workers,
        )
        pipeline = self.pipeline = Pipeline(cfg, source, tracker, senders, budget, transformer)
        for conn in {d.connection_id for d in cfg.destinations}:
            senders[conn] = ConnectionSender(
                conn,
                poster=client,
                budget=budget,
                jobs=store,
                ack=pipeline.ack,
                reject=pipeline.reject,
                split=pipeline.split,
                max_concurrency=cfg.amazon.max_concurrency,
                first_poll_after_s=cfg.poll.first_delay_s,
                # a blocked connection is probed more rarely than a request is retried
                pause_s=cfg.amazon.backoff_base_s,
                max_pause_s=BLOCKED_PROBE_FACTOR * cfg.amazon.backoff_max_s,
                failing_after_s=cfg.amazon.max_retry_time_s,
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
        halt = asyncio.Event()  # stop consuming: shutdown or a fatal error
        poll_stop = asyncio.Event()
        background: list[asyncio.Task[None]] = []

        def spawn(coro: Awaitable[None], name: str) -> asyncio.Task[None]:
            task = asyncio.ensure_future(coro)
            task.set_name(name)
            task.add_done_callback(lambda t: self._on_task_done(t, halt))
            background.append(task)
            return task

        for sender in senders.values():
            spawn(sender.run(), f"sender:{sender.connection_id}")
        # a GET with all its retries ends within max_retry_time_s + one attempt (+ a token refresh)
        lease_s = cfg.amazon.max_retry_time_s + 2 * cfg.amazon.request_timeout_s
        poller = Poller(store, client, cfg.poll, owner=self.owner, lease_s=lease_s)
        spawn(poller.run(poll_stop), "poller")
        spawn(pipeline.linger(halt), "linger")
        spawn(pipeline.release_finished(store, halt), "inflight-guard")
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
        await asyncio.wait({consume})  # a failure is in self.fatal already
        if isinstance(self.fatal, AuthError):
            # A restart cannot help until someone fixes the credentials: stay up, unready, and
            # quiet (no refresh loop against LwA) until told to stop.
            log.error(
                "syncd stopped delivering: fatal error; waiting for SIGTERM", error=str(self.fatal)
            )
            await stop.wait()
        else:
            # Shutdown, or a task failed (a bug, a broken worker): deliver what is in flight and
            # commit it, then exit (1 after a failure, so that the orchestrator restarts syncd).
            await self._drain(senders, pipeline, cfg.shutdown.drain_seconds)
        poll_stop.set()
        for task in background:
            task.cancel()
        await asyncio.gather(*background, return_exceptions=True)
        stop_wait.cancel()
        halt_wait.cancel()
        await source.stop()
        transformer.close()
        await runner.cleanup()
        log.info("syncd stopped", pending_events=tracker.pending())
        return 1 if self.fatal is not None else 0

    def _on_task_done(self, task: asyncio.Task[None], halt: asyncio.Event) -> None:
        if task.cancelled() or task.exception() is None:
            return
        exc = task.exception()
        self.fatal = exc
        if isinstance(exc, AuthError):
            log.error("amazon credentials refused", task=task.get_name(), error=str(exc))
        else:
            log.error("task failed", task=task.get_name(), error=repr(exc))
        halt.set()

    async def _drain(
        self, senders: dict[str, ConnectionSender], pipeline: Pipeline, budget_s: float
    ) -> None:
        """Deliver what is open, within the drain budget; what is left is replayed later."""

        async def all_sent() -> None:
            await asyncio.gather(*(s.drained() for s in senders.values()))
            await pipeline.dead_letters_sent()

        try:
            await asyncio.wait_for(all_sent(), timeout=budget_s)
        except TimeoutError:
            log.warning(
                "drain budget exhausted; unacknowledged events will be replayed",
                drain_seconds=budget_s,
            )

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
            self.store_ok = await store.ping()
            self.kafka_ok = await source.reachable()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(halt.wait(), timeout=HEALTH_INTERVAL_S)


# -- commands ------------------------------------------------------------------------------------
def add_parser(sub: Any) -> None:
    run = sub.add_parser("run", help="run the daemon")
    run.add_argument("--config", required=True, help="TOML config file")
    run.set_defaults(func=_cmd_run)
    check = sub.add_parser("check-config", help="validate and print the effective config")
    check.add_argument("--config", required=True, help="TOML config file")
    check.add_argument(
        "--online",
        action="store_true",
        help="also check credentials, terms, connections and audiences against Amazon",
    )
    check.set_defaults(func=_cmd_check_config)


def _cmd_check_config(args: argparse.Namespace) -> int:
    cfg = config_mod.load(args.config)
    sys.stdout.write(orjson.dumps(config_mod.masked(cfg), option=orjson.OPT_INDENT_2).decode())
    sys.stdout.write("\n")
    return asyncio.run(_check_online(cfg)) if args.online else 0


async def _check_online(cfg: Config) -> int:
    """Report each online check on stderr; 2 naming the first failed item, 1 unreachable."""
    config_mod.require_credentials(cfg)
    config_mod.require_destinations(cfg)
    first_failure: Finding | None = None
    async with AmazonClient(check_client_config(cfg.amazon)) as client:
        try:
            async for finding in check_online(cfg, client):
                print(
                    f"{'ok  ' if finding.ok else 'FAIL'} {finding.item}: {finding.detail}",
                    file=sys.stderr,
                )
                if not finding.ok and first_failure is None:
                    first_failure = finding
        except AmazonUnreachableError as exc:
            print(f"syncd: amazon could not be checked: {exc}", file=sys.stderr)
            return 1
    if first_failure is not None:
        print(
            f"syncd: check-config --online: {first_failure.item}: {first_failure.detail}",
            file=sys.stderr,
        )
        return 2
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    cfg = config_mod.load(args.config)
    configure_logging(cfg.log.level)
    tune_process(daemon=True)
    return asyncio.run(run_until_signalled(cfg))


async def run_until_signalled(
    cfg: Config, on_started: Callable[[Daemon], None] | None = None
) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    daemon = Daemon(cfg)
    if on_started is not None:
        on_started(daemon)
    return await daemon.run(stop)
