"""End-to-end benchmark of the member-state pipeline: embedded broker -> `syncd run` (a real
process) -> sandbox (a real process), with an SQLite or a PostgreSQL store.

A backlog of 8-field events (one per profile, each adding it to or removing it from one
audience: one member record per event) is produced first; then syncd starts. Figures:
- end to end: from the first event read (syncd_events_consumed_total > 0) to the last 202 from
  the sandbox (its accepted records reach one per event), in events/s and records/s;
- ingest: from the first event read to the last commit (commits follow recording in the member
  table, so this measures reading, transforming and recording, not sending);
- memory: the peak of the summed RSS of all of syncd's processes (event loop, transform
  workers), sampled, and the sum of their own peaks
  (VmHWM, which no sample misses), with the peak of their summed PSS beside (shared pages
  counted once, as a container's memory limit counts them);
- CPU per record (syncd's processes, the sandbox, PostgreSQL's server), and the member
  table's bytes per member at the end (bench_member_size.py);
- with --replay: once every record is accepted, that syncd stops and a new one reads the same
  topic in a new consumer group: its events read per second until its last commit, and the
  records it sent (the member table makes a replay send nothing: must be 0).
`--job-delay-s 600` keeps every job pending for the whole run (the memory target's setting).

    .venv/bin/python bench/bench_e2e.py [--events 1000000] [--store sqlite|postgresql]
        [--replay] [--job-delay-s 0.5] [--workers 1] [--partitions 4]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from aiokafka import AIOKafkaConsumer, TopicPartition
from bench_member_size import postgres_sizes, table_sizes
from bench_member_size import report as report_sizes
from sqlalchemy import text

from syncd import runtime, synth
from syncd.config import BatchConfig
from syncd.localstack import (
    DESTINATIONS,
    DaemonProcess,
    EmbeddedBroker,
    child_processes,
    daemon_config,
    end_offsets,
    free_port,
    is_transform_worker,
    produce,
    provide_at,
    store_url,
)
from syncd.members import MemberTable
from syncd.store import Store
from syncd.store.commands import upgrade_store

TOPIC = "bench-profile-changes"
SAMPLE_S = 0.2  # sampling cadence of progress and memory
STALL_S = 180.0  # no progress for this long: the run failed


def proc_status_mb(pid: int, field_name: str) -> float:
    """A /proc/PID/status memory field (VmRSS, VmHWM) in MB; 0 once the process is gone."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return 0.0
    match = re.search(rf"{field_name}:\s+(\d+) kB", status)
    return int(match.group(1)) / 1024 if match else 0.0


def pss_mb(pid: int) -> float:
    try:
        rollup = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return 0.0
    match = re.search(r"^Pss:\s+(\d+) kB", rollup, re.MULTILINE)
    return int(match.group(1)) / 1024 if match else 0.0


