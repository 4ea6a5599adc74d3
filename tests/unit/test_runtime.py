"""Process tuning: every process collects young objects less often (yet still collects cyclic
garbage) and exempts its start-up objects; the daemon's also hands the GIL to its helper threads
sooner."""

from __future__ import annotations

import gc
import sys
import weakref
from collections.abc import Iterator

import pytest

from syncd.runtime import DAEMON_SWITCH_INTERVAL_S, tune_process


@pytest.fixture
def restored() -> Iterator[None]:
    interval, thresholds = sys.getswitchinterval(), gc.get_threshold()
    yield
    sys.setswitchinterval(interval)
    gc.set_threshold(*thresholds)
    gc.unfreeze()


class Node:
    def __init__(self) -> None:
        self.me = self  # a reference cycle: only the cycle collector frees it


def allocate(n: int) -> list[list[int]]:
    """`n` new container objects, each counted towards the next young collection."""
    return [[] for _ in range(n)]


@pytest.mark.usefixtures("restored")
def test_young_garbage_is_collected_less_often_but_still_collected() -> None:
    tune_process()
    assert gc.get_freeze_count() > 0  # start-up objects are out of every later collection
    gc.collect(0)  # start counting allocations from here
    young_collections = gc.get_stats()[0]["collections"]
    freed: list[bool] = []
    cycle = Node()
    weakref.finalize(cycle, freed.append, True)
    del cycle

    kept = allocate(10_000)  # CPython's default collects young objects every 700 allocations
    assert gc.get_stats()[0]["collections"] == young_collections
    assert freed == []

    kept += allocate(60_000)
    assert gc.get_stats()[0]["collections"] > young_collections
    assert freed == [True]  # the cycle went without any explicit gc.collect()


@pytest.mark.usefixtures("restored")
@pytest.mark.parametrize("daemon", [False, True])
def test_only_the_daemon_shortens_the_switch_interval(daemon: bool) -> None:
    default_interval = sys.getswitchinterval()
    assert default_interval != DAEMON_SWITCH_INTERVAL_S
    tune_process(daemon=daemon)
    assert sys.getswitchinterval() == pytest.approx(
        DAEMON_SWITCH_INTERVAL_S if daemon else default_interval
    )
