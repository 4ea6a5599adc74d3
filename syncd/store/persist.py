"""Writes that must not be lost: retried through the store's transient errors until it takes them.

A store outage must stop progress, not lose state: a job row not stored means its offsets are
not acknowledged, and a budget reservation not recorded means no POST. Callers wait here, with
capped exponential backoff, until the database is back; the wait is what applies backpressure.
Only an outage is waited out (`transient`); any other error is a bug or a refusal that no wait
would cure, and is raised at once.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TypeVar

from sqlalchemy.exc import DBAPIError, DisconnectionError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError

from syncd.observability.logging import get_logger

log = get_logger("syncd.store")

T = TypeVar("T")

FIRST_PAUSE_S = 0.5
# Short: once the store is back, a write held through the outage (a job row after its 202, a
# terminal poll) lands within seconds, before the leases that ran out meanwhile let another
# replica claim the same members or job.
MAX_PAUSE_S = 5.0

# PostgreSQL SQLSTATEs that a wait cures: classes 08 (connection exception), 53 (insufficient
# resources: too many connections, disk full) and 57P (shutdown, crash, starting up), 57014 (a
# statement cancelled: the server's statement_timeout, set on the role or database, as syncd's
# own timeout is; or an operator's pg_cancel_backend), and the conflicts a retried transaction
# gets past (serialization failure, deadlock, lock not free).
_TRANSIENT_SQLSTATE_PREFIXES = ("08", "53", "57P", "57014")
_CONFLICT_SQLSTATES = frozenset({"40001", "40P01", "55P03"})


def transient(exc: BaseException) -> bool:
    """The store or the network is unavailable for now: the same write may succeed later.

    - the network: OSError (refused, reset, unreachable, DNS) and timeouts (asyncio's included);
    - SQLAlchemy: a lost connection (`connection_invalidated`, DisconnectionError), the pool's
      checkout timeout, and OperationalError (SQLite: database locked, disk I/O);
    - PostgreSQL: the SQLSTATEs above, on SQLAlchemy's wrapper or a bare asyncpg error.
    Anything else (TypeError, IntegrityError, a missing table, ...) is not."""
    if isinstance(exc, OSError | TimeoutError | PoolTimeoutError | DisconnectionError):
        return True
    if isinstance(exc, DBAPIError) and (
        exc.connection_invalidated or isinstance(exc, OperationalError)
    ):
        return True
    sqlstate = _sqlstate(exc)
    return isinstance(sqlstate, str) and (
        sqlstate.startswith(_TRANSIENT_SQLSTATE_PREFIXES) or sqlstate in _CONFLICT_SQLSTATES
    )


def conflict(exc: BaseException) -> bool:
    """A transaction lost to another (serialization failure, deadlock, lock not free): the store
    itself is fine, the transaction is simply run again."""
    return _sqlstate(exc) in _CONFLICT_SQLSTATES


def _sqlstate(exc: BaseException) -> object:
    return getattr(exc.orig if isinstance(exc, DBAPIError) else exc, "sqlstate", None)


async def persist(
    op: Callable[[], Awaitable[T]],
    *,
    what: str,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
) -> T:
    """`await op()`, retried on transient errors until it succeeds; any other error is raised
    from the first attempt. `what` names the write in the log."""
    pause = FIRST_PAUSE_S
    while True:
        try:
            return await op()
        except Exception as exc:
            if not transient(exc):
                raise
            log.warning("store write failed; retrying", what=what, error=repr(exc)[:300])
            await sleep(pause)
            pause = min(pause * 2, MAX_PAUSE_S)
