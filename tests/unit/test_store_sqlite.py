"""SQLite-only behaviour of the store (kept out of test_store.py, which PostgreSQL re-runs)."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import insert, inspect, select, text
from sqlalchemy.exc import OperationalError

from syncd.members import MemberChange, MemberTable
from syncd.store import Store
from syncd.store.schema import members
from syncd.store.store import SCHEMA_REVISION
from tests.fixtures.store import migrate


async def test_connections_racing_to_open_a_new_file_all_succeed(tmp_path: Path) -> None:
    """Switching a new file to WAL can fail with "database is locked" without SQLite asking its
    busy handler; the store retries instead of failing its first query."""
    head = SCHEMA_REVISION
    for attempt in range(10):
        url = f"sqlite+aiosqlite:///{tmp_path / f'race-{attempt}.db'}"
        stores = [await Store.connect(url) for _ in range(6)]
        try:
            await asyncio.gather(*(s.ensure_schema(auto_upgrade=True) for s in stores))
            assert [await s.schema_status() for s in stores] == [(head, head)] * len(stores)
        finally:
            await asyncio.gather(*(s.close() for s in stores))


async def test_upgrading_to_0005_makes_members_a_rowid_table_and_keeps_every_row(
    tmp_path: Path,
) -> None:
    """Revision 0005 rebuilds SQLite's member table as a rowid table (and 0004 back), with its
    rows and indexes; the member table works on the result."""
    store = await Store.connect(f"sqlite+aiosqlite:///{tmp_path / 'syncd.db'}")

    async def table_sql_rows_and_indexes() -> tuple[str, list[Any], set[str]]:
        async with store._engine.connect() as conn:
            sql = await conn.scalar(text("SELECT sql FROM sqlite_master WHERE name = 'members'"))
            rows = (await conn.execute(select(members).order_by(members.c.external_user_id))).all()
            indexes = await conn.run_sync(lambda sync: inspect(sync).get_indexes("members"))
        return str(sql), [tuple(r) for r in rows], {ix["name"] for ix in indexes}

    try:
        async with store._engine.begin() as conn:
            await conn.run_sync(migrate("0004"))
            await conn.execute(
                insert(members),
                [
                    {
                        "audience_id": 7,
                        "external_user_id": f"u{i}",
                        "action": "add",
                        "record": b'{"externalUserId":"u%d"}' % i,
                        "digest": bytes(32),
                        "occurred_at": 100.0 + i,
                        "position": i,
                        "due_rank": 0,
                        "due_since": 100.0 if i % 2 else None,
                        "attempts": 0,
                    }
                    for i in range(50)
                ],
            )
        sql_0004, rows_0004, indexes = await table_sql_rows_and_indexes()
        assert "WITHOUT ROWID" in sql_0004
        assert len(rows_0004) == 50

        await store.ensure_schema(auto_upgrade=True)
        sql_0005, rows_0005, indexes_0005 = await table_sql_rows_and_indexes()
        assert "WITHOUT ROWID" not in sql_0005
        assert rows_0005 == rows_0004
        assert (
            indexes_0005 == indexes == {"ix_members_due", "ix_members_job", "ix_members_accepted"}
        )
        table = MemberTable(store)
        assert await table.waiting([7]) == 25
        change = MemberChange(7, "u1", "remove", b"{}", bytes(32), 500.0, 1)
        assert (await table.record_changes([change])).recorded == 1
        assert (await table.member(7, "u1")) is not None

        async with store._engine.begin() as conn:
            await conn.run_sync(migrate("0004", down=True))
        sql_back, rows_back, _ = await table_sql_rows_and_indexes()
        assert "WITHOUT ROWID" in sql_back
        assert len(rows_back) == 50
    finally:
        await store.close()


async def test_a_write_lock_another_process_holds_is_seen_as_not_taking_writes(
    tmp_path: Path,
) -> None:
    """Reads go on beside another process's write lock (WAL), so a read probe does not see
    it: the store says it takes no writes from a write that failed on it until one succeeds."""
    url = f"sqlite+aiosqlite:///{tmp_path / 'locked.db'}"
    store = await Store.connect(url, busy_timeout_s=0.05)
    try:
        await store.ensure_schema(auto_upgrade=True)
        table = MemberTable(store)
        assert store.takes_writes
        holder = sqlite3.connect(tmp_path / "locked.db", isolation_level=None)
        holder.execute("BEGIN IMMEDIATE")
        try:
            with pytest.raises(OperationalError, match="locked"):
                await table.purge_tombstones(0)
            assert await store.ping()  # reads answer
            assert not store.takes_writes
        finally:
            holder.rollback()
            holder.close()
        await table.purge_tombstones(0)
        assert store.takes_writes
    finally:
        await store.close()


async def test_a_transaction_lost_to_another_is_not_a_store_taking_no_writes(
    tmp_path: Path,
) -> None:
    """A deadlock or serialization failure (run again at once) says nothing about the store:
    /readyz stays green; a lost connection does not."""

    class Orig(Exception):
        def __init__(self, sqlstate: str) -> None:
            self.sqlstate = sqlstate

    def failing(sqlstate: str) -> Any:
        def op(conn: Any, now: float) -> None:
            raise OperationalError("UPDATE", {}, Orig(sqlstate))

        return op

    store = await Store.connect(f"sqlite+aiosqlite:///{tmp_path / 's.db'}")
    try:
        for sqlstate, takes_writes in (("40P01", True), ("40001", True), ("08006", False)):
            with pytest.raises(OperationalError):
                await store.run_write(failing(sqlstate))
            assert store.takes_writes is takes_writes, sqlstate
    finally:
        await store.close()
