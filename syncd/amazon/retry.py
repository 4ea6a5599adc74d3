"""Error taxonomy and retry policy for calls to Amazon Ads and Login with Amazon.

Retryable: 429 (honouring `Retry-After`), 5xx except 501, 408, timeouts and connection errors.
Everything else is fatal for the request: retrying the same request cannot succeed.
`nothing_accepted` tells which failures prove that Amazon did not take the request in: only
those may be resent under the same budget reservation (or release it).
Backoff is exponential with full jitter (AWS "Exponential Backoff And Jitter"), bounded both by
a number of attempts and by total elapsed time. Clock, sleep and randomness are injectable so
tests can drive the policy without waiting.
"""

from __future__ import annotations

import asyncio
import email.utils
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TypeVar

from syncd.config import AmazonConfig
from syncd.errors import (
    AmazonError,
    NotSentError,
    RejectedError,
    RetryableError,
    ThrottledError,
)
from syncd.observability import metrics
from syncd.observability.logging import get_logger

T = TypeVar("T")
Clock = Callable[[], float]
Sleep = Callable[[float], Awaitable[None]]
Rng = Callable[[], float]

log = get_logger("syncd.amazon.retry")


def classify(status: int) -> type[AmazonError]:
    """The error class for a non-2xx HTTP status (401 is handled by the caller: refresh once)."""
    if status == 429:
        return ThrottledError
    if status == 408 or (500 <= status <= 599 and status != 501):
        return RetryableError
    return RejectedError


TOKEN_OPERATION = "token"  # LwA's token request, which every API call may make first

# Refusals Amazon gives before it processes a request: the request was not taken in.
REFUSED_BEFORE_PROCESSING = frozenset({400, 401, 403, 404, 413})


def nothing_accepted(exc: AmazonError) -> bool:
    """Whether the failure proves Amazon accepted nothing: a 429, a refusal before processing
    (400/401/403/404/413), a request that never left, or a failed token request (the call went
    no further). A 5xx, a timeout, a dropped connection or an unreadable answer of Amazon may
    hide an accepted POST."""
    if isinstance(exc, ThrottledError | NotSentError) or exc.operation == TOKEN_OPERATION:
        return True
    return isinstance(exc, RejectedError) and exc.status in REFUSED_BEFORE_PROCESSING


MAX_RETRY_AFTER_S = 900.0  # a longer wait (inf, a far date) is capped: then syncd probes again


def parse_retry_after(value: str | None) -> float | None:
    """`Retry-After` as seconds (0 to MAX_RETRY_AFTER_S): delta-seconds or an HTTP date; None
    if absent/invalid."""
    if not value:
        return None
    text = value.strip()
    try:
        seconds = float(text)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(text)
        except (TypeError, ValueError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        seconds = (when - datetime.now(UTC)).total_seconds()
    if seconds != seconds:  # NaN
        return None
    return min(max(0.0, seconds), MAX_RETRY_AFTER_S)


def retry_reason(exc: RetryableError) -> str:
    """The `reason` label of syncd_request_retries_total for a retryable error."""
    if isinstance(exc, ThrottledError):
        return "throttled"
    if exc.status is not None:
        return "server_error"
    if isinstance(exc.__cause__, TimeoutError):
        return "timeout"
    return "connection"


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How often and how long to retry. `base_s * 2**(attempt-1)`, capped at `max_s`, jittered."""

    max_attempts: int = 8
    max_time_s: float = 300.0
    base_s: float = 0.5
    max_s: float = 60.0

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be >= 1")
        if self.max_time_s < 0 or self.base_s < 0 or self.max_s < 0:
            raise ValueError("times must be >= 0")

    @classmethod
    def from_config(cls, cfg: AmazonConfig) -> RetryPolicy:
        return cls(
            max_attempts=cfg.max_attempts,
            max_time_s=cfg.max_retry_time_s,
            base_s=cfg.backoff_base_s,
            max_s=cfg.backoff_max_s,
        )

    def backoff(self, attempt: int, rng: Rng = random.random) -> float:
        """Full jitter: uniform in [0, min(max_s, base_s * 2**(attempt-1))]; attempt >= 1."""
        ceiling = min(self.max_s, self.base_s * 2.0 ** min(attempt - 1, 62))
        return rng() * ceiling

    def delay(self, attempt: int, exc: RetryableError, rng: Rng = random.random) -> float:
        """Wait before the next attempt: never shorter than the server's `Retry-After`."""
        wait = self.backoff(attempt, rng)
        if isinstance(exc, ThrottledError) and exc.retry_after is not None:
            wait = max(wait, exc.retry_after)
        return wait


class Retrier:
    """Runs an attempt function under a RetryPolicy. Only RetryableError is retried."""

    def __init__(
        self,
        policy: RetryPolicy,
        *,
        clock: Clock = time.monotonic,
        sleep: Sleep = asyncio.sleep,
        rng: Rng = random.random,
    ) -> None:
        self.policy = policy
        self._clock = clock
        self._sleep = sleep
        self._rng = rng

    async def call(
        self,
        attempt_fn: Callable[[], Awaitable[T]],
        *,
        endpoint: str,
        retry_if: Callable[[RetryableError], bool] = lambda _exc: True,
    ) -> T:
        """Return the first success; raise the last RetryableError once attempts or time run out.

        `retry_if` narrows what is retried (e.g. no resend after a timeout of a create call).
        """
        policy = self.policy
        started = self._clock()
        attempt = 0
        while True:
            attempt += 1
            try:
                return await attempt_fn()
            except RetryableError as exc:
                if attempt >= policy.max_attempts or not retry_if(exc):
                    raise
                wait = policy.delay(attempt, exc, self._rng)
                if self._clock() - started + wait > policy.max_time_s:
                    raise
                reason = retry_reason(exc)
                metrics.REQUEST_RETRIES.labels(endpoint, reason).inc()
                log.warning(
                    "amazon request will be retried",
                    endpoint=endpoint,
                    reason=reason,
                    status=exc.status,
                    attempt=attempt,
                    wait_s=round(wait, 3),
                )
                await self._sleep(wait)
