"""`syncd reconcile` end to end, on SQLite and on PostgreSQL: a real broker, the sandbox as
Amazon, a `syncd run` process sending under a small budget, and `syncd reconcile` as a process.

Starting from an audience with members M (streamed events) and a snapshot S: afterwards the
sandbox's membership is S exactly (but for the live changes newer than the snapshot, which
win); the records sent are |S - M| + |M - S| + the members whose identifiers changed; live
changes keep flowing while the backfill waits for budget, which is never exceeded; a bad line
is reported by number and reason while the rest goes through; the same snapshot again sends
nothing."""

from __future__ import annotations

import asyncio
import csv
import hashlib
import os
import sys
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from syncd.localstack import (
    CONNECTION,
    DaemonProcess,
    daemon_config,
    produce,
    running_sandbox,
    sandbox_settings,
    wait_for,
)
from syncd.members import MemberTable
from syncd.store import Store

pytestmark = pytest.mark.integration

VIP = 413642381039213536
VIP_ONLY = [
    {"audience": "vip", "connection_id": CONNECTION, "audience_id": VIP, "country_code": "US"}
]
WINDOW_S = 2
BUDGET = 40  # records per 2 s window: the backfill takes several windows
BATCH = 10


def iso(at: datetime) -> str:
    return at.isoformat().replace("+00:00", "Z")


def event(profile: str, email: str, action: str, at: datetime) -> tuple[bytes, bytes]:
    doc = {
        "profile_id": profile,
        "identifiers": {"email": email},
        "audiences": {action: ["vip"]},
        "occurred_at": iso(at),
    }
    return profile.encode(), orjson.dumps(doc)


def email_hash(email: str) -> str:
    return hashlib.sha256(email.strip().lower().encode()).hexdigest()


def write_snapshot(path: Path, members: dict[str, str], bad_line: bool) -> None:
    rows = [{"profile_id": p, "country": "US", "email": e} for p, e in sorted(members.items())]
    if path.suffix == ".csv":
        with path.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["profile_id", "country", "email"])
            writer.writeheader()
            writer.writerows(rows[:5])
            if bad_line:  # line 7 of the file (header, 5 rows, then this)
                writer.writerow({"profile_id": "bad-1", "country": "Narnia", "email": "x@y.io"})
            writer.writerows(rows[5:])
    else:
        columns = {k: [r[k] for r in rows] for k in ("profile_id", "country", "email")}
        pq.write_table(pa.table(columns), path)


