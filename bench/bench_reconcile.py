"""`syncd reconcile` at scale: a `--members` snapshot (default 1,000,000) against a member table
of as many confirmed members, `--changed` of them (default 10%) with another email in the
snapshot than Amazon holds.

Setup (not timed): the table's records are made by the pipeline's own transform (decode, route,
hash, encode) from the table's version of each member, and written as the steady state after
a full send (every member a confirmed add: sent, accepted, no job pending); the snapshot is
written as JSON lines (or `--format csv|parquet`). Then `syncd reconcile` runs as a process,
as an operator runs it; measured: its wall time (start to exit: read, hash, compare, record),
its CPU time (the command and its worker), the peak of the summed RSS of its processes (the
command and its transform worker, sampled every 200 ms) and the records it recorded to send,
which must be exactly the changed members (the benchmark fails otherwise).

    .venv/bin/python bench/bench_reconcile.py [--members 1000000] [--changed 0.1]
        [--format jsonl|csv|parquet] [--backend sqlite|postgresql] [--workers 1]
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import orjson
from sqlalchemy import select

from syncd import config as config_mod
from syncd.localstack import DESTINATIONS, store_url, to_toml
from syncd.members import ADD, CONFIRMED, RECONCILE, MemberTable
from syncd.model import MemberRecord, record_digest
from syncd.runtime import compiled
from syncd.store import Store
from syncd.store.schema import members
from syncd.transform import Spec
from syncd.transform_pool import Transformer

VIP = DESTINATIONS[0]  # the one destination of the config
AUDIENCE = int(VIP["audience_id"])
CHUNK = 5000
T0 = time.time() - 86400.0  # when the table's members were recorded and accepted


def profile(i: int) -> str:
    return f"cdp-user-{i:07}"


def fields(i: int, changed: bool) -> dict[str, Any]:
    email = f"{'moved' if changed else 'user'}{i}@example.com"
    return {
        "profile_id": profile(i),
        "country": "US",
        "identifiers": {"email": email, "phone": f"+1206{i % 10_000_000:07}"},
    }


def is_changed(i: int, every: int) -> bool:
    return i % every == 0


async def fill_table(url: str, n: int, workers: int) -> None:
    """Every member as Amazon holds it (the old identifiers), confirmed, hashed by the
    pipeline's transform."""
    cfg = config(url, workers)
    spec = Spec(cfg.destinations, "canonical", 1_000_000, False)
    store = await Store.connect(url)
    try:
        await store.ensure_schema(auto_upgrade=True)
        pending: list[Any] = []
        async with Transformer(spec, workers=workers) as transformer:
            for start in range(0, n, CHUNK):
                values: list[bytes | None] = [
                    orjson.dumps({**fields(i, False), "audiences": {"add": ["vip"]}})
                    for i in range(start, min(start + CHUNK, n))
                ]
                pending.append((start, transformer.submit(values)))
                if len(pending) >= 3:
                    await _insert(store, *pending.pop(0))
            while pending:
                await _insert(store, *pending.pop(0))
    finally:
        await store.close()


async def _insert(store: Store, start: int, transformed: Any) -> None:
    outcomes, _ = await transformed
    rows = []
    for i, outcome in enumerate(outcomes, start=start):
        record: MemberRecord = outcome[0][1]
        digest = record_digest(record.json)
        rows.append(
            {
                "audience_id": AUDIENCE,
                "external_user_id": record.external_user_id,
                "action": ADD,
                "record": record.json,
                "digest": digest,
                "occurred_at": T0,
                "position": i,
                "due_rank": 0,
                "due_since": None,
                "sent_action": ADD,
                "sent_digest": digest,
                "sent_at": T0,
                "job_request_id": None,
                "accepted_at": T0,
                "outcome": CONFIRMED,
                "reason": None,
                "attempts": 0,
            }
        )
    async with store._write() as conn:
        await conn.execute(members.insert(), rows)


def write_snapshot(path: Path, n: int, every: int, fmt: str) -> None:
    if fmt == "jsonl":
        with path.open("wb") as f:
            for i in range(n):
                f.write(orjson.dumps(fields(i, is_changed(i, every))) + b"\n")
        return
    names = ["profile_id", "country", "email", "phone"]

    def row(i: int) -> list[str]:
        doc = fields(i, is_changed(i, every))
        return [doc["profile_id"], "US", doc["identifiers"]["email"], doc["identifiers"]["phone"]]

    if fmt == "csv":
        with path.open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(names)
            for i in range(n):
                writer.writerow(row(i))
        return
    import pyarrow as pa
    import pyarrow.parquet as pq

    writer = None
    for start in range(0, n, 100_000):
        rows = [row(i) for i in range(start, min(start + 100_000, n))]
        table = pa.table({name: [r[k] for r in rows] for k, name in enumerate(names)})
        if writer is None:
            writer = pq.ParquetWriter(path, table.schema)
        writer.write_table(table)
    if writer is not None:
        writer.close()


