"""`syncd jobs` (tracked jobs, as a table or JSON) and `syncd db upgrade` (apply migrations)."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
from collections import Counter
from datetime import UTC, datetime
from typing import Any

from rich.table import Table

from syncd import config as config_mod
from syncd.cli import data_console
from syncd.config import StoreConfig
from syncd.store.store import JobRow, command_store, store_problems
from syncd.vocabulary import JobState


def add_parser(sub: Any) -> None:
    jobs = sub.add_parser("jobs", help="tracked jobs from the store")
    jobs.add_argument("--config", required=True, help="TOML config file")
    jobs.add_argument(
        "--state", type=_job_state, help=f"only jobs in this state ({', '.join(JobState)})"
    )
    jobs.add_argument("--json", action="store_true", help="machine-readable output")
    jobs.add_argument("--limit", type=_limit, default=20, help="recent jobs to list (default 20)")
    jobs.set_defaults(func=_cmd_jobs)

    db = sub.add_parser("db", help="store schema management")
    db_sub = db.add_subparsers(dest="db_command", required=True)
    upgrade = db_sub.add_parser("upgrade", help="apply the store's schema migrations")
    upgrade.add_argument("--config", required=True, help="TOML config file")
    upgrade.set_defaults(func=_cmd_db_upgrade)


def _job_state(text: str) -> str:
    if text.upper() not in JobState.__members__:
        raise argparse.ArgumentTypeError(f"must be one of {', '.join(JobState)}, got {text!r}")
    return text.upper()


_MAX_LIMIT = 1_000_000


def _limit(text: str) -> int:
    if not text.isdigit() or not 0 < int(text) <= _MAX_LIMIT:
        raise argparse.ArgumentTypeError(
            f"must be an integer from 1 to {_MAX_LIMIT:,}, got {text!r}"
        )
    return int(text)


def _cmd_jobs(args: argparse.Namespace) -> int:
    cfg = config_mod.load(args.config)
    counts, recent = asyncio.run(_read_jobs(cfg.store, args.state, args.limit))
    if args.json:
        doc = {"counts": counts, "jobs": [dataclasses.asdict(j) for j in recent]}
        print(json.dumps(doc, indent=2, sort_keys=True))
    else:
        _print_tables(counts, recent)
    return 0


async def _read_jobs(
    cfg: StoreConfig, state: str | None, limit: int
) -> tuple[dict[str, int], list[JobRow]]:
    async with command_store(cfg.url, cfg.statement_timeout_s) as store:
        return await store.job_counts(), await store.list_jobs(state, limit)


def _print_tables(counts: dict[str, int], recent: list[JobRow]) -> None:
    console = data_console()
    by_state = Table(title="Jobs by state")
    by_state.add_column("state")
    by_state.add_column("jobs", justify="right")
    for state, n in counts.items():
        by_state.add_row(state, str(n))
    by_state.add_row("total", str(sum(counts.values())), style="bold")
    console.print(by_state)

    reasons: Counter[str] = Counter()
    for job in recent:
        reasons.update(job.invalid_reasons)
    if reasons:
        invalid = Table(title="Invalid records by reason")
        invalid.add_column("reason")
        invalid.add_column("records", justify="right")
        for reason, n in reasons.most_common():
            invalid.add_row(reason, str(n))
        console.print(invalid)

    listed = Table(title=f"Recent jobs ({len(recent)})")
    listed.add_column("job request id", no_wrap=True)
    listed.add_column("audience")
    listed.add_column("records", justify="right")
    listed.add_column("state")
    listed.add_column("created (UTC)", no_wrap=True)
    listed.add_column("polls", justify="right")
    listed.add_column("processed %", justify="right")
    listed.add_column("invalid", justify="right")
    for job in recent:
        listed.add_row(
            job.job_request_id,
            job.audience,
            str(job.records),
            job.state,
            datetime.fromtimestamp(job.created_at, UTC).strftime("%Y-%m-%d %H:%M:%S"),
            str(job.polls),
            "" if job.processed_rate is None else f"{job.processed_rate:g}",
            str(job.invalid_records),
        )
    console.print(listed)


def _cmd_db_upgrade(args: argparse.Namespace) -> int:
    cfg = config_mod.load(args.config)
    before, head = asyncio.run(upgrade_store(cfg.store.url))
    if before == head:
        print(f"store schema already at revision {head}")
    else:
        print(f"store schema upgraded from {before or 'empty'} to revision {head}")
    return 0


async def upgrade_store(url: str) -> tuple[str | None, str]:
    """`syncd db upgrade` on the store at `url`: (its revision before, the head it is at now)."""
    async with command_store(url, schema_current=False, writes=True) as store:
        before, head = await store.schema_status()
        with store_problems(url):  # a newer schema: SchemaOutdatedError
            await store.ensure_schema(auto_upgrade=True)
        return before, head
