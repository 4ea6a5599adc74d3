"""The error hierarchy of syncd.

    SyncdError
    ├── ConfigError            bad config file / key / env override (exit 2); names the key
    ├── UsageError             bad CLI usage (exit 2); names the flag
    ├── SchemaOutdatedError    the store's schema is behind the code (run `syncd db upgrade`)
    └── AmazonError            anything the Amazon side said or failed to say
        ├── RetryableError     429, 5xx (not 501), timeouts, connection errors
        │   └── ThrottledError 429, carries Retry-After
        └── FatalError         never retried in a loop
            ├── AuthError      LwA refused the refresh token (invalid_grant, ...) or 401 twice
            └── RejectedError  400/403/404/501...: the request itself is wrong

Messages never contain raw PII: only ids, counts, keys and Amazon's own error text.
"""

from __future__ import annotations


class SyncdError(Exception):
    """Base of every error syncd raises on purpose."""


class ConfigError(SyncdError):
    """The configuration is invalid. `key` is the dotted config key (e.g. `batch.max_records`)."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"config key {key!r}: {problem}")
        self.key = key
        self.problem = problem


class UsageError(SyncdError):
    """Bad command-line usage; the message names the flag."""


class SchemaOutdatedError(SyncdError):
    """The store's schema revision is not the one this code needs."""


class AmazonError(SyncdError):
    """An Amazon Ads / LwA call failed. `status` is the HTTP status, or None if none arrived."""

    def __init__(self, message: str, *, status: int | None = None, operation: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.operation = operation


class RetryableError(AmazonError):
    """Transient: retry with backoff (429, 500/502/503/504, timeouts, connection errors)."""


class ThrottledError(RetryableError):
    """HTTP 429. `retry_after` is the server's Retry-After in seconds, if it sent one."""

    def __init__(
        self, message: str, *, retry_after: float | None = None, operation: str = ""
    ) -> None:
        super().__init__(message, status=429, operation=operation)
        self.retry_after = retry_after


class FatalError(AmazonError):
    """Not retryable: retrying the same request cannot succeed."""


class AuthError(FatalError):
    """Credentials refused (LwA `invalid_grant`, `invalid_client`, ... or 401 after a refresh)."""


class RejectedError(FatalError):
    """The request was rejected (400, 403, 404, 501, ...): the data or the setup is wrong."""
