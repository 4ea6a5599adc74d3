"""The audience watcher: each audience's metadata, its members' TTL refreshes, tombstone purge.

Amazon drops a member from an audience once its last accepted CREATE is older than the
audience's ttl (`metadata.ttl`, 0..34300800 s; 0 soft-removes every member). So, per audience
the destinations name (each distinct audience_id once):
- its metadata is read at start and every `metadata_every_s` (ttl, audienceSize), all audiences
  at once, each read given up after `metadata_timeout_s` or one refresh period (whichever is
  shorter), and read again after `metadata_retry_s` when it fails: a 401/403/404 is a setup
  problem of that destination and is logged as such; nothing stops the loop. Until a ttl is
  read, the contract's default applies (34300800 s, Amazon's own default); a ttl that is no
  number in 0..34300800 is logged and the one known before holds.
- every refresh period, members whose last accepted CREATE is older than `refresh_at` x ttl are
  marked due (the senders re-send them after live changes). A member must be re-sent within its
  refresh window, between refresh_at x ttl and the ttl: the period is at most a quarter of the
  smallest window (ttl 60, refresh_at 0.5: a 30 s window, checked every 7.5 s), never more than
  `refresh_every_s` and never under MIN_CHECK_S. ttl 0, or `refresh_at` 0: nothing is refreshed.
- members past the middle of their window whose re-send has no job yet are counted at risk: the
  budget (or a blocked connection) does not let the refreshes out in time.
Every `purge_every_s`, tombstones whose erase was recorded (and happened) more than
`tombstone_days` ago are purged. Every replica runs a watcher: marking and purging are
idempotent, and claims keep two replicas from sending a member twice. Metric labels: the
destination's audience key (the first one naming the audience_id).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol

from syncd.amazon.api import TTL_MAX_SECONDS, Audience, as_object, usable_ttl
from syncd.config import MembersConfig
from syncd.errors import AuthError, FatalError
from syncd.model import Destination
from syncd.observability import metrics
from syncd.observability.logging import get_logger

log = get_logger("syncd.audiences")

DEFAULT_TTL_S = TTL_MAX_SECONDS  # the ttl of an audience whose metadata cannot be read
METADATA_EVERY_S = 600.0
METADATA_RETRY_S = 60.0
METADATA_TIMEOUT_S = 30.0  # a read (with the client's retries) is given up after this
REFRESH_EVERY_S = 60.0
PURGE_EVERY_S = 3600.0
REFRESH_LIMIT = 1000  # members marked per transaction (short write transactions)
MIN_CHECK_S = 1.0  # the shortest refresh period, however short the ttl
CHECKS_PER_WINDOW = 4  # refresh checks at least this often within a refresh window
AT_RISK_SHARE = 0.5  # at risk: past this share of the refresh window, not yet sent
DAY_S = 86400.0
SIZE_KINDS = {
    "received": "receivedRecordSize",
    "matched": "idResolutionCount",
    "dsp": "dspAudienceSize",
}
_SETUP_PROBLEMS = {
    "unauthorized": "the grant's user has no access to the audience",
    "forbidden": "no permission for the audience: accept the AMC terms or check the grant",
    "not_found": "Amazon has no such audience: check [[destinations]] audience_id",
    "refused": "Amazon refused the request: check [[destinations]] audience_id",
}


class AudienceClient(Protocol):
    async def get_audience(self, audience_id: int) -> Audience: ...


class AudienceMembers(Protocol):
    """What the watcher needs of syncd.members.MemberTable."""

    async def due_for_refresh(self, audience_id: int, older_than_s: float, limit: int) -> int: ...
    async def count_at_risk(self, audience_id: int, older_than_s: float) -> int: ...
    async def counts(self, audience_id: int) -> dict[str, int]: ...
    async def purge_tombstones(self, older_than_s: float) -> int: ...


@dataclass(slots=True)
class WatchedAudience:
    """One audience_id and what the watcher knows of it."""

    audience_id: int
    key: str  # metric label: the first destination naming it
    ttl_s: float | None = None  # Amazon's metadata.ttl; None until read
    metadata_due: float = 0.0
    counts_due: float = 0.0
    last_outcome: str | None = None  # of the last metadata read

    @property
    def effective_ttl_s(self) -> float:
        return DEFAULT_TTL_S if self.ttl_s is None else self.ttl_s


class AudienceWatcher:
    """Reads audience metadata, marks TTL refreshes, purges tombstones; `run` until stopped."""

    def __init__(
        self,
        client: AudienceClient,
        members: AudienceMembers,
        destinations: Iterable[Destination],
        cfg: MembersConfig,
        *,
        metadata_every_s: float = METADATA_EVERY_S,
        metadata_retry_s: float = METADATA_RETRY_S,
        metadata_timeout_s: float = METADATA_TIMEOUT_S,
        refresh_every_s: float = REFRESH_EVERY_S,
        purge_every_s: float = PURGE_EVERY_S,
        refresh_limit: int = REFRESH_LIMIT,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._client = client
        self._members = members
        self._cfg = cfg
        self._metadata_every_s = metadata_every_s
        self._metadata_retry_s = min(metadata_retry_s, metadata_every_s)
        self._metadata_timeout_s = metadata_timeout_s
        self._refresh_every_s = refresh_every_s
        self._purge_every_s = purge_every_s
        self._refresh_limit = refresh_limit
        self._clock = clock
        self.audiences: dict[int, WatchedAudience] = {}
        for dest in destinations:
            self.audiences.setdefault(
                dest.audience_id, WatchedAudience(dest.audience_id, dest.audience)
            )
        self._refresh_due = 0.0
        self._purge_due = 0.0
        for audience in self.audiences.values():
            metrics.MEMBERS_REFRESHED.labels(audience.key)  # a 0 sample from the start
        metrics.TOMBSTONES_PURGED.inc(0)

    async def run(self, stop: asyncio.Event) -> None:
        """Rounds until `stop` is set. Never raises: every failure is logged and retried."""
        while not stop.is_set():
            try:
                wait_s = await self.run_once()
            except Exception as exc:  # a bug: keep the daemon's other work going, say so
                log.error("audience watcher round failed", error=repr(exc)[:300])
                wait_s = self.refresh_period()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=wait_s)

    async def run_once(self) -> float:
        """Do what is due now; returns the seconds until the next thing is due."""
        now = self._clock()
        to_read = [a for a in self.audiences.values() if now >= a.metadata_due]
        await asyncio.gather(*(self._read_metadata(a, now) for a in to_read))
        for audience in self.audiences.values():
            if now >= audience.counts_due:
                await self._count(audience, now)
        self._refresh_due = min(self._refresh_due, now + self.refresh_period())  # ttl changed
        if now >= self._refresh_due:
            self._refresh_due = now + self.refresh_period()
            for audience in self.audiences.values():
                await self._refresh(audience)
        if now >= self._purge_due:
            self._purge_due = now + self._purge_every_s
            await self._purge()
        due = [self._refresh_due, self._purge_due]
        due += [a.metadata_due for a in self.audiences.values()]
        due += [a.counts_due for a in self.audiences.values()]
        return max(0.0, min(due) - self._clock())

    def refresh_period(self) -> float:
        """Seconds between refresh checks: CHECKS_PER_WINDOW per refresh window of the audience
        with the shortest ttl, within [MIN_CHECK_S, refresh_every_s]."""
        ttls = [a.effective_ttl_s for a in self.audiences.values() if a.effective_ttl_s > 0]
        if self._cfg.refresh_at == 0 or not ttls:
            return self._refresh_every_s
        window_s = (1 - self._cfg.refresh_at) * min(ttls)
        return min(self._refresh_every_s, max(MIN_CHECK_S, window_s / CHECKS_PER_WINDOW))

    # -- steps: each one logs its failure and leaves the others alone ------------------------------
    async def _read_metadata(self, audience: WatchedAudience, now: float) -> None:
        # Bounded: a slow Amazon (retries through an outage) must not hold the refreshes back.
        timeout_s = min(self._metadata_timeout_s, self.refresh_period())
        try:
            async with asyncio.timeout(timeout_s):
                found = await self._client.get_audience(audience.audience_id)
        except Exception as exc:
            audience.metadata_due = now + self._metadata_retry_s
            self._metadata_failed(audience, exc)
            return
        audience.metadata_due = now + self._metadata_every_s
        metadata = as_object(found.raw.get("metadata"))
        self._set_ttl(audience, metadata.get("ttl"))
        size = as_object(metadata.get("audienceSize"))
        for kind, field in SIZE_KINDS.items():
            value = _size(size.get(field))
            if value is not None:
                metrics.AUDIENCE_SIZE.labels(audience.key, kind).set(value)
        metrics.AUDIENCE_METADATA_READS.labels(audience.key, "ok").inc()
        if audience.last_outcome not in (None, "ok"):
            log.info("audience metadata readable again", audience=audience.key)
        audience.last_outcome = "ok"

    def _metadata_failed(self, audience: WatchedAudience, exc: Exception) -> None:
        outcome = _outcome(exc)
        metrics.AUDIENCE_METADATA_READS.labels(audience.key, outcome).inc()
        metrics.AUDIENCE_TTL.labels(audience.key).set(audience.effective_ttl_s)
        if outcome != audience.last_outcome:  # once per streak, not every retry
            fields = {
                "audience": audience.key,
                "audience_id": audience.audience_id,
                "outcome": outcome,
                "ttl_s": audience.effective_ttl_s,
                "retry_in_s": self._metadata_retry_s,
                "error": str(exc)[:300] if isinstance(exc, FatalError) else repr(exc)[:300],
            }
            if outcome in _SETUP_PROBLEMS:
                log.warning(
                    "audience metadata cannot be read: setup problem",
                    do=_SETUP_PROBLEMS[outcome],
                    **fields,
                )
            else:
                log.warning("audience metadata read failed; retrying", **fields)
        audience.last_outcome = outcome

    def _set_ttl(self, audience: WatchedAudience, ttl: Any) -> None:
        if ttl is None:  # not set: Amazon's default, the contract's
            ttl_s = None
        elif usable_ttl(ttl):
            ttl_s = float(ttl)
        else:  # as through a failed read: the ttl read before (or the default) holds
            log.warning(
                "audience metadata holds an unusable ttl; keeping the one known",
                audience=audience.key,
                ttl=repr(ttl)[:40],
                ttl_s=audience.effective_ttl_s,
            )
            ttl_s = audience.ttl_s
        if ttl_s == 0 and audience.ttl_s != 0:
            log.warning(
                "audience ttl is 0: Amazon soft-removes its members; syncd does not refresh them",
                audience=audience.key,
                audience_id=audience.audience_id,
            )
        audience.ttl_s = ttl_s
        metrics.AUDIENCE_TTL.labels(audience.key).set(audience.effective_ttl_s)

    async def _count(self, audience: WatchedAudience, now: float) -> None:
        audience.counts_due = now + self._metadata_every_s
        try:
            counted = await self._members.counts(audience.audience_id)
        except Exception as exc:
            audience.counts_due = now + self._metadata_retry_s
            log.warning(
                "member counts failed; retrying", audience=audience.key, error=repr(exc)[:300]
            )
            return
        for state, count in counted.items():
            metrics.MEMBERS.labels(audience.key, state).set(count)

    async def _refresh(self, audience: WatchedAudience) -> None:
        ttl_s = audience.effective_ttl_s
        at_risk = metrics.MEMBERS_AT_RISK.labels(audience.key)
        if ttl_s == 0 or self._cfg.refresh_at == 0:
            at_risk.set(0)
            return
        due_after_s = self._cfg.refresh_at * ttl_s
        refreshed = metrics.MEMBERS_REFRESHED.labels(audience.key)
        try:
            total = 0
            while True:
                marked = await self._members.due_for_refresh(
                    audience.audience_id, due_after_s, self._refresh_limit
                )
                refreshed.inc(marked)
                total += marked
                if marked < self._refresh_limit:
                    break
            if total:
                log.info("members due for a ttl refresh", audience=audience.key, members=total)
            risk_after_s = due_after_s + AT_RISK_SHARE * (ttl_s - due_after_s)
            at_risk.set(await self._members.count_at_risk(audience.audience_id, risk_after_s))
        except Exception as exc:
            log.warning(
                "ttl refresh failed; retrying next round",
                audience=audience.key,
                error=repr(exc)[:300],
            )

    async def _purge(self) -> None:
        try:
            purged = await self._members.purge_tombstones(self._cfg.tombstone_days * DAY_S)
        except Exception as exc:
            log.warning("tombstone purge failed; retrying later", error=repr(exc)[:300])
            return
        metrics.TOMBSTONES_PURGED.inc(purged)
        if purged:
            log.info("erase tombstones purged", tombstones=purged)


def _outcome(exc: Exception) -> str:
    """The metadata read's failure as a bounded label."""
    if isinstance(exc, AuthError):
        return "unauthorized"
    if isinstance(exc, FatalError):
        return {401: "unauthorized", 403: "forbidden", 404: "not_found"}.get(
            exc.status or 0, "refused"
        )
    return "failed"


def _size(value: Any) -> int | None:
    """A member count from Amazon's audienceSize, or None when it is not one."""
    ok = isinstance(value, int) and not isinstance(value, bool) and value >= 0
    return value if ok else None
