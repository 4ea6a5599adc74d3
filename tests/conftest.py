"""Shared fixtures live in tests/fixtures/, one plugin module per real component."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.harness import DaemonProcess

pytest_plugins = [
    "tests.fixtures.kafka",
    "tests.fixtures.postgres",
    "tests.fixtures.sandbox",
]


@pytest.fixture(autouse=True)
def _no_leftover_daemons() -> Iterator[None]:
    """A failed test must not leave `syncd run` processes behind."""
    yield
    DaemonProcess.kill_leftovers()
