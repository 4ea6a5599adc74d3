"""Writes that must not be lost: retried until the store takes them.

A store outage must stop progress, not lose state: a job row not stored means its offsets are
not acknowledged, and a budget reservation not recorded means no POST. Callers wait here, with
capped exponential backoff, until the database is back; the wait is what applies backpressure.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TypeVar

from syncd.observability.logging import get_logger

log = get_logger("syncd.store")

T = TypeVar("T")

FIRST_PAUSE_S = 0.5
MAX_PAUSE_S = 30.0


async def persist(
    op: Callable[[], Awaitable[T]],
    *,
    what: str,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
) -> T:
    """`await op()`, retried on any error until it succeeds. `what` names it in the log."""
    pause = FIRST_PAUSE_S
    while True:
        try:
            return await op()
        except Exception as exc:  # the store is unreachable or refused; nothing else to do
            log.warning("store write failed; retrying", what=what, error=repr(exc)[:300])
            await sleep(pause)
            pause = min(pause * 2, MAX_PAUSE_S)
