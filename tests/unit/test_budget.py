"""Budget on a real SQLite store with an injected clock; the sleep advances that clock."""

from __future__ import annotations

import asyncio
import math
import uuid
from pathlib import Path

import pytest

from syncd.budget import MAX_NAP_S, Budget
from syncd.config import BudgetConfig
from syncd.observability.metrics import REGISTRY
from syncd.store import Store
from tests.fakes import T0, FakeClock

WINDOW = 100
LIMIT = 1000


class Sleeper:
    """A fake asyncio.sleep: advances the clock, records each nap and what the budget said."""

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock
        self.naps: list[float] = []
        self.probe: list[bool] = []
        self.budget: Budget | None = None
        self.connection = ""

    async def __call__(self, seconds: float) -> None:
        if self.budget is not None:
            self.probe.append(self.budget.is_waiting(self.connection))
        self.naps.append(seconds)
        self.clock.advance(seconds)
        await asyncio.sleep(0)  # yield, like a real sleep


@pytest.fixture
def setup(store: Store, clock: FakeClock) -> tuple[Budget, Store, FakeClock, Sleeper]:
    sleeper = Sleeper(clock)
    budget = Budget(
        store,
        BudgetConfig(records_per_hour=LIMIT, window_seconds=WINDOW),
        sleep=sleeper,
        clock=clock,
    )
    sleeper.budget = budget
    return budget, store, clock, sleeper


def gauge(name: str, connection: str) -> float | None:
    return REGISTRY.get_sample_value(name, {"connection": connection})


async def test_acquire_within_budget_does_not_wait(
    setup: tuple[Budget, Store, FakeClock, Sleeper],
) -> None:
    budget, store, _, sleeper = setup
    conn = uuid.uuid4().hex
    rid = await budget.acquire(conn, 600)
    await budget.confirm(rid)
    assert sleeper.naps == []
    assert not budget.is_waiting(conn)
    assert await store.budget_used(conn, WINDOW) == 600
    assert gauge("syncd_budget_used_records", conn) == 600
    assert gauge("syncd_budget_remaining_records", conn) == 400
    assert gauge("syncd_budget_limit_records", conn) == LIMIT


async def test_exhausted_budget_waits_until_the_window_frees(
    setup: tuple[Budget, Store, FakeClock, Sleeper],
) -> None:
    budget, _, clock, sleeper = setup
    conn = uuid.uuid4().hex
    sleeper.connection = conn
    await budget.confirm(await budget.acquire(conn, LIMIT))
    clock.advance(88)
    rid = await budget.acquire(conn, 1)
    # exactly 12 s of waiting, in naps of at most MAX_NAP_S, paused the whole time
    assert sleeper.naps == [MAX_NAP_S, MAX_NAP_S, 2.0]
    assert clock.now == T0 + 100
    assert sleeper.probe == [True, True, True]
    assert not budget.is_waiting(conn)
    assert gauge("syncd_budget_paused", conn) == 0
    assert gauge("syncd_budget_paused_seconds_total", conn) == 12
    assert rid > 0


async def test_release_lets_the_next_batch_in(
    setup: tuple[Budget, Store, FakeClock, Sleeper],
) -> None:
    budget, store, _, sleeper = setup
    conn = uuid.uuid4().hex
    rid = await budget.acquire(conn, LIMIT)
    await budget.release(rid)  # the POST never happened
    await budget.confirm(await budget.acquire(conn, LIMIT))
    assert sleeper.naps == []
    assert await store.budget_used(conn, WINDOW) == LIMIT


async def test_other_connections_keep_flowing(
    setup: tuple[Budget, Store, FakeClock, Sleeper],
) -> None:
    budget, _, _, sleeper = setup
    busy, other = uuid.uuid4().hex, uuid.uuid4().hex
    await budget.confirm(await budget.acquire(busy, LIMIT))
    waiting = asyncio.ensure_future(budget.acquire(busy, 10))
    await budget.confirm(await budget.acquire(other, LIMIT))
    assert await waiting > 0
    assert sleeper.naps  # only the exhausted connection waited


