"""`syncd demo`: the whole pipeline on embedded defaults, no setup.

The local stack (`syncd.localstack`): an embedded Kafka-protocol broker, the Amazon sandbox set
up for the config's destinations and a SQLite store in a temporary directory; a synthetic
stream of realistic profile changes is produced, the real daemon runs until every event is
acknowledged and every job is terminal, then a summary and the audiences' status (`syncd
audiences status`) are printed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from syncd import config as config_mod
from syncd import synth
from syncd.app import Daemon
from syncd.config import AmazonConfig, ShutdownConfig
from syncd.localstack import (
    EmbeddedBroker,
    produce,
    provide,
    running_sandbox,
    sqlite_daemon_config,
)
from syncd.observability import metrics
from syncd.operate import AudienceStatus, audience_status, print_status
from syncd.runtime import tune_process
from syncd.sandbox.server import RunningSandbox
from syncd.sandbox.state import SandboxSettings
from syncd.store import Store
from syncd.vocabulary import JobState

TOPIC = "profile-changes"
DLQ_TOPIC = "syncd-dead-letters"


@dataclass
class Summary:
    events: int = 0
    seconds: float = 0.0
    records: dict[str, int] = field(default_factory=dict)
    batches: int = 0
    jobs: dict[str, int] = field(default_factory=dict)
    dead_letters: dict[str, int] = field(default_factory=dict)
    budget_used: dict[str, int] = field(default_factory=dict)
    budget_limit: int = 0
    audiences: list[AudienceStatus] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return bool(self.jobs) and JobState.PENDING not in self.jobs


def demo_sandbox(seed: int) -> SandboxSettings:
    """Amazon as the demo shows it: jobs of a second, some partial, a few invalid records, a
    share of members matched, a request rate that paces the run."""
    return SandboxSettings(
        job_delay_s=1.0,
        partial_rate=0.1,
        invalid_record_rate=0.002,
        keep_ledger=False,
        rate_per_s=500.0,
        burst=500,
        seed=seed,
        match_rate=0.62,  # Amazon resolves a share of what it receives
    )


def demo_config(tmp: Path, broker: str, sandbox: RunningSandbox) -> dict[str, Any]:
    """The local stack's config (`DESTINATIONS`), paced for a run of tens of seconds and quiet
    logs; Amazon's timeouts and the drain are syncd's defaults."""
    return sqlite_daemon_config(
        broker,
        sandbox,
        TOPIC,
        tmp,
        dlq=DLQ_TOPIC,
        group="syncd-demo",
        kafka={"commit_interval_ms": 200},
        amazon={"backoff_max_s": 2.0, "request_timeout_s": AmazonConfig().request_timeout_s},
        batch={"linger_ms": 300},
        poll={"first_delay_s": 0.5, "max_interval_s": 2.0},
        shutdown={"drain_seconds": ShutdownConfig().drain_seconds},
        log={"level": "warning"},
    )


def _sample(name: str, labels: dict[str, str] | None = None) -> float:
    return metrics.REGISTRY.get_sample_value(name, labels or {}) or 0.0


def _samples(name: str, label: str) -> dict[str, int]:
    out: dict[str, int] = {}
    for family in metrics.REGISTRY.collect():
        for s in family.samples:
            if s.name == name and s.value:
                out[s.labels[label]] = out.get(s.labels[label], 0) + int(s.value)
    return out


async def run_demo(
    events: int, *, seed: int = 7, show_progress: bool = True, console: Console | None = None
) -> Summary:
    console = console or Console()
    with tempfile.TemporaryDirectory(prefix="syncd-demo-") as tmpdir:
        tmp = Path(tmpdir)
        broker = EmbeddedBroker()
        await broker.start()
        try:
            await broker.create_topic(TOPIC, partitions=4)
            await broker.create_topic(DLQ_TOPIC, partitions=1)
            async with running_sandbox(demo_sandbox(seed)) as sandbox:
                raw = demo_config(tmp, broker.bootstrap, sandbox)
                provide(sandbox.state, raw["destinations"])
                cfg = config_mod.from_mapping(raw)
                produced = await produce(
                    broker.bootstrap, TOPIC, synth.events(events, seed=seed, bad_ratio=0.002)
                )
                summary = await _run_until_done(cfg, produced, show_progress, console)
                store = await Store.connect(cfg.store.url)
                try:
                    summary.audiences, _ = await audience_status(cfg, store)
                finally:
                    await store.close()
                return summary
        finally:
            broker.stop()


async def _run_until_done(
    cfg: config_mod.Config, produced: int, show_progress: bool, console: Console
) -> Summary:
    before_consumed = _sample("syncd_events_consumed_total", {"topic": TOPIC})
    daemon = Daemon(cfg)
    stop = asyncio.Event()
    started = time.monotonic()
    task = asyncio.create_task(daemon.run(stop))
    store = await Store.connect(cfg.store.url)
    summary = Summary(events=produced)
    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        disable=not show_progress,
    )
    try:
        with progress:
            p_events = progress.add_task("events acknowledged", total=produced)
            p_jobs = progress.add_task("jobs terminal", total=None)
            while not task.done():
                consumed = (
                    _sample("syncd_events_consumed_total", {"topic": TOPIC}) - before_consumed
                )
                pending = daemon.pipeline.pending if daemon.pipeline is not None else 0
                acked = max(0, int(consumed) - pending)
                jobs = await store.job_counts() if daemon.pipeline is not None else {}
                total_jobs = sum(jobs.values())
                progress.update(p_events, completed=acked)
                progress.update(
                    p_jobs,
                    completed=total_jobs - jobs.get(JobState.PENDING, 0),
                    total=total_jobs or None,
                )
                if acked >= produced and total_jobs and not jobs.get(JobState.PENDING):
                    break
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(task), timeout=0.25)
        summary.seconds = time.monotonic() - started
        stop.set()
        code = await task
        if code != 0:
            raise SystemExit(code)
        summary.jobs = await store.job_counts()
    finally:
        stop.set()
        await store.close()
    summary.records = _samples("syncd_records_sent_total", "action")
    summary.batches = sum(_samples("syncd_batches_sent_total", "outcome").values())
    summary.dead_letters = _samples("syncd_events_dead_lettered_total", "reason")
    summary.budget_used = _samples("syncd_budget_used_records", "connection")
    summary.budget_limit = cfg.budget.records_per_hour
    return summary


def print_summary(summary: Summary, console: Console) -> None:
    table = Table(title="syncd demo summary", show_header=False)
    rate = summary.events / summary.seconds if summary.seconds else 0.0
    sent = sum(summary.records.values())
    rows = [
        ("events produced", f"{summary.events:,}"),
        ("records sent", ", ".join(f"{k} {v:,}" for k, v in sorted(summary.records.items()))),
        ("batches (POSTs)", f"{summary.batches:,}"),
        ("jobs by state", ", ".join(f"{k} {v:,}" for k, v in sorted(summary.jobs.items()))),
        (
            "dead letters",
            ", ".join(f"{k} {v:,}" for k, v in sorted(summary.dead_letters.items())) or "none",
        ),
        ("wall time", f"{summary.seconds:.1f} s"),
        ("throughput", f"{rate:,.0f} events/s, {sent / max(summary.seconds, 1e-9):,.0f} records/s"),
        (
            "budget used",
            ", ".join(
                f"{c[:8]}… {u:,}/{summary.budget_limit:,}"
                for c, u in sorted(summary.budget_used.items())
            ),
        ),
    ]
    for name, value in rows:
        table.add_row(name, value)
    console.print(table)
    print_status(console, summary.audiences)


def add_parser(sub: Any) -> None:
    demo = sub.add_parser("demo", help="run the whole pipeline on embedded defaults")
    demo.add_argument(
        "--events", type=int, default=50_000, help="events to produce (default 50000)"
    )
    demo.add_argument("--seed", type=int, default=7, help="seed of the synthetic stream")
    demo.add_argument("--no-progress", action="store_true", help="no live progress bar")
    demo.set_defaults(func=_cmd_demo)


def _cmd_demo(args: argparse.Namespace) -> int:
    if args.events < 1:
        from syncd.errors import UsageError

        raise UsageError("--events must be >= 1")
    tune_process(daemon=True)
    console = Console()
    summary = asyncio.run(
        run_demo(args.events, seed=args.seed, show_progress=not args.no_progress, console=console)
    )
    print_summary(summary, console)
    if not summary.ok:
        console.print("[red]demo finished with jobs not terminal[/red]")
        return 1
    return 0