def cpu_seconds(pid: int, *, reaped: bool = False) -> float:
    """User + system CPU time of a running process (`reaped`: and of its children that ended)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = int(fields[11]) + int(fields[12])
    if reaped:
        ticks += int(fields[13]) + int(fields[14])
    return ticks / os.sysconf("SC_CLK_TCK")


def server_cpu_seconds(data_dir: Path) -> float:
    """CPU time of a PostgreSQL server of its own (`postgres_server(data_dir)`): its postmaster,
    with the backends that ended, and every process it runs; 0 where there is none (SQLite)."""
    pid_file = data_dir / "postmaster.pid"
    if not pid_file.exists():
        return 0.0
    postmaster = int(pid_file.read_text().split()[0])
    total = cpu_seconds(postmaster, reaped=True)
    for child in child_processes(postmaster):
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):
            total += cpu_seconds(child)
    return total


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


async def sandbox_stats(url: str) -> dict[str, Any]:
    async with aiohttp.ClientSession() as s, s.get(url + "/_sandbox/stats") as r:
        data: dict[str, Any] = await r.json()
        return data


def accepted(stats: dict[str, Any]) -> tuple[int, int]:
    """(records accepted, record POSTs accepted) so far."""
    posts = stats["requests"].get("POST /amc/audiences/records 202", 0)
    return sum(stats["records"].values()), posts


def start_sandbox(port: int, job_delay_s: float) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "syncd",
            "sandbox",
            "--port",
            str(port),
            "--job-delay-s",
            str(job_delay_s),
            "--rate-per-s",
            "1000",
            "--burst",
            "1000",
            "--no-ledger",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    assert proc.stdout is not None
    proc.stdout.readline()  # "sandbox listening on ...": the port is bound
    return proc


@dataclass
class Memory:
    """Memory of syncd's processes, sampled: peaks of their summed RSS and PSS, and each
    process's own peak RSS (VmHWM) as last read while it ran."""

    peak_rss: float = 0.0
    peak_pss: float = 0.0
    hwm: dict[str, float] = field(default_factory=dict)  # "event loop", "worker PID", ...

    def sample(self, main_pid: int) -> None:
        names = {main_pid: "event loop"}
        for pid in child_processes(main_pid):
            names[pid] = f"{'worker' if is_transform_worker(pid) else 'helper'} {pid}"
        self.peak_rss = max(self.peak_rss, sum(proc_status_mb(p, "VmRSS") for p in names))
        self.peak_pss = max(self.peak_pss, sum(map(pss_mb, names)))
        for pid, name in names.items():
            self.hwm[name] = max(self.hwm.get(name, 0.0), proc_status_mb(pid, "VmHWM"))

    def line(self) -> str:
        parts = ", ".join(f"{name} {mb:.0f}" for name, mb in self.hwm.items())
        return (
            f"peak RSS of syncd (all processes summed, sampled): {self.peak_rss:.0f} MB;"
            f" sum of each process's peak: {sum(self.hwm.values()):.0f} MB ({parts});"
            f" peak PSS summed: {self.peak_pss:.0f} MB"
        )


@dataclass
class Run:
    """When a syncd process read its first event, made its last commit, and (if asked) saw the
    sandbox reach a count of accepted records; monotonic seconds."""

    started: float
    first_read: float = 0.0
    committed: float = 0.0
    all_accepted: float = 0.0
    memory: Memory = field(default_factory=Memory)


async def events_read(daemon: DaemonProcess) -> float:
    try:
        return await daemon.metric("syncd_events_consumed_total")
    except aiohttp.ClientError:  # its HTTP server is not up yet
        return 0.0


class Offsets:
    """The committed offsets of a consumer group, read through one consumer of the group
    that does not join it (a new client per sample loaded the broker, which shares the cores)."""

    def __init__(self, bootstrap: str, group: str) -> None:
        self._consumer = AIOKafkaConsumer(
            bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False
        )

    async def __aenter__(self) -> Offsets:
        await self._consumer.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._consumer.stop()

    async def committed(self, ends: dict[int, int]) -> dict[int, int]:
        return {p: await self._consumer.committed(TopicPartition(TOPIC, p)) or 0 for p in ends}


async def watch(
    daemon: DaemonProcess,
    bootstrap: str,
    ends: dict[int, int],
    sandbox_url: str,
    records_target: int | None,
) -> Run:
    """Sample `daemon` until every offset of `ends` is committed in its group and, if
    `records_target` is given, the sandbox has accepted that many records. Its /metrics is
    read only until the first event is read (at this cadence the scrapes cost its event loop
    ~5%; Prometheus scrapes every 15-30 s): progress is then the committed offsets and the
    records accepted."""
    assert daemon.proc is not None
    pid = daemon.proc.pid
    run = Run(started=time.monotonic())
    progress, last_progress = (-1, -1), time.monotonic()
    async with Offsets(bootstrap, daemon.raw["kafka"]["group_id"]) as offsets:
        while not run.committed or (records_target is not None and not run.all_accepted):
            daemon.check_alive()
            run.memory.sample(pid)
            now = time.monotonic()
            if not run.first_read and await events_read(daemon):
                run.first_read = now
            records = -1
            if records_target is not None and not run.all_accepted:
                records, _ = accepted(await sandbox_stats(sandbox_url))
                if records >= records_target:
                    run.all_accepted = now
            done = sum(ends.values())
            if run.first_read and not run.committed:
                committed = await offsets.committed(ends)
                if all(committed[p] >= end for p, end in ends.items()):
                    run.committed = now
                done = sum(committed.values())
            if (done, records) != progress:
                progress, last_progress = (done, records), now
            elif now - last_progress > STALL_S:
                raise AssertionError(
                    f"no progress for {STALL_S:.0f}s: {done:,} offsets committed, {records:,}"
                    f" of {records_target} records accepted; log: {daemon.logs()[-3000:]}"
                )
            await asyncio.sleep(SAMPLE_S)
    return run