async def test_batch_larger_than_the_budget_is_a_config_error(
    setup: tuple[Budget, Store, FakeClock, Sleeper],
) -> None:
    budget, *_ = setup
    with pytest.raises(ValueError, match=r"budget\.records_per_hour"):
        await budget.acquire("c", LIMIT + 1)


class VirtualTime:
    """A fake sleep for many concurrent sleepers: time jumps to the earliest wake-up once every
    live task is asleep (never while one still works, e.g. waits for the database)."""

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock
        self.sleepers: list[tuple[float, asyncio.Future[None]]] = []
        self.changed = asyncio.Event()

    async def sleep(self, seconds: float) -> None:
        wake: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.sleepers.append((self.clock.now + seconds, wake))
        self.changed.set()
        await wake

    async def run(self, tasks: list[asyncio.Task[None]]) -> None:
        for task in tasks:
            task.add_done_callback(lambda _: self.changed.set())
        while alive := [t for t in tasks if not t.done()]:
            if len(self.sleepers) == len(alive):
                self.clock.now = min(at for at, _ in self.sleepers)
                for at, wake in [s for s in self.sleepers if s[0] <= self.clock.now]:
                    self.sleepers.remove((at, wake))
                    wake.set_result(None)
            self.changed.clear()
            if not any(t.done() for t in alive) and len(self.sleepers) < len(alive):
                await asyncio.wait_for(self.changed.wait(), timeout=10)
            else:
                await asyncio.sleep(0)
        for task in tasks:
            task.result()


async def test_concurrent_acquirers_never_exceed_any_window(tmp_path: Path) -> None:
    clock = FakeClock()
    vt = VirtualTime(clock)
    store = await Store.connect(f"sqlite+aiosqlite:///{tmp_path / 'b.db'}", clock=clock)
    await store.ensure_schema(auto_upgrade=True)
    window = 10  # naps of MAX_NAP_S are half a window: few rounds of virtual time
    budget = Budget(store, BudgetConfig(LIMIT, window), sleep=vt.sleep, clock=clock)
    sent: list[tuple[float, int]] = []

    async def send(records: int) -> None:
        rid = await budget.acquire("c", records)
        await budget.confirm(rid)
        sent.append((clock.now, records))

    sizes = [250, 100, 333, 17, 400, 250, 99, 1, 500, 120] * 4
    try:
        await vt.run([asyncio.ensure_future(send(n)) for n in sizes])
    finally:
        await store.close()
    assert sorted(n for _, n in sent) == sorted(sizes)
    for end, _ in sent:
        assert sum(n for t, n in sent if end - window < t <= end) <= LIMIT
    # no idle gaps: the backlog is through as soon as the windows it needs have passed
    assert clock.now - T0 <= window * math.ceil(sum(sizes) / LIMIT)


async def test_a_restarted_budget_on_the_same_store_keeps_the_window(
    setup: tuple[Budget, Store, FakeClock, Sleeper],
) -> None:
    """A new Budget (a restarted process, or another replica) over the same store sees what the
    old one reserved: the window is not reset."""
    first, store, clock, _ = setup
    conn = uuid.uuid4().hex
    await first.confirm(await first.acquire(conn, LIMIT - 100))
    clock.advance(30)
    sleeper = Sleeper(clock)
    second = Budget(store, BudgetConfig(LIMIT, WINDOW), sleep=sleeper, clock=clock)
    sleeper.budget, sleeper.connection = second, conn
    await second.confirm(await second.acquire(conn, 100))  # what is left fits at once
    assert sleeper.naps == []
    await second.confirm(await second.acquire(conn, 1))  # one more waits for the first's window
    assert clock.now == T0 + WINDOW
    assert sum(sleeper.naps) == WINDOW - 30
    assert all(sleeper.probe)
    assert await store.budget_used(conn, WINDOW) == 101