async def run_reconcile(
    config: Path, snapshot: Path, *args: str, on_recorded: Any = None
) -> tuple[int, str]:
    """`syncd reconcile` as a process; `on_recorded()` runs once it printed its summary (the
    changes are recorded), while it waits for Amazon."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SYNCD_")}
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "syncd",
        "reconcile",
        "--config",
        str(config),
        "--audience",
        "vip",
        "--snapshot",
        str(snapshot),
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env=env,
    )
    assert proc.stdout is not None
    out: list[str] = []
    while line := (await asyncio.wait_for(proc.stdout.readline(), 180)).decode():
        out.append(line)
        if line.startswith("budget:") and on_recorded is not None:
            await on_recorded()
    return await asyncio.wait_for(proc.wait(), 30), "".join(out)


def membership(sandbox: Any) -> set[str]:
    view = sandbox.state.members_view(VIP)
    return {m["externalUserId"] for m in view["members"]} if view else set()


def sent(sandbox: Any) -> int:
    return int(sandbox.state.stats()["records"].get(CONNECTION, 0))


async def settled(store_url: str) -> bool:
    store = await Store.connect(store_url)
    try:
        due = await MemberTable(store).waiting([VIP])
        return due == 0 and "PENDING" not in await store.job_counts()
    finally:
        await store.close()


async def test_reconcile_mirrors_the_snapshot_within_the_budget_after_live_changes(
    kafka: Any, store_url: str, tmp_path: Path
) -> None:
    topic = f"reconcile-{uuid.uuid4().hex[:8]}"
    await kafka.create_topic(topic, partitions=2)
    settings = sandbox_settings(window_seconds=WINDOW_S, window_budget=BUDGET)
    now = datetime.now(UTC)
    m = {f"m{i:02}": f"m{i}@example.com" for i in range(40)}
    s = {p: e for p, e in m.items() if p >= "m10"}  # m00..m09 leave
    s |= {f"m{i}": f"new{i}@example.com" for i in range(30, 40)}  # ten change their email
    # 250 join: with the changes below, ~270 records take ~7 budget windows (~14 s), so live
    # changes recorded while the backfill waits have seconds of room on a loaded machine
    s |= {f"n{i:03}": f"n{i}@example.com" for i in range(250)}
    async with running_sandbox(settings) as sandbox:
        raw = daemon_config(
            bootstrap=kafka.bootstrap,
            topic=topic,
            sandbox_url=sandbox.url,
            token_url=sandbox.token_url,
            store_url=store_url,
            destinations=VIP_ONLY,
            budget={"records_per_hour": BUDGET, "window_seconds": WINDOW_S},
            batch={"max_records": BATCH, "linger_ms": 100},
        )
        daemon = DaemonProcess(tmp_path, raw).start()
        start = now - timedelta(minutes=10)
        await produce(kafka.bootstrap, topic, [event(p, e, "add", start) for p, e in m.items()])

        async def quiet() -> bool:
            daemon.check_alive()
            return await settled(store_url)

        await wait_for(lambda: _true(membership(sandbox) == set(m)), 120, "M delivered")
        await wait_for(quiet, 60, "M confirmed")
        # Live changes newer than the snapshot (its --as-of): m00 re-added with a new email
        # (S lacks it: the live add wins over the snapshot's remove), n000 removed (S has it:
        # the live remove wins over the snapshot's add).
        as_of = now - timedelta(minutes=5)
        after = now - timedelta(minutes=1)
        await produce(
            kafka.bootstrap,
            topic,
            [
                event("m00", "m0b@example.com", "add", after),
                event("n000", "n0@ex.io", "remove", after),
            ],
        )
        await wait_for(lambda: _true(len(sandbox.state.ledger(CONNECTION)) >= 42), 60, "live")
        await wait_for(quiet, 60, "the live changes confirmed")
        before = sent(sandbox)

        fmt = "csv" if store_url.startswith("sqlite") else "parquet"
        snapshot = tmp_path / f"snapshot.{fmt}"
        write_snapshot(snapshot, s, bad_line=fmt == "csv")
        live = {f"live{i}": f"live{i}@example.com" for i in range(5)}

        async def live_during_the_backfill() -> None:
            # new members, and a member of S taken out after the reconcile recorded its add
            # (newer than --as-of: the live remove wins, whether the add was sent or not)
            await produce(
                kafka.bootstrap,
                topic,
                [event(p, e, "add", datetime.now(UTC)) for p, e in live.items()]
                + [event("n050", "n50@example.com", "remove", datetime.now(UTC))],
            )

        code, out = await run_reconcile(
            daemon.config_path,
            snapshot,
            "--as-of",
            iso(as_of),
            "--wait",
            "--timeout",
            "150",
            on_recorded=live_during_the_backfill,
        )
        assert code == 0, out
        assert "Amazon accepted all of it" in out
        joined = len(s.keys() - m.keys()) - 1  # n000's live remove wins
        left = len(m.keys() - s.keys()) - 1  # m00's live add wins
        changed = 10
        assert f"adds       {joined}" in out
        assert f"changes    {changed}" in out
        assert f"removes    {left}" in out
        if fmt == "csv":
            assert "bad_country: 1 (lines 7)" in out

        want = (set(s) - {"n000", "n050"}) | {"m00"} | set(live)
        await wait_for(
            lambda: _true(membership(sandbox) == want), 60, "the live adds accepted as well"
        )
        await wait_for(quiet, 60, "everything confirmed")
        # n050 (counted in `joined`): the live remove instead of the reconcile's add, or the
        # add (sent before the remove was recorded) and then the remove
        extra = sent(sandbox) - before - (joined + left + changed + len(live))
        assert extra in (0, 1)
        ledger = sandbox.state.ledger(CONNECTION)
        latest = {e["record"]["externalUserId"]: e["record"] for e in ledger}
        for profile in (f"m{i}" for i in range(30, 40)):
            assert latest[profile]["hashedPII"] == [{"email": email_hash(s[profile])}]
        # live changes kept flowing: no live add waited for the backfill to finish (each was
        # accepted before the backfill's last POST, or in it when recorded as that one left)
        arrivals = {e["record"]["externalUserId"]: e["receivedAt"] for e in ledger}
        backfill_end = max(arrivals[p] for p in s.keys() - m.keys() - {"n000", "n050"})
        assert max(arrivals[p] for p in live) <= backfill_end
        stats = sandbox.state.stats()
        assert stats["max_window_records"][CONNECTION] <= BUDGET
        assert stats.get("budget_exceeded", {}).get(CONNECTION, 0) == 0

        # the same snapshot again (same --as-of): nothing to send
        code, out = await run_reconcile(daemon.config_path, snapshot, "--as-of", iso(as_of))
        assert code == 0, out
        assert "records to send: 0" in out
        assert f"unchanged  {len(s) - 2}" in out  # n000 and n050 hold newer live removes
        assert await settled(store_url)
        assert sent(sandbox) - before == joined + left + changed + len(live) + extra
        assert await daemon.terminate() == 0


def _true(value: bool) -> Any:
    """`wait_for` takes a coroutine function: wrap a plain condition."""

    async def done() -> bool:
        return value

    return done()
