"""Login with Amazon (LwA): the access token every API call carries.

One cached token, refreshed ahead of its expiry. Refreshes are single-flight: concurrent callers
wait on one lock and share the one new token. A refusal of the refresh token (`invalid_grant`,
`invalid_client`, `unauthorized_client`, ...) is an AuthError that is remembered: every later
call raises it at once instead of asking LwA again in a loop. 5xx, 429 and timeouts of the
token endpoint are retried with the retry policy.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import orjson

from syncd.amazon.api import AccessToken
from syncd.amazon.retry import TOKEN_OPERATION as OPERATION
from syncd.amazon.retry import Clock, Retrier, classify, parse_retry_after
from syncd.errors import AmazonError, AuthError, RetryableError, ThrottledError
from syncd.observability import metrics
from syncd.observability.logging import get_logger

log = get_logger("syncd.amazon.auth")

# Refresh this long before expiry, at most; tokens with a short lifetime refresh at 90 %.
REFRESH_AHEAD_S = 60.0
MAX_TOKEN_LIFETIME_S = 86400.0  # a longer expires_in (1e30, "inf") counts this long

# POSTs the form to the token endpoint: returns (status, body, Retry-After header or None);
# raises RetryableError on a timeout or a connection error.
TokenFetch = Callable[[], Awaitable[tuple[int, bytes, str | None]]]


class TokenProvider:
    """Cached, single-flight LwA access token."""

    def __init__(self, fetch: TokenFetch, *, retrier: Retrier, clock: Clock = time.monotonic):
        self._fetch = fetch
        self._retrier = retrier
        self._clock = clock
        self._lock = asyncio.Lock()
        self._token: AccessToken | None = None
        self._refresh_at = 0.0
        self._fatal: AuthError | None = None

    @property
    def fatal_error(self) -> AuthError | None:
        return self._fatal

    @property
    def held(self) -> bool:
        """A token that has not expired is cached."""
        return self._token is not None and self._clock() < self._token.expires_at

    @property
    def refresh_in(self) -> float:
        """Seconds until the cached token is due for its refresh ahead of expiry (0: now)."""
        if self._token is None:
            return 0.0
        return max(0.0, self._refresh_at - self._clock())

    def mark_fatal(self, exc: AuthError) -> None:
        """Remember a fatal auth error: every later call raises it immediately."""
        if self._fatal is None:
            self._fatal = exc
            log.error("amazon credentials refused", status=exc.status, error=str(exc))

    async def token(self) -> str:
        """The current access token, refreshed first if it is (nearly) due."""
        if self._fatal is not None:
            raise self._fatal
        token = self._token
        if token is not None and self._clock() < self._refresh_at:
            return token.value
        return await self._refresh(stale=None)

    async def refresh(self, stale: str) -> str:
        """Force a new token because `stale` was refused (401), unless another caller already
        replaced it; concurrent 401s thus cause one refresh, not one each."""
        if self._fatal is not None:
            raise self._fatal
        return await self._refresh(stale=stale)

    async def _refresh(self, stale: str | None) -> str:
        async with self._lock:
            if self._fatal is not None:
                raise self._fatal
            current = self._token
            if current is not None and current.value != stale and self._clock() < self._refresh_at:
                return current.value  # another caller refreshed while we waited
            try:
                fresh = await self._retrier.call(self._fetch_once, endpoint=OPERATION)
            except AuthError as exc:
                self.mark_fatal(exc)
                raise
            except RetryableError:
                if stale is None and current is not None and self._clock() < current.expires_at:
                    # Refreshing ahead failed; the old token is still valid, keep using it.
                    log.warning("token refresh failed; using the current token until it expires")
                    return current.value
                raise
            self._token = fresh
            return fresh.value

    async def _fetch_once(self) -> AccessToken:
        started = self._clock()
        try:
            status, body, retry_after = await self._fetch()
        except RetryableError:
            metrics.TOKEN_REFRESHES.labels("error").inc()
            raise
        if 200 <= status < 300:
            token = self._parse(body, started)
            metrics.TOKEN_REFRESHES.labels("ok").inc()
            return token
        error = _token_error(status, body, parse_retry_after(retry_after))
        metrics.TOKEN_REFRESHES.labels(
            "rejected" if isinstance(error, AuthError) else "error"
        ).inc()
        raise error

    def _parse(self, body: bytes, started: float) -> AccessToken:
        try:
            data: Any = orjson.loads(body)
            value = data["access_token"]
            expires_in = float(data.get("expires_in", 3600))
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError):
            raise RetryableError(  # a proxy's or a gateway's page, say: a passing fault
                "LwA answered without a usable access_token", status=200, operation=OPERATION
            ) from None
        if not isinstance(value, str) or not value or not expires_in > 0:  # NaN too
            raise RetryableError(
                "LwA answered with an invalid token", status=200, operation=OPERATION
            )
        expires_in = min(expires_in, MAX_TOKEN_LIFETIME_S)
        expires_at = started + expires_in  # measured from the request: errs on the early side
        self._refresh_at = expires_at - min(REFRESH_AHEAD_S, expires_in * 0.1)
        return AccessToken(value=value, expires_at=expires_at)


def _token_error(status: int, body: bytes, retry_after: float | None) -> AmazonError:
    code, description = _lwa_error(body)
    detail = f"{code}: {description}" if description else code
    message = f"LwA token request failed (HTTP {status}): {detail}"
    kind = classify(status)
    if kind is ThrottledError:
        return ThrottledError(message, retry_after=retry_after, operation=OPERATION)
    if kind is RetryableError or code not in _REFUSALS:  # a 404 or a 403 page: passing
        return RetryableError(message, status=status, operation=OPERATION)
    return AuthError(message, status=status, operation=OPERATION)


# LwA's OAuth errors that refuse the credentials or the request syncd makes: fatal (retrying
# cannot help; the operator must fix the config). Any other refusal is a passing fault.
_REFUSALS = frozenset(
    {
        "invalid_grant",
        "invalid_client",
        "unauthorized_client",
        "invalid_request",
        "unsupported_grant_type",
        "invalid_scope",
        "access_denied",
    }
)


def _lwa_error(body: bytes) -> tuple[str, str]:
    """(error, error_description) of an LwA error body; tolerant of non-JSON bodies."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        return "unknown_error", ""
    if not isinstance(data, dict):
        return "unknown_error", ""
    code = data.get("error") or data.get("error_code") or "unknown_error"
    description = data.get("error_description") or data.get("message") or data.get("Message")
    return str(code), str(description or "")[:300]
