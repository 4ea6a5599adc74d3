"""Two pollers (two Poller instances, each with its own store engine and Amazon client, as two
replicas have) on one PostgreSQL, against a sandbox that throttles the status GETs hard: the
sandbox's own counters show that no job was polled by both at once and none was polled after
its terminal state was seen."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from syncd.amazon.client import AmazonClient
from syncd.config import AmazonConfig, PollConfig
from syncd.jobs import Poller
from syncd.localstack import wait_for
from syncd.sandbox.server import RunningSandbox, running_sandbox
from syncd.sandbox.state import SandboxSettings
from syncd.store import NewJob, Store

pytestmark = pytest.mark.integration

JOBS = 60
LEASE_S = 8.0  # a poller holding all its claims' leases from one claim would need ~15 s of GETs
AUDIENCE_ID = 413642381039213536


def amazon_config(sb: RunningSandbox) -> AmazonConfig:
    return AmazonConfig(
        client_id="sandbox-client-id",
        client_secret="sandbox-client-secret",
        refresh_token="sandbox-refresh-token",
        api_url=sb.url,
        token_url=sb.token_url,
        request_timeout_s=5.0,
        backoff_base_s=0.2,
        backoff_max_s=1.0,
        max_attempts=100,
    )


def accepted_job(sb: RunningSandbox, i: int) -> str:
    """A job the sandbox accepted, as if POSTed (a one-record body, terminal at once)."""
    body: dict[str, Any] = {
        "audienceId": AUDIENCE_ID,
        "targetResource": {"connectionId": "conn-1"},
        "records": [{"externalUserId": f"user-{i}", "countryCode": "US", "action": "CREATE"}],
    }
    job_id: str = sb.state.accept_records(body)
    return job_id


async def test_two_throttled_pollers_never_poll_one_job_twice_at_once_or_after_its_end(
    pg_url: str,
) -> None:
    # 4 GETs per second for the one client id, little burst: most GETs get a 429 first
    settings = SandboxSettings(job_delay_s=0.0, rate_per_s=4.0, burst=4, latency_s=0.02, seed=5)
    cfg = PollConfig(first_delay_s=0.2, max_interval_s=0.5, concurrency=4, claim_batch=50)
    async with running_sandbox(settings) as sb:
        stores = [await Store.connect(pg_url) for _ in range(2)]
        await stores[0].ensure_schema(auto_upgrade=True)
        ids = [accepted_job(sb, i) for i in range(JOBS)]
        for job_id in ids:
            await stores[0].add_job(
                NewJob(job_id, "conn-1", AUDIENCE_ID, "vip", 1, 1, 0), first_poll_after_s=0
            )
        stop = asyncio.Event()
        async with (
            AmazonClient(amazon_config(sb)) as client_a,
            AmazonClient(amazon_config(sb)) as client_b,
        ):
            pollers = [
                Poller(stores[0], client_a, cfg, owner="replica-a", lease_s=LEASE_S),
                Poller(stores[1], client_b, cfg, owner="replica-b", lease_s=LEASE_S),
            ]
            tasks = [asyncio.ensure_future(p.run(stop)) for p in pollers]

            async def all_ended() -> bool:
                for task in tasks:
                    if task.done():
                        task.result()  # a poller that stopped by itself fails the test
                states = await stores[0].job_states(ids)
                return "PENDING" not in states.values()

            try:
                await wait_for(all_ended, 120, "every job polled to its end")
            finally:
                stop.set()
                await asyncio.gather(*tasks)
                for s in stores:
                    await s.close()
        stats = sb.state.stats()
    assert stats["throttled"] > 0  # the GETs were throttled: the test exercised the leases
    assert stats["max_concurrent_polls_per_job"] <= 1
    assert stats["terminal_polls"] == 0