def config(url: str, workers: int) -> config_mod.Config:
    return config_mod.from_mapping(raw_config(url, workers))


def raw_config(url: str, workers: int) -> dict[str, Any]:
    return {"store": {"url": url}, "transform": {"workers": workers}, "destinations": [VIP]}


def rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except (FileNotFoundError, ProcessLookupError):
        pass
    return 0.0


def tree(pid: int) -> list[int]:
    out = [pid]
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            for child in (task / "children").read_text().split():
                out += tree(int(child))
    except (FileNotFoundError, ProcessLookupError):
        pass
    return out


def run_reconcile(config_path: Path, snapshot: Path, fmt: str) -> tuple[float, float, float, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SYNCD_")}
    cmd = [sys.executable, "-m", "syncd", "reconcile", "--config", str(config_path)]
    cmd += ["--audience", "vip", "--snapshot", str(snapshot), "--format", fmt]
    cpu_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    peak = 0.0
    while proc.poll() is None:
        peak = max(peak, sum(rss_mb(p) for p in tree(proc.pid)))
        time.sleep(0.2)  # the sampling period, not a synchronisation
    elapsed = time.monotonic() - start
    cpu_after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = sum(getattr(cpu_after, f) - getattr(cpu_before, f) for f in ("ru_utime", "ru_stime"))
    out = proc.stdout.read().decode() if proc.stdout else ""
    if proc.returncode != 0:
        raise SystemExit(f"syncd reconcile exited {proc.returncode}:\n{out}")
    return elapsed, peak, cpu, out


async def recorded(url: str) -> list[str]:
    store = await Store.connect(url)
    try:
        async with store._read() as conn:
            rows = await conn.execute(
                select(members.c.external_user_id).where(
                    members.c.audience_id == AUDIENCE,
                    members.c.due_rank == RECONCILE,
                    members.c.due_since.is_not(None),
                )
            )
            ids = list(rows.scalars())
        assert await MemberTable(store).waiting([AUDIENCE], RECONCILE) == len(ids)
        return ids
    finally:
        await store.close()


async def main(args: argparse.Namespace) -> None:
    every = round(1 / args.changed)
    with tempfile.TemporaryDirectory(prefix="bench-reconcile-") as tmp_name:
        tmp = Path(tmp_name)
        with store_url(args.backend, tmp) as url:
            print(f"transform compiled: {compiled()}; {args.members:,} members, {args.backend}")
            started = time.monotonic()
            await fill_table(url, args.members, args.workers)
            snapshot = tmp / f"snapshot.{args.format}"
            write_snapshot(snapshot, args.members, every, args.format)
            print(
                f"setup: {time.monotonic() - started:.0f} s "
                f"(snapshot {snapshot.stat().st_size / 1e6:.0f} MB)"
            )
            config_path = tmp / "syncd.toml"
            config_path.write_text(to_toml(raw_config(url, args.workers)))
            elapsed, peak, cpu, out = run_reconcile(config_path, snapshot, args.format)
            print(out.rstrip())
            ids = await recorded(url)
            want = {profile(i) for i in range(args.members) if is_changed(i, every)}
            exact = set(ids) == want and len(ids) == len(want)
            print(
                f"reconcile of {args.members:,} against {args.members:,} "
                f"({len(want):,} changed): {elapsed:.1f} s "
                f"({args.members / elapsed:,.0f} members/s; CPU {cpu:.1f} s, command and "
                "worker), "
                f"peak RSS {peak:.0f} MB (command + {args.workers} transform worker(s), summed); "
                f"records to send {len(ids):,}: "
                f"{'exactly the changed members' if exact else 'NOT the changed members'}"
            )
            if not exact:
                raise SystemExit(1)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--members", type=int, default=1_000_000)
    parser.add_argument("--changed", type=float, default=0.1)
    parser.add_argument("--format", choices=("jsonl", "csv", "parquet"), default="jsonl")
    parser.add_argument("--backend", choices=("sqlite", "postgresql"), default="sqlite")
    parser.add_argument("--workers", type=int, default=1, help="transform workers")
    asyncio.run(main(parser.parse_args()))
