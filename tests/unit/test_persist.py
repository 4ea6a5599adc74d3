"""`persist`: a store write is retried through the database's and the network's transient
errors, and anything else (a bug, a constraint) fails at once."""

from __future__ import annotations

import sqlite3
from collections.abc import Awaitable, Callable

import pytest
from sqlalchemy.exc import DBAPIError, IntegrityError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError

from syncd.store import persist
from syncd.store.persist import FIRST_PAUSE_S


class PgError(Exception):
    """What asyncpg's errors carry, as SQLAlchemy wraps them: a SQLSTATE."""

    def __init__(self, sqlstate: str) -> None:
        super().__init__(f"sqlstate {sqlstate}")
        self.sqlstate = sqlstate


def failing_once(error: BaseException) -> tuple[Callable[[], Awaitable[str]], list[int]]:
    """An operation that raises `error` on its first call and succeeds on the next."""
    calls: list[int] = []

    async def op() -> str:
        calls.append(1)
        if len(calls) == 1:
            raise error
        return "stored"

    return op, calls


class Pauses(list[float]):
    async def __call__(self, seconds: float) -> None:
        self.append(seconds)


TRANSIENT = [
    ConnectionRefusedError(111, "Connection refused"),  # the server is down (connect)
    ConnectionResetError(104, "Connection reset by peer"),
    OSError("store down"),
    TimeoutError(),  # asyncio.timeout, asyncio.TimeoutError
    PoolTimeoutError("QueuePool limit reached"),
    OperationalError("INSERT", {}, sqlite3.OperationalError("database is locked")),
    DBAPIError("SELECT 1", {}, PgError("57P01"), connection_invalidated=True),  # admin shutdown
    DBAPIError("SELECT 1", {}, PgError("57P03")),  # the server is starting up (connect)
    DBAPIError("SELECT 1", {}, PgError("08006")),  # connection failure
    DBAPIError("INSERT", {}, PgError("57014")),  # cancelled: the role's statement_timeout
    DBAPIError("UPDATE", {}, PgError("40001")),  # serialization failure
    DBAPIError("UPDATE", {}, PgError("40P01")),  # deadlock
]


@pytest.mark.parametrize("error", TRANSIENT, ids=lambda e: type(e).__name__)
async def test_transient_errors_are_retried_until_the_write_succeeds(error: Exception) -> None:
    op, calls = failing_once(error)
    pauses = Pauses()
    assert await persist(op, what="job row", sleep=pauses) == "stored"
    assert (len(calls), pauses) == (2, [FIRST_PAUSE_S])


async def test_the_pause_doubles_while_the_store_stays_down() -> None:
    calls: list[int] = []

    async def op() -> str:
        calls.append(1)
        if len(calls) <= 4:
            raise ConnectionRefusedError(111, "Connection refused")
        return "stored"

    pauses = Pauses()
    assert await persist(op, what="job row", sleep=pauses) == "stored"
    assert pauses == [FIRST_PAUSE_S * 2**i for i in range(4)]


PERMANENT = [
    TypeError("op() takes 0 positional arguments but 1 was given"),
    ValueError("'PENDING' is not a terminal job state"),
    KeyError("audience"),
    IntegrityError("INSERT", {}, sqlite3.IntegrityError("UNIQUE constraint failed")),
    DBAPIError("INSERT", {}, PgError("23505")),  # unique violation, as asyncpg's Error
    DBAPIError("SELECT", {}, PgError("42P01")),  # undefined table: a schema not migrated
]


@pytest.mark.parametrize("error", PERMANENT, ids=lambda e: type(e).__name__)
async def test_any_other_error_is_raised_at_once_not_retried(error: Exception) -> None:
    op, calls = failing_once(error)
    pauses = Pauses()
    with pytest.raises(type(error)) as raised:
        await persist(op, what="job row", sleep=pauses)
    assert raised.value is error
    assert (len(calls), pauses) == (1, [])
