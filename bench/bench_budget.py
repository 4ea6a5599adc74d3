"""Budget utilisation benchmark: a budget-bound backlog through `syncd run` (a real process)
into the sandbox, read from the sandbox's own arrival times. Reports the largest rolling window
(must not exceed the budget) and the utilisation of the budget.

A batch that does not fit what is left of the window waits for the next one, so up to one batch
per window can go unused: `--batch` keeps the ratio of batch to budget near production's (6,000
records against 15M per hour is 1/2,500; the default here is 1/100). The backlog is one budget
larger than the measured windows can carry, so the sender is never short of records in them.

    .venv/bin/python bench/bench_budget.py [--window-s 20] [--budget 20000] [--windows 3]
                                           [--batch 200]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
from pathlib import Path

from syncd import synth
from syncd.localstack import (
    CONNECTION,
    DESTINATIONS,
    DaemonProcess,
    EmbeddedBroker,
    produce,
    running_sandbox,
    sandbox_settings,
    sqlite_daemon_config,
    wait_for,
)

TOPIC = "bench-budget"


async def main(window_s: int, budget: int, windows: int, batch: int) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="syncd-bench-budget-"))
    backlog = (windows + 1) * budget
    broker = EmbeddedBroker()
    await broker.start()
    settings = sandbox_settings(job_delay_s=0.5, window_seconds=window_s, window_budget=budget)
    try:
        await broker.create_topic(TOPIC, 4)
        await produce(broker.bootstrap, TOPIC, synth.events(backlog, seed=5, audiences=("vip",)))
        async with running_sandbox(settings) as sandbox:
            raw = sqlite_daemon_config(
                broker.bootstrap,
                sandbox,
                TOPIC,
                tmp,
                group="bench-budget",
                destinations=[DESTINATIONS[0]],  # vip, on CONNECTION
                budget={"records_per_hour": budget, "window_seconds": window_s},
                batch={"linger_ms": 200, "max_records": batch},
                log={"level": "warning"},
            )
            daemon = DaemonProcess(tmp, raw).start()

            async def all_sent() -> bool:
                daemon.check_alive()
                return len(sandbox.state.ledger(CONNECTION)) >= backlog

            await wait_for(all_sent, windows * window_s * 3, "the backlog delivered")
            await daemon.terminate()
            arrivals = sorted(e["receivedAt"] for e in sandbox.state.ledger(CONNECTION))
            stats = sandbox.state.stats()
    finally:
        broker.stop()
    busy_s = arrivals[-1] - arrivals[0] + window_s
    utilisation = len(arrivals) / (budget * busy_s / window_s)
    # the budget's own pace: the first `windows` windows from the first arrival must carry a
    # full budget each (a sender that refills the moment records leave the window)
    in_full = sum(1 for t in arrivals if t < arrivals[0] + windows * window_s)
    paced = in_full / (windows * budget)
    print(f"machine: {os.cpu_count()} cores, Python {sys.version.split()[0]}")
    print(
        f"budget: {budget:,} records per {window_s}s window, batches of <= {batch:,}; "
        f"backlog {backlog:,} records"
    )
    print(f"largest rolling window: {stats['max_window_records'][CONNECTION]:,} records")
    print(f"budget exceeded: {stats['budget_exceeded'].get(CONNECTION, 0)} times")
    print(f"utilisation of the first {windows} windows: {paced:.2%}")
    print(f"utilisation over the whole busy period ({busy_s:.1f}s): {utilisation:.2%}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--window-s", type=int, default=20)
    parser.add_argument("--budget", type=int, default=20_000)
    parser.add_argument("--windows", type=int, default=3)
    parser.add_argument("--batch", type=int, default=200)
    args = parser.parse_args()
    asyncio.run(main(args.window_s, args.budget, args.windows, args.batch))
