"""A budget smaller than a batch (a normal staging setup): batches shrink to what one window
allows, `check-config` shows that, and `syncd run` delivers everything within the window."""

from __future__ import annotations

import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import orjson
import pytest

from syncd import synth
from syncd.localstack import (
    CONNECTION,
    DaemonProcess,
    daemon_config,
    produce,
    running_sandbox,
    sandbox_settings,
    to_toml,
    wait_for,
)

pytestmark = pytest.mark.integration

WINDOW_S = 5
BUDGET = 100  # records per window, far below the default batch.max_records (6000)
VIP_ONLY = [
    {
        "audience": "vip",
        "connection_id": CONNECTION,
        "audience_id": 413642381039213536,
        "country_code": "US",
    }
]


def small_budget_config(
    kafka: str, topic: str, sandbox_url: str, token_url: str, store: str
) -> Any:
    return daemon_config(
        bootstrap=kafka,
        topic=topic,
        sandbox_url=sandbox_url,
        token_url=token_url,
        store_url=store,
        destinations=VIP_ONLY,
        budget={"records_per_hour": BUDGET, "window_seconds": WINDOW_S},
        batch={"max_records": 6000, "linger_ms": 100},
    )


def test_check_config_shows_the_batch_size_the_budget_allows(tmp_path: Path) -> None:
    raw = small_budget_config(
        "127.0.0.1:1",
        "t",
        "http://127.0.0.1:1",
        "http://127.0.0.1:1/auth/o2/token",
        f"sqlite+aiosqlite:///{tmp_path / 's.db'}",
    )
    path = tmp_path / "syncd.toml"
    path.write_text(to_toml(raw))
    done = subprocess.run(
        [sys.executable, "-m", "syncd", "check-config", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    effective = orjson.loads(done.stdout)
    assert effective["batch"]["max_records"] == BUDGET
    assert effective["budget"]["records_per_hour"] == BUDGET
    assert effective["amazon"]["client_secret"] == "***"


async def test_a_budget_smaller_than_a_batch_delivers_everything_within_the_window(
    kafka: Any, tmp_path: Path
) -> None:
    topic = f"small-budget-{uuid.uuid4().hex[:8]}"
    await kafka.create_topic(topic, partitions=1)
    backlog = 3 * BUDGET
    await produce(kafka.bootstrap, topic, synth.events(backlog, seed=31, audiences=("vip",)))
    settings = sandbox_settings(window_seconds=WINDOW_S, window_budget=BUDGET)
    async with running_sandbox(settings) as sandbox:
        raw = small_budget_config(
            kafka.bootstrap,
            topic,
            sandbox.url,
            sandbox.token_url,
            f"sqlite+aiosqlite:///{tmp_path / 's.db'}",
        )
        daemon = DaemonProcess(tmp_path, raw).start()

        async def all_sent() -> bool:
            daemon.check_alive()
            return len(sandbox.state.ledger(CONNECTION)) >= backlog

        await wait_for(all_sent, 90, "the backlog delivered under the small budget")
        assert await daemon.terminate() == 0
        stats = sandbox.state.stats()
        assert 0 < stats["max_window_records"][CONNECTION] <= BUDGET
        assert stats["budget_exceeded"].get(CONNECTION, 0) == 0
        assert not {k for k in stats["requests"] if k.endswith(" 400")}
        jobs: dict[str, int] = {}
        for entry in sandbox.state.ledger(CONNECTION):
            jobs[entry["jobRequestId"]] = jobs.get(entry["jobRequestId"], 0) + 1
        assert max(jobs.values()) <= BUDGET
