"""SQLite-only behaviour of the store (kept out of test_store.py, which PostgreSQL re-runs)."""

from __future__ import annotations

import asyncio
from pathlib import Path

from syncd.store import Store
from syncd.store.store import head_revision


async def test_connections_racing_to_open_a_new_file_all_succeed(tmp_path: Path) -> None:
    """Switching a new file to WAL can fail with "database is locked" without SQLite asking its
    busy handler; the store retries instead of failing its first query."""
    head = head_revision()
    for attempt in range(10):
        url = f"sqlite+aiosqlite:///{tmp_path / f'race-{attempt}.db'}"
        stores = [await Store.connect(url) for _ in range(6)]
        try:
            await asyncio.gather(*(s.ensure_schema(auto_upgrade=True) for s in stores))
            assert [await s.schema_status() for s in stores] == [(head, head)] * len(stores)
        finally:
            await asyncio.gather(*(s.close() for s in stores))
