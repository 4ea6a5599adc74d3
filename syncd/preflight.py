"""Start-up checks against Amazon (`syncd check-config --online`): is the setup able to send?

In order: an access token can be had, the AMC terms are accepted, each destination's
connection exists, and each audience's metadata can be read (its ttl is reported, and an
audience that Amazon ties to another connection than the destination's is named). Never a
records POST. A failed item is a setup fault (exit 2, naming the item); an Amazon that cannot
be reached, or answers 5xx or 429 after the client's retries, is not (exit 1).
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass
from typing import TypeVar

from syncd.amazon.client import AmazonClient
from syncd.config import AmazonConfig, Config
from syncd.errors import AmazonError, FatalError

T = TypeVar("T")

# An online check should answer in seconds, not wait out the daemon's retry budget.
CHECK_MAX_ATTEMPTS = 3
CHECK_MAX_RETRY_TIME_S = 20.0


@dataclass(frozen=True, slots=True)
class Finding:
    """One checked item: `ok` False means the setup is wrong there (`detail` says what to do)."""

    item: str
    ok: bool
    detail: str


class AmazonUnreachableError(AmazonError):
    """Amazon could not be reached or answered 5xx/429 after retries: nothing was judged."""


def check_client_config(amazon: AmazonConfig) -> AmazonConfig:
    """The client settings for online checks: the daemon's, with short retries."""
    return dataclasses.replace(
        amazon,
        max_attempts=min(amazon.max_attempts, CHECK_MAX_ATTEMPTS),
        max_retry_time_s=min(amazon.max_retry_time_s, CHECK_MAX_RETRY_TIME_S),
    )


async def check_online(cfg: Config, client: AmazonClient) -> AsyncIterator[Finding]:
    """Yield one finding per item, in order; stop after a failed token or terms check (what
    follows cannot be judged then). Raises AmazonUnreachableError when Amazon gives no verdict.
    """
    connections = sorted({d.connection_id for d in cfg.destinations})
    refused = await _verdict(client.ensure_token())
    if isinstance(refused, FatalError):
        yield Finding(
            "amazon credentials",
            False,
            f"{refused}: check amazon.client_id, amazon.client_secret and amazon.refresh_token",
        )
        return
    yield Finding("amazon credentials", True, "an access token was issued")

    terms = await _verdict(client.get_terms())
    if isinstance(terms, FatalError) or not terms.has_accepted:
        why = terms if isinstance(terms, FatalError) else "not accepted"
        yield Finding(
            f"AMC terms for connection {connections[0]}" if connections else "AMC terms",
            False,
            f"{why}: run `syncd terms show` and `syncd terms accept` with the credentials "
            "of the user who granted the refresh token",
        )
        return
    yield Finding("AMC terms", True, "accepted")

    for connection_id in connections:
        found = await _verdict(client.list_connections(connection_id=connection_id))
        ok = not isinstance(found, FatalError) and any(
            c.connection_id == connection_id for c in found
        )
        why = found if isinstance(found, FatalError) else "not listed"
        yield Finding(
            f"connection {connection_id}",
            ok,
            "exists"
            if ok
            else f"not found ({why}): create it with `syncd connections create` "
            "or fix [[destinations]] connection_id",
        )

    for dest in cfg.destinations:
        item = f"destination {dest.audience!r} (audience_id {dest.audience_id})"
        audience = await _verdict(client.get_audience(dest.audience_id))
        if isinstance(audience, FatalError):
            yield Finding(item, False, f"audience metadata cannot be read: {audience}")
            continue
        metadata = audience.raw.get("metadata") or {}
        target = (audience.raw.get("targetResource") or {}).get("connectionId")
        if target is not None and target != dest.connection_id:
            yield Finding(
                item,
                False,
                f"Amazon ties this audience to connection {target}, the destination names "
                f"{dest.connection_id}: fix [[destinations]] connection_id",
            )
            continue
        yield Finding(item, True, f"readable; ttl {metadata.get('ttl', 'unknown')} s")


async def _verdict(call: Awaitable[T]) -> T | FatalError:
    """Await `call`; a refusal (4xx) is returned as a verdict, anything else is unreachable."""
    try:
        return await call
    except FatalError as exc:
        return exc
    except AmazonError as exc:
        raise AmazonUnreachableError(str(exc), status=exc.status, operation=exc.operation) from exc
