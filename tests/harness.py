"""Helpers only the integration tests use, beside the local stack they share with `syncd demo`
and the benchmarks (`syncd.localstack`: broker, sandbox, store, config, `DaemonProcess`):
reading a topic, checking processes, running `syncd` commands, reading the member table."""

from __future__ import annotations

import asyncio
import os
import sys
import time
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaConsumer


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


def alive(pid: int) -> bool:
    """The process exists and is not a zombie waiting for its parent."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


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
