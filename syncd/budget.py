"""The per-connection rolling-window budget (`[budget]`), shared through the store.

Every POST first reserves its records (`acquire`); the reservation is confirmed once Amazon
accepted the POST (re-stamped at the send time) or released if the POST never happened. The store
makes each reservation atomic, so restarts and replicas share one budget.

When a connection is out of budget its senders wait here; `is_waiting` tells the pipeline to
pause the partitions that feed it. Waits are capped at `MAX_NAP_S` so that budget another replica
released is noticed early; with a backlog the next reservation lands the moment the window frees
up, which is what keeps utilisation near 100%.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Protocol

from syncd.config import BudgetConfig
from syncd.observability import metrics
from syncd.observability.logging import get_logger
from syncd.store.persist import persist

log = get_logger("syncd.budget")

MAX_NAP_S = 5.0


class BudgetStore(Protocol):
    async def reserve(
        self, connection_id: str, records: int, limit: int, window_s: float, hold_s: float
    ) -> tuple[int | None, float]: ...
    async def release(self, reservation_id: int) -> None: ...
    async def confirm(self, reservation_id: int) -> None: ...
    async def budget_used(self, connection_id: str, window_s: float, hold_s: float) -> int: ...


class Budget:
    """Reserve records against `cfg.records_per_hour` per rolling `cfg.window_seconds`."""

    def __init__(
        self,
        store: BudgetStore,
        cfg: BudgetConfig,
        *,
        hold_s: float = 0.0,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """`hold_s`: the longest a POST may stay in flight (its retries included); its
        reservation counts that long plus a window unless confirmed."""
        self._store = store
        self._limit = cfg.records_per_hour
        self._window_s = float(cfg.window_seconds)
        self._hold_s = hold_s
        self._sleep = sleep
        self._clock = clock
        self._waiting: Counter[str] = Counter()  # connection -> acquirers waiting for budget

    def is_waiting(self, connection_id: str) -> bool:
        """True while some batch of `connection_id` waits for budget."""
        return self._waiting[connection_id] > 0

    async def acquire(self, connection_id: str, records: int) -> int:
        """Wait until `records` fit the connection's window, reserve them, return the
        reservation id."""
        if records > self._limit:
            raise ValueError(
                f"a batch of {records} records can never fit budget.records_per_hour = "
                f"{self._limit}: lower batch.max_records or raise the budget"
            )
        metrics.BUDGET_LIMIT.labels(connection_id).set(self._limit)
        reservation, wait_s = await self._reserve(connection_id, records)
        if reservation is None:
            reservation = await self._wait_for_budget(connection_id, records, wait_s)
        await self._update_usage(connection_id)
        return reservation

    async def release(self, reservation_id: int) -> None:
        await persist(lambda: self._store.release(reservation_id), what="budget release")

    async def confirm(self, reservation_id: int) -> None:
        await persist(lambda: self._store.confirm(reservation_id), what="budget confirm")

    async def _reserve(self, connection_id: str, records: int) -> tuple[int | None, float]:
        return await persist(
            lambda: self._store.reserve(
                connection_id, records, self._limit, self._window_s, self._hold_s
            ),
            what="budget reservation",
        )

    async def _wait_for_budget(self, connection_id: str, records: int, wait_s: float) -> int:
        paused = metrics.BUDGET_PAUSED.labels(connection_id)
        if not self._waiting[connection_id]:
            paused.set(1)
            log.warning(
                f"budget exhausted; resuming in {wait_s:.1f}s",
                connection=connection_id,
                records=records,
                resume_in_s=round(wait_s, 3),
            )
        self._waiting[connection_id] += 1
        try:
            while True:
                metrics.BUDGET_RESUME_AT.labels(connection_id).set(self._clock() + wait_s)
                await self._update_usage(connection_id)
                nap = min(wait_s, MAX_NAP_S)
                await self._sleep(nap)
                metrics.BUDGET_PAUSED_SECONDS.labels(connection_id).inc(nap)
                reservation, wait_s = await self._reserve(connection_id, records)
                if reservation is not None:
                    log.info("budget available; resuming", connection=connection_id)
                    return reservation
        finally:
            self._waiting[connection_id] -= 1
            if not self._waiting[connection_id]:
                del self._waiting[connection_id]
                paused.set(0)

    async def _update_usage(self, connection_id: str) -> None:
        try:
            used = await self._store.budget_used(connection_id, self._window_s, self._hold_s)
        except Exception:  # metrics only; a store outage is retried where it matters
            return
        metrics.BUDGET_USED.labels(connection_id).set(used)
        metrics.BUDGET_REMAINING.labels(connection_id).set(max(0, self._limit - used))
