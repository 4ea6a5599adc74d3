"""Drive real `syncd run` processes in integration tests: config files, process control,
readiness and metrics over HTTP, and waiting on observable state with deadlines (no sleeps as
synchronization).

`syncd run` checks its destinations at Amazon at start (terms, connections, audiences), so a
daemon started against a sandbox of `running_sandbox` finds there what its config names, as an
advertiser would have set it up (`provide`); `DaemonProcess(..., provide=False)` leaves the
sandbox as the test made it."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any, ClassVar

import aiohttp
import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from syncd.embedded import free_port
from syncd.sandbox import server
from syncd.sandbox.state import SandboxSettings, SandboxState

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
    **sections: dict[str, Any],
) -> dict[str, Any]:
    raw: dict[str, Any] = {
        "kafka": {
            "bootstrap_servers": bootstrap,
            "topics": [topic],
            # one consumer group per test: a member another test left behind (killed, or
            # between session timeouts) must not hold up this test's rebalances
            "group_id": group or f"syncd-test-{uuid.uuid4().hex[:8]}",
            "dead_letter_topic": dlq,
            "commit_interval_ms": 100,
        },
        "amazon": {
            "client_id": "sandbox-client-id",
            "client_secret": "sandbox-client-secret",
            "refresh_token": "sandbox-refresh-token",
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
    bootstrap: str, sandbox: Any, topic: str, tmp_path: Path, **sections: dict[str, Any]
) -> dict[str, Any]:
    """`daemon_config` for the common case: `sandbox` as Amazon, an SQLite store in tmp_path."""
    return daemon_config(
        bootstrap=bootstrap,
        topic=topic,
        sandbox_url=sandbox.url,
        token_url=sandbox.token_url,
        store_url=f"sqlite+aiosqlite:///{tmp_path / 's.db'}",
        **sections,
    )


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


class DaemonProcess:
    """One `syncd run` child process with its config file and log file. Every process started
    is killed at the end of its test if it is still running (see `kill_leftovers`)."""

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
        """SIGTERM, then wait for the exit without blocking the event loop: the sandbox runs on
        the test's loop and must keep answering while syncd drains."""
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


async def produce(
    bootstrap: str, topic: str, messages: Iterable[tuple[bytes | None, bytes]]
) -> None:
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap, linger_ms=5, max_request_size=16 * 1024 * 1024
    )
    await producer.start()
    try:
        for key, value in messages:
            await producer.send(topic, value, key=key)
        await producer.flush()
    finally:
        await producer.stop()


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
    answers ListOffsets "latest" wrongly (design.md), so `consumer.end_offsets` cannot be used."""
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


async def read_topic(bootstrap: str, topic: str, count: int, timeout: float = 30.0) -> list[Any]:
    """Read `count` messages of `topic` from the beginning (e.g. the dead-letter topic)."""
    consumer = AIOKafkaConsumer(
        topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest", enable_auto_commit=False
    )
    await consumer.start()
    out: list[Any] = []
    try:
        deadline = time.monotonic() + timeout
        while len(out) < count and time.monotonic() < deadline:
            batch = await consumer.getmany(timeout_ms=500)
            for msgs in batch.values():
                out.extend(msgs)
        return out
    finally:
        await consumer.stop()


def child_processes(pid: int) -> list[int]:
    """The child processes of `pid`, from /proc (every thread's children)."""
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        out += [int(c) for c in (task / "children").read_text().split()]
    return out


def alive(pid: int) -> bool:
    """The process exists and is not a zombie waiting for its parent."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def is_transform_worker(pid: int) -> bool:
    """A syncd transform worker: a process multiprocessing spawned (not its resource tracker)."""
    return b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes()


async def run_syncd(*args: str, **env: str) -> tuple[int, str, str]:
    """`python -m syncd ARGS` as an operator runs it (no SYNCD_ overrides of this process,
    `env` added, a wide terminal for rich tables): (exit code, stdout, stderr)."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("SYNCD_")}
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "syncd",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**base, "COLUMNS": "250", **env},
    )
    stdout, stderr = await asyncio.wait_for(proc.communicate(), timeout=120)
    assert proc.returncode is not None
    return proc.returncode, stdout.decode(), stderr.decode()


async def waiting_members(store_url: str, audience_id: int) -> int:
    """Members of the audience whose desired state waits to be sent (MemberTable.waiting)."""
    from syncd.members import MemberTable
    from syncd.store import Store

    store = await Store.connect(store_url)
    try:
        return await MemberTable(store).waiting([audience_id])
    finally:
        await store.close()


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
        assert answer.status == 200, await answer.text()