async def member_table(url: str, backend: str) -> None:
    """Members by state over the configured audiences, and the table's bytes per member (on
    PostgreSQL also with only the live row versions)."""
    store = await Store.connect(url)
    try:
        table = MemberTable(store)
        counts: dict[str, int] = {}
        for dest in DESTINATIONS:
            for state, n in (await table.counts(int(dest["audience_id"]))).items():
                counts[state] = counts.get(state, 0) + n
        members = sum(counts.values())
        async with store._engine.connect() as conn:
            record_bytes = await conn.scalar(text("SELECT AVG(LENGTH(record)) FROM members"))
        print(
            "member table: "
            + ", ".join(f"{n:,} {state}" for state, n in counts.items())
            + f"; records of {float(record_bytes or 0):.0f} bytes on average"
        )
        report_sizes(
            f"member table at the end of the run ({backend}, {members:,} members)",
            await table_sizes(store, backend),
            max(members, 1),
        )
        if backend == "postgresql":  # the dead row versions of the sends returned to the OS
            report_sizes(
                "the same after VACUUM FULL",
                await postgres_sizes(store, "VACUUM FULL"),
                max(members, 1),
            )
    finally:
        await store.close()


def config(
    bootstrap: str, sandbox_url: str, url: str, group: str, workers: int, max_pending: int | None
) -> dict[str, Any]:
    raw = daemon_config(
        bootstrap=bootstrap,
        topic=TOPIC,
        sandbox_url=sandbox_url,
        token_url=sandbox_url + "/auth/o2/token",
        store_url=url,
        group=group,
        kafka={"commit_interval_ms": 500}
        | ({"max_pending_events": max_pending} if max_pending else {}),
        batch={"linger_ms": BatchConfig().linger_ms},  # syncd's default, not the tests'
        poll={"first_delay_s": 1.0, "max_interval_s": 5.0},
        log={"level": "warning"},
        transform={"workers": workers},
    )
    raw["store"]["auto_upgrade"] = False  # upgraded first, as the chart's init container does
    return raw


def rate(count: int, seconds: float, unit: str = "events") -> str:
    return f"{count / seconds:,.0f} {unit}/s"


async def main(args: argparse.Namespace) -> None:
    with (
        tempfile.TemporaryDirectory(prefix="syncd-bench-") as tmp,
        store_url(args.store, Path(tmp)) as url,
    ):
        await bench(args, Path(tmp), url)


