"""Start-up checks against Amazon (`syncd check-config --online`, and `syncd run` at start):
is the setup able to send?

In order: an access token can be had, the AMC terms are accepted, each destination's
connection exists, and each audience's metadata can be read (its ttl is reported, and an
audience that Amazon ties to another connection than the destination's is named). Never a
records POST. A failed item is a setup fault (check-config: exit 2, naming the item; run: the
connection is blocked, see `setup_faults`); an Amazon that cannot be reached, or answers 5xx or
429 after the client's retries, is not (check-config: exit 1; run: nothing is blocked).
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass
from typing import TypeVar

from syncd.amazon.api import TTL_MAX_SECONDS, as_object, usable_ttl
from syncd.amazon.client import AmazonClient
from syncd.config import AmazonConfig, Config
from syncd.errors import AmazonError, AuthError, FatalError

T = TypeVar("T")

# An online check should answer in seconds, not wait out the daemon's retry budget.
CHECK_MAX_ATTEMPTS = 3
CHECK_MAX_RETRY_TIME_S = 20.0


@dataclass(frozen=True, slots=True)
class Finding:
    """One checked item: `ok` False means the setup is wrong there (`detail` says what to do).
    `connection_id`: the connection the item belongs to (None: the credentials or the terms,
    every connection's); `cause`: a failed item's kind, as a refused records POST would be
    reported (syncd_connection_blocked's causes; "credentials" for refused credentials)."""

    item: str
    ok: bool
    detail: str
    connection_id: str | None = None
    cause: str = ""
    status: int | None = None  # Amazon's HTTP status when it refused the check


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
            cause="credentials",
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
            cause=_cause(terms) if isinstance(terms, FatalError) else "forbidden",
            status=terms.status if isinstance(terms, FatalError) else None,
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
            connection_id,
            "" if ok else _cause(found) if isinstance(found, FatalError) else "not_found",
            found.status if isinstance(found, FatalError) else None,
        )

    for dest in cfg.destinations:
        item = f"destination {dest.audience!r} (audience_id {dest.audience_id})"
        audience = await _verdict(client.get_audience(dest.audience_id))
        if isinstance(audience, FatalError):
            yield Finding(
                item,
                False,
                f"audience metadata cannot be read: {audience}",
                dest.connection_id,
                _cause(audience),
                audience.status,
            )
            continue
        metadata = as_object(audience.raw.get("metadata"))
        target = as_object(audience.raw.get("targetResource")).get("connectionId")
        if target is not None and target != dest.connection_id:
            yield Finding(
                item,
                False,
                f"Amazon ties this audience to connection {target}, the destination names "
                f"{dest.connection_id}: fix [[destinations]] connection_id",
                dest.connection_id,
                "bad_request",
            )
            continue
        yield Finding(item, True, f"readable; {_ttl(metadata.get('ttl'))}", dest.connection_id)


async def setup_faults(cfg: Config, client: AmazonClient) -> dict[str, Finding]:
    """`syncd run`'s start-up checks (those of `check_online`): {connection_id: its first
    failed finding} for each connection the setup keeps from sending (the terms: every
    connection; a destination: its own). Refused credentials are not a connection's (the
    daemon's token refresh reports them). Raises AmazonUnreachableError without a verdict."""
    connections = sorted({d.connection_id for d in cfg.destinations})
    faults: dict[str, Finding] = {}
    async for finding in check_online(cfg, client):
        if finding.ok or finding.cause == "credentials":
            continue
        for connection_id in [finding.connection_id] if finding.connection_id else connections:
            faults.setdefault(connection_id, finding)
    return faults


def _ttl(ttl: object) -> str:
    """An audience's ttl as `syncd run` reads it (syncd.audiences)."""
    if ttl is None:
        return f"ttl not set: Amazon's default {TTL_MAX_SECONDS} s applies"
    if usable_ttl(ttl):
        return f"ttl {int(ttl) if float(ttl).is_integer() else ttl} s"  # every digit: no :g
    return (
        f"ttl {repr(ttl)[:40]} is no ttl of 0..{TTL_MAX_SECONDS} s: syncd uses {TTL_MAX_SECONDS} s"
    )


def _cause(refusal: FatalError) -> str:
    """A refusal as syncd_connection_blocked's cause (see syncd.deliver.SETUP_FAULTS)."""
    if isinstance(refusal, AuthError):  # LwA refused the credentials meanwhile
        return "credentials"
    return {401: "unauthorized", 403: "forbidden", 404: "not_found"}.get(
        refusal.status or 0, "bad_request"
    )


async def _verdict(call: Awaitable[T]) -> T | FatalError:
    """Await `call`; a refusal (4xx) is returned as a verdict, anything else is unreachable."""
    try:
        return await call
    except FatalError as exc:
        return exc
    except AmazonError as exc:
        raise AmazonUnreachableError(str(exc), status=exc.status, operation=exc.operation) from exc
