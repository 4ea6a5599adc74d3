"""The error hierarchy of syncd.

    SyncdError
    ├── ConfigError            bad config file / key / env override (exit 2); names the key
    ├── UsageError             bad CLI usage (exit 2); names the flag
    ├── SchemaOutdatedError    the store's schema is behind the code (run `syncd db upgrade`)
    └── AmazonError            anything the Amazon side said or failed to say
        ├── RetryableError     429, 5xx (not 501), timeouts, connection errors
        │   ├── ThrottledError 429, carries Retry-After
        │   └── NotSentError   the connection could not be opened: nothing reached Amazon
        └── FatalError         never retried in a loop
            ├── AuthError      LwA refused the refresh token (invalid_grant, invalid_client)
            └── RejectedError  400/401 after a fresh token/403/404/501...: the request or the
                               setup is wrong (the records sender blocks its connection for
                               401/403/404 and bisects a 400; see syncd/deliver.py)

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


class StoreUnavailable(SyncdError):
    """A command's store could not be reached or used; the message names it (secrets masked)."""


class ListenError(SyncdError):
    """A server could not listen where it was asked to (the port in use, say)."""


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


class NotSentError(RetryableError):
    """The request never left: the connection to Amazon could not be opened (refused, DNS,
    TLS handshake). Proves that nothing was accepted, so even a records POST may be resent."""


class FatalError(AmazonError):
    """Not retryable: retrying the same request cannot succeed."""


class AuthError(FatalError):
    """LwA refused the credentials (`invalid_grant`, `invalid_client`, ...): no API call can
    succeed until someone replaces them."""


class RejectedError(FatalError):
    """The request was rejected (400, 403, 404, 501, ..., or 401 although the access token was
    just refreshed): the data or the setup is wrong."""
