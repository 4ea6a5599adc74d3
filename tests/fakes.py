"""Test doubles shared by the tests: clocks that move only when a test (or the code under
test, by sleeping) moves them, and the wait for a condition on the event loop."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

T0 = 1_800_000_000.0  # a wall-clock epoch for FakeClock


class FakeClock:
    """A wall clock (epoch seconds) the test moves by hand: `clock()`, `advance(s)`, `.now`."""

    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class FakeTime:
    """A monotonic clock that only moves when the code under test sleeps; `sleeps` records
    every pause asked for."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


async def until(condition: Callable[[], bool], what: str, *, deadline_s: float = 10.0) -> None:
    """Let the loop run until `condition` holds; fail with `what` after `deadline_s`."""
    deadline = time.monotonic() + deadline_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for: {what}")
        await asyncio.sleep(0.001)
