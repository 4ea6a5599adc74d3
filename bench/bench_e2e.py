"""End-to-end benchmark: embedded broker -> `syncd run` (a real process) -> sandbox (a real
process). A backlog of 8-field events is produced first; then syncd starts and the clock runs
until every event is committed. Reports sustained records/s (from the first record the sandbox
accepted to the last commit, i.e. after the consumer group join, which the broker delays by
seconds), the rate over the whole run, and syncd's memory: the peak RSS (VmHWM) of each of its
processes (event loop, transform workers, multiprocessing's resource tracker), and the peak of
their proportional set size together, sampled with the progress (shared pages counted once).

    .venv/bin/python bench/bench_e2e.py [--events 1000000] [--workers 1]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from syncd import runtime, synth
from syncd.config import BatchConfig
from syncd.embedded import EmbeddedBroker, free_port
from tests.harness import (
    DaemonProcess,
    child_processes,
    committed_offsets,
    daemon_config,
    end_offsets,
    is_transform_worker,
    produce,
)

TOPIC = "bench-profile-changes"


def peak_rss_mb(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    match = re.search(r"VmHWM:\s+(\d+) kB", status)
    return int(match.group(1)) / 1024 if match else float("nan")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a running process."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def pss_mb(pids: list[int]) -> float:
    """Proportional set size of processes together: shared pages (the interpreter, libraries)
    counted once, as a container's memory limit counts them."""
    total_kb = 0
    for pid in pids:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                total_kb += int(line.split()[1])
    return total_kb / 1024


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


async def sandbox_stats(url: str) -> dict[str, object]:
    async with aiohttp.ClientSession() as s, s.get(url + "/_sandbox/stats") as r:
        data: dict[str, object] = await r.json()
        return data


def start_sandbox(port: int) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "syncd",
            "sandbox",
            "--port",
            str(port),
            "--job-delay-s",
            "0.5",
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


async def main(events: int, partitions: int, workers: int, max_pending: int | None) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="syncd-bench-"))
    broker = EmbeddedBroker()
    await broker.start()
    sandbox_port = free_port()
    sandbox = start_sandbox(sandbox_port)
    url = f"http://127.0.0.1:{sandbox_port}"
    try:
        await broker.create_topic(TOPIC, partitions)
        t0 = time.monotonic()
        await produce(broker.bootstrap, TOPIC, synth.events(events, seed=1, remove_ratio=0.2))
        print(f"produced {events:,} events in {time.monotonic() - t0:.1f}s", flush=True)
        ends = await end_offsets(broker.bootstrap, TOPIC)
        raw = daemon_config(
            bootstrap=broker.bootstrap,
            topic=TOPIC,
            sandbox_url=url,
            token_url=url + "/auth/o2/token",
            store_url=f"sqlite+aiosqlite:///{tmp / 'bench.db'}",
            group="bench",
            kafka={"commit_interval_ms": 500}
            | ({"max_pending_events": max_pending} if max_pending else {}),
            batch={"linger_ms": BatchConfig().linger_ms},  # syncd's default, not the tests'
            poll={"first_delay_s": 1.0, "max_interval_s": 5.0},
            log={"level": "warning"},
            transform={"workers": workers},
        )
        daemon = DaemonProcess(tmp, raw).start()
        assert daemon.proc is not None
        started = time.monotonic()
        first_accepted: float | None = None
        peak_pss = 0.0
        while True:
            daemon.check_alive()
            peak_pss = max(peak_pss, pss_mb([daemon.proc.pid, *child_processes(daemon.proc.pid)]))
            if first_accepted is None:
                if sum((await sandbox_stats(url))["records"].values()):
                    first_accepted = time.monotonic()
            else:
                committed = await committed_offsets(broker.bootstrap, TOPIC, "bench")
                if all(committed.get(p, 0) >= end for p, end in ends.items()):
                    break
            await asyncio.sleep(0.1 if first_accepted is None else 0.5)  # sampling cadence
        finished = time.monotonic()
        stats = await sandbox_stats(url)
        records = sum(stats["records"].values())
        posts = sum(
            n for key, n in stats["requests"].items() if key == "POST /amc/audiences/records 202"
        )
        workers_pids = child_processes(daemon.proc.pid)
        rss = {"event loop": peak_rss_mb(daemon.proc.pid)}
        rss |= {
            f"{'worker' if is_transform_worker(pid) else 'resource tracker'} {pid}": peak_rss_mb(
                pid
            )
            for pid in workers_pids
        }
        cpu_s = {
            "loop": cpu_seconds(daemon.proc.pid),
            "workers": sum(map(cpu_seconds, workers_pids)),
            "sandbox": cpu_seconds(sandbox.pid),
        }
        us = {name: 1e6 * seconds / records for name, seconds in cpu_s.items()}  # per record
        await daemon.terminate()
        steady = finished - first_accepted
        print(
            f"machine: {os.cpu_count()} cores, {cpu_model()}, Python {platform.python_version()}"
            f" (transform compiled: {'yes' if runtime.compiled() else 'no'})"
        )
        print(f"events: {events:,}  records accepted by the sandbox: {records:,}")
        print(f"transform workers: {workers}")
        print(f"record POSTs accepted: {posts:,} ({records / max(posts, 1):,.0f} records each)")
        print(
            f"sustained: {records / steady:,.0f} records/s over {steady:.1f}s "
            f"(whole run, with {first_accepted - started:.1f}s of start-up and group join: "
            f"{records / (finished - started):,.0f} records/s)"
        )
        print(
            "syncd peak RSS: "
            + ", ".join(f"{name} {mb:.0f} MB" for name, mb in rss.items())
            + f" (sum {sum(rss.values()):.0f} MB); peak PSS of all, sampled: {peak_pss:.0f} MB"
        )
        print(
            f"CPU per record: syncd {us['loop'] + us['workers']:.0f} us (event loop"
            f" {us['loop']:.0f}, transform workers {us['workers']:.0f}),"
            f" sandbox {us['sandbox']:.0f} us"
        )
    finally:
        sandbox.terminate()
        broker.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--partitions", type=int, default=4)
    parser.add_argument("--workers", type=int, default=1, help="[transform] workers")
    parser.add_argument(
        "--max-pending", type=int, help="[kafka] max_pending_events (default: syncd's)"
    )
    args = parser.parse_args()
    asyncio.run(main(args.events, args.partitions, args.workers, args.max_pending))
