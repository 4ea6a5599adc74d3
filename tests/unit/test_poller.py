"""The poller with a fake Amazon client, on a real SQLite store with an injected clock."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from syncd.amazon.api import InvalidRecord, JobStatus
from syncd.config import PollConfig
from syncd.errors import AmazonError, AuthError, RetryableError
from syncd.jobs import IDLE_MAX_S, Poller, poll_interval
from syncd.observability.metrics import REGISTRY
from syncd.store import NewJob, Store
from tests.unit.test_store import T0, FakeClock

CFG = PollConfig(
    first_delay_s=10, max_interval_s=60, max_job_age_s=1000, concurrency=2, claim_batch=5
)


class FakeClient:
    """Answers from a script per job (default PENDING); records every GET."""

    def __init__(self) -> None:
        self.script: dict[str, list[JobStatus | AmazonError]] = {}
        self.calls: list[str] = []
        self.active = 0
        self.peak = 0
        self.called = asyncio.Event()

    async def get_job(self, job_request_id: str) -> JobStatus:
        self.calls.append(job_request_id)
        self.called.set()
        self.active += 1
        self.peak = max(self.peak, self.active)
        await asyncio.sleep(0)  # let other polls start: the concurrency bound is observable
        self.active -= 1
        queue = self.script.get(job_request_id, [])
        answer = queue.pop(0) if queue else JobStatus(job_request_id, "PENDING")
        if isinstance(answer, AmazonError):
            raise answer
        return answer


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def store(tmp_path: Path, clock: FakeClock) -> AsyncIterator[Store]:
    s = await Store.connect(f"sqlite+aiosqlite:///{tmp_path / 'p.db'}", clock=clock)
    await s.ensure_schema(auto_upgrade=True)
    yield s
    await s.close()


@pytest.fixture
def client() -> FakeClient:
    return FakeClient()


@pytest.fixture
def poller(store: Store, client: FakeClient, clock: FakeClock) -> Poller:
    return Poller(store, client, CFG, owner="replica-a", clock=clock)


async def add(store: Store, job_id: str, after: float = CFG.first_delay_s) -> None:
    await store.add_job(NewJob(job_id, "conn-1", 7, "vip", 100, 60, 40), first_poll_after_s=after)


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_interval_doubles_from_first_delay_up_to_the_maximum() -> None:
    assert [poll_interval(n, CFG) for n in range(5)] == [10, 20, 40, 60, 60]
    assert poll_interval(10_000, CFG) == 60


async def test_backoff_grows_and_terminal_job_is_never_polled_again(
    store: Store, client: FakeClient, poller: Poller, clock: FakeClock
) -> None:
    await add(store, "job-1")
    client.script["job-1"] = [JobStatus("job-1", "PENDING")] * 4 + [
        JobStatus("job-1", "SUCCEEDED", processed_rate=100.0)
    ]
    assert await poller.poll_once() == IDLE_MAX_S  # first poll is due in 10 s
    assert client.calls == []
    poll_times = []
    for _ in range(200):
        clock.advance(1)
        await poller.poll_once()
        if len(client.calls) > len(poll_times):
            poll_times.append(clock.now - T0)
    # polled at 10, then +20, +40, +60 (capped), +60; terminal after the fifth poll
    assert poll_times == [10, 30, 70, 130, 190]
    [row] = await store.list_jobs()
    assert (row.state, row.polls, row.terminal_at) == ("SUCCEEDED", 5, T0 + 190)


async def test_terminal_job_records_metrics_and_reasons(
    store: Store, client: FakeClient, poller: Poller, clock: FakeClock
) -> None:
    reason = "unit-test-reason-42"
    before_finished = sample("syncd_jobs_finished_total", state="PARTIALLYSUCCEEDED")
    before_invalid = sample("syncd_invalid_records_total", reason=reason)
    before_rate = sample("syncd_job_processed_rate_percent_count")
    await add(store, "job-1", after=0)
    client.script["job-1"] = [
        JobStatus(
            "job-1",
            "PARTIALLYSUCCEEDED",
            processed_rate=97.0,
            invalid_records=(InvalidRecord("p1", reason), InvalidRecord("p2", reason)),
        )
    ]
    clock.advance(5)
    await poller.poll_once()
    assert sample("syncd_jobs_finished_total", state="PARTIALLYSUCCEEDED") == before_finished + 1
    assert sample("syncd_invalid_records_total", reason=reason) == before_invalid + 2
    assert sample("syncd_job_processed_rate_percent_count") == before_rate + 1
    assert sample("syncd_jobs", state="PARTIALLYSUCCEEDED") >= 1
    [row] = await store.list_jobs()
    assert row.invalid_reasons == {reason: 2}
    clock.advance(10_000)
    for _ in range(3):
        await poller.poll_once()
    assert client.calls == ["job-1"]


async def test_old_jobs_expire_and_are_not_polled(
    store: Store, client: FakeClient, poller: Poller, clock: FakeClock
) -> None:
    before = sample("syncd_jobs_finished_total", state="EXPIRED")
    await add(store, "old", after=2000)  # never due before it is too old
    clock.advance(1000)
    await poller.poll_once()
    assert client.calls == []
    assert await store.job_states(["old"]) == {"old": "EXPIRED"}
    assert sample("syncd_jobs_finished_total", state="EXPIRED") == before + 1
    clock.advance(5000)
    await poller.poll_once()
    assert client.calls == []


async def test_failed_get_is_retried_with_backoff(
    store: Store, client: FakeClient, poller: Poller, clock: FakeClock
) -> None:
    await add(store, "job-1", after=0)
    client.script["job-1"] = [RetryableError("HTTP 503", status=503)]
    await poller.poll_once()
    [row] = await store.list_jobs()
    assert (row.state, row.polls, row.error) == ("PENDING", 1, "HTTP 503")
    assert row.next_poll_at == T0 + poll_interval(1, CFG)
    clock.advance(poll_interval(1, CFG))
    await poller.poll_once()
    assert client.calls == ["job-1", "job-1"]
    [row] = await store.list_jobs()
    assert (row.polls, row.error) == (2, None)


async def test_concurrency_is_bounded_and_full_batches_loop_at_once(
    store: Store, client: FakeClient, poller: Poller, clock: FakeClock
) -> None:
    for i in range(7):
        await add(store, f"job-{i}", after=0)
    assert await poller.poll_once() == 0.0  # a full claim batch: more may be due
    assert len(client.calls) == CFG.claim_batch
    assert client.peak == CFG.concurrency
    assert await poller.poll_once() == IDLE_MAX_S
    assert Counter(client.calls) == {f"job-{i}": 1 for i in range(7)}


async def test_two_pollers_never_poll_one_job_twice(
    store: Store, client: FakeClient, clock: FakeClock
) -> None:
    for i in range(40):
        await add(store, f"job-{i}", after=0)
    a = Poller(store, client, CFG, owner="a", clock=clock)
    b = Poller(store, client, CFG, owner="b", clock=clock)
    while len(client.calls) < 40:
        await asyncio.gather(a.poll_once(), b.poll_once())
    assert Counter(client.calls) == {f"job-{i}": 1 for i in range(40)}


async def test_auth_error_stops_the_poller(
    store: Store, client: FakeClient, poller: Poller
) -> None:
    await add(store, "job-1", after=0)
    client.script["job-1"] = [AuthError("invalid_grant")]
    with pytest.raises(AuthError):  # ends by itself: the daemon turns fatal and unready
        await asyncio.wait_for(poller.run(asyncio.Event()), timeout=10)
    assert client.calls == ["job-1"]


async def test_run_polls_until_stopped(store: Store, client: FakeClient, poller: Poller) -> None:
    await add(store, "job-1", after=0)
    stop = asyncio.Event()
    task = asyncio.ensure_future(poller.run(stop))
    await asyncio.wait_for(client.called.wait(), timeout=10)
    stop.set()
    await asyncio.wait_for(task, timeout=10)
    assert client.calls == ["job-1"]
    [row] = await store.list_jobs()
    assert row.polls == 1