async def bench(args: argparse.Namespace, tmp: Path, url: str) -> None:
    events: int = args.events
    broker = EmbeddedBroker()
    await broker.start()
    sandbox_port = free_port()
    sandbox = start_sandbox(sandbox_port, args.job_delay_s)
    sandbox_url = f"http://127.0.0.1:{sandbox_port}"
    try:
        await broker.create_topic(TOPIC, args.partitions)
        await upgrade_store(url)
        t0 = time.monotonic()
        await produce(broker.bootstrap, TOPIC, synth.events(events, seed=1, remove_ratio=0.2))
        print(f"produced {events:,} events in {time.monotonic() - t0:.1f}s", flush=True)
        ends = await end_offsets(broker.bootstrap, TOPIC)
        raw = config(broker.bootstrap, sandbox_url, url, "bench", args.workers, args.max_pending)
        await provide_at(sandbox_url, raw["destinations"])
        server_cpu_at_start = server_cpu_seconds(tmp / "pg")
        daemon = DaemonProcess(tmp, raw).start()
        assert daemon.proc is not None
        pid = daemon.proc.pid
        # one member record per event: synth makes one event per profile, for one audience
        run = await watch(daemon, broker.bootstrap, ends, sandbox_url, records_target=events)
        records, posts = accepted(await sandbox_stats(sandbox_url))
        helpers = child_processes(pid)
        cpu_s = {
            "loop": cpu_seconds(pid),
            "workers": sum(map(cpu_seconds, helpers)),
            "sandbox": cpu_seconds(sandbox.pid),
            "server": server_cpu_seconds(tmp / "pg") - server_cpu_at_start,
        }
        await daemon.terminate()
        end_to_end = run.all_accepted - run.first_read
        ingest = run.committed - run.first_read
        us = {name: 1e6 * seconds / max(records, 1) for name, seconds in cpu_s.items()}
        print(
            f"machine: {os.cpu_count()} cores, {cpu_model()}, Python"
            f" {platform.python_version()} (transform compiled:"
            f" {'yes' if runtime.compiled() else 'no'}); store: {args.store};"
            f" transform workers: {args.workers}; sandbox job delay: {args.job_delay_s}s"
        )
        print(
            f"events: {events:,}  records accepted: {records:,} in {posts:,} POSTs"
            f" ({records / max(posts, 1):,.0f} records each)"
        )
        print(
            f"end to end (first event read -> last 202): {end_to_end:.1f}s,"
            f" {rate(events, end_to_end)}, {rate(records, end_to_end, 'records')}"
            f" ({run.first_read - run.started:.1f}s from start to the first event read)"
        )
        print(f"ingest (first event read -> last commit): {ingest:.1f}s, {rate(events, ingest)}")
        print(run.memory.line())
        print(
            f"CPU per record: syncd {us['loop'] + us['workers']:.0f} us (event loop"
            f" {us['loop']:.0f}, transform workers and helpers {us['workers']:.0f}),"
            f" sandbox {us['sandbox']:.0f} us"
            + (f", PostgreSQL's server {us['server']:.0f} us" if us["server"] else ""),
            flush=True,
        )
        if args.replay:
            raw = config(
                broker.bootstrap,
                sandbox_url,
                url,
                "bench-replay",
                args.workers,
                args.max_pending,
            )
            before = accepted(await sandbox_stats(sandbox_url))[0]
            replayer = DaemonProcess(tmp, raw, name="replay").start()
            assert replayer.proc is not None
            replay = await watch(replayer, broker.bootstrap, ends, sandbox_url, None)
            await replayer.terminate()  # its drain would send whatever it had claimed
            resent = accepted(await sandbox_stats(sandbox_url))[0] - before
            print(
                f"replay (new consumer group, first event read -> last commit):"
                f" {replay.committed - replay.first_read:.1f}s,"
                f" {rate(events, replay.committed - replay.first_read)};"
                f" records sent: {resent:,}"
            )
            print("replay " + replay.memory.line())
            if resent:
                raise AssertionError(f"the replay sent {resent:,} records (expected 0)")
        await member_table(url, args.store)
    finally:
        DaemonProcess.kill_leftovers()  # after a failure: none runs on
        sandbox.terminate()
        broker.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--store", choices=("sqlite", "postgresql"), default="sqlite")
    parser.add_argument(
        "--replay", action="store_true", help="then replay the topic in a new consumer group"
    )
    parser.add_argument(
        "--job-delay-s",
        type=float,
        default=0.5,
        help="seconds the sandbox keeps a job pending (600: pending for the whole run)",
    )
    parser.add_argument("--partitions", type=int, default=4)
    parser.add_argument("--workers", type=int, default=1, help="[transform] workers")
    parser.add_argument(
        "--max-pending", type=int, help="[kafka] max_pending_events (default: syncd's)"
    )
    # syncd runs as its image runs it (deploy/Dockerfile sets this)
    os.environ.setdefault("MALLOC_ARENA_MAX", "2")
    asyncio.run(main(parser.parse_args()))
