"""Shared fixtures live in tests/fixtures/, one plugin module per real component."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, settings

from syncd.localstack import DaemonProcess
from syncd.runtime import stale_compiled_modules

# Tests do not time things: a property example slowed by a busy CI machine is not a failure.
settings.register_profile("syncd", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("syncd")


if stale := stale_compiled_modules():
    pytest.exit(f"changed since compiled: {', '.join(stale)}; run `make test` to rebuild", 2)

pytest_plugins = [
    "tests.fixtures.kafka",
    "tests.fixtures.postgres",
    "tests.fixtures.sandbox",
    "tests.fixtures.store",
]


@pytest.fixture(autouse=True)
def _no_leftover_daemons() -> Iterator[None]:
    """A failed test must not leave `syncd run` processes behind."""
    yield
    DaemonProcess.kill_leftovers()
