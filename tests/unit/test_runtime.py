"""Process tuning: every process collects young objects less often; the daemon's also hands the
GIL to its helper threads sooner."""

from __future__ import annotations

import gc
import sys
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


@pytest.mark.usefixtures("restored")
@pytest.mark.parametrize("daemon", [False, True])
def test_tuning_applies_the_gc_thresholds_and_the_daemons_switch_interval(daemon: bool) -> None:
    default_interval = sys.getswitchinterval()
    assert default_interval != DAEMON_SWITCH_INTERVAL_S
    tune_process(daemon=daemon)
    assert gc.get_threshold() == (50_000, 20, 10)
    assert sys.getswitchinterval() == pytest.approx(
        DAEMON_SWITCH_INTERVAL_S if daemon else default_interval
    )
