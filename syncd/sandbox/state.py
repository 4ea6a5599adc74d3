"""The sandbox's in-memory state and its rules: settings, access tokens, a token bucket per client
id, a rolling per-connection record window with a budget, jobs and their seeded outcomes,
audience members and their ttl, connections, terms, faults, counters and the ledger of every
accepted record. No HTTP: the handlers (app.py) call it; tests read it (`stats`, `ledger`).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import random
import secrets
import time
import uuid
from collections import Counter, OrderedDict, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from syncd import config as config_mod
from syncd.amazon import api
from syncd.model import Destination
from syncd.sandbox.validation import Check, consent_refusal
from syncd.vocabulary import TERMINAL_JOB_STATES, JobState


@dataclass
class SandboxSettings:
    """Behaviour of one sandbox. Each field is also a `syncd sandbox` flag (see server.py)."""

    client_id: str = field(default="sandbox-client-id", metadata={"help": "accepted LwA client id"})
    client_secret: str = field(
        default="sandbox-client-secret", metadata={"help": "accepted LwA client secret"}
    )
    refresh_token: str = field(
        default="sandbox-refresh-token", metadata={"help": "accepted LwA refresh token"}
    )
    token_ttl_s: float = field(default=3600.0, metadata={"help": "access token lifetime"})
    max_records: int = field(default=6000, metadata={"help": "records per POST at most"})
    max_body_bytes: int = field(
        default=64 * 1024 * 1024, metadata={"help": "request body size at most (413 above)"}
    )
    job_delay_s: float = field(default=1.0, metadata={"help": "seconds a job stays PENDING"})
    partial_rate: float = field(
        default=0.0, metadata={"help": "fraction of jobs that end PARTIALLYSUCCEEDED"}
    )
    failed_rate: float = field(default=0.0, metadata={"help": "fraction of jobs that end FAILED"})
    invalid_record_rate: float = field(
        default=0.0, metadata={"help": "fraction of records reported in invalidRecords"}
    )
    records_error_for_audience: int | None = field(
        default=None, metadata={"help": "record POSTs for this audienceId get 400"}
    )
    match_rate: float = field(
        default=1.0, metadata={"help": "fraction of members whose identity resolves (per member)"}
    )
    strict_audiences: bool = field(
        default=False,
        metadata={"help": "404 records for an audience not created through the metadata API"},
    )
    require_consent_in: bool = field(
        default=False,
        metadata={
            "help": "refuse UK/EEA/CH CREATE records without a consent signal",
            "flag": "require_consent",
        },
    )
    rate_per_s: float = field(
        default=50.0, metadata={"help": "API calls per second per client id (token bucket)"}
    )
    burst: int = field(default=100, metadata={"help": "token bucket capacity"})
    window_seconds: float = field(
        default=3600.0, metadata={"help": "rolling per-connection record window"}
    )
    window_budget: int = field(
        default=15_000_000, metadata={"help": "records per connection per window"}
    )
    reject_over_budget: bool = field(
        default=False, metadata={"help": "429 a POST that would exceed the window budget"}
    )
    keep_ledger: bool = field(
        default=True,
        metadata={
            "help": "keep every accepted record (off: memory grows with distinct members only)",
            "flag": "ledger",
        },
    )
    latency_s: float = field(default=0.0, metadata={"help": "added latency per API call"})
    error_rate: float = field(default=0.0, metadata={"help": "fraction of API calls that 5xx"})
    reset_rate: float = field(
        default=0.0, metadata={"help": "fraction of API calls whose connection is dropped"}
    )
    timeout_rate: float = field(
        default=0.0, metadata={"help": "fraction of API calls that hang past any client timeout"}
    )
    throttle_for_s: float = field(
        default=0.0, metadata={"help": "429 every API call for this long from start-up (storm)"}
    )
    revoke_refresh_token: bool = field(
        default=False, metadata={"help": "LwA refuses the refresh token (invalid_grant)"}
    )
    seed: int | None = field(default=None, metadata={"help": "seed of the outcome/fault RNGs"})
    provide_for: str = field(
        default="",
        metadata={
            "help": "set up what this syncd config's [[destinations]] name: the AMC terms "
            "accepted, their connections and audiences (a local stack)"
        },
    )


HANG_S = 600.0  # a "timeout" fault holds the request this long (or until shutdown/reset)
LOG_SIZE = 2000  # recent requests kept for GET /_sandbox/log
FAULT_KEYS = frozenset(
    {
        "throttle_for_s",
        "error_rate",
        "reset_rate",
        "timeout_rate",
        "latency_s",
        "expire_tokens",
        "revoke_refresh_token",
        "connection_status",
        "refuse_records_prefix",
        "job_request_id",
    }
)


class TokenBucket:
    """`rate` tokens per second, at most `capacity` stored."""

    def __init__(self, rate: float, capacity: float, now: float) -> None:
        self.rate = rate
        self.capacity = capacity
        self.tokens = capacity
        self.updated = now

    def take(self, now: float) -> float:
        """Take one token: 0.0 when granted, else the seconds until one is available."""
        self.tokens = min(self.capacity, self.tokens + (now - self.updated) * self.rate)
        self.updated = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return 0.0
        return (1.0 - self.tokens) / self.rate


class RollingWindow:
    """Records of one connection over a rolling window, ending at each arrival.

    Windows are half-open, (t - seconds, t]; the maximum over all windows is reached at an
    arrival, so checking it at every arrival is exact. Memory is one entry per POST still
    inside the window.
    """

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.entries: deque[tuple[float, int]] = deque()
        self.total = 0
        self.max_total = 0

    def _expire(self, now: float) -> None:
        while self.entries and self.entries[0][0] <= now - self.seconds:
            self.total -= self.entries.popleft()[1]

    def add(self, now: float, count: int) -> int:
        """Record `count` records at `now`; returns the records in the window ending now."""
        self._expire(now)
        self.entries.append((now, count))
        self.total += count
        self.max_total = max(self.max_total, self.total)
        return self.total

    def wait_for_room(self, now: float, count: int, budget: int) -> float | None:
        """None if `count` more records fit now, else seconds until they fit."""
        self._expire(now)
        excess = self.total + count - budget
        if excess <= 0:
            return None
        for arrived, n in self.entries:
            excess -= n
            if excess <= 0:
                return arrived + self.seconds - now
        return self.seconds  # larger than the whole budget: never fits, retry a window later


@dataclass(slots=True)
class Job:
    job_request_id: str
    audience_id: int
    ready_at: float  # monotonic: PENDING until then
    final_state: str
    received: int
    invalid_records: list[dict[str, str]]
    id_resolution_count: int  # records of this job that resolved (0 when FAILED)
    dsp_audience_size: int  # live members of the audience once the job applied
    observed_terminal: bool = False

    def status(self, now: float) -> dict[str, Any]:
        if now < self.ready_at:
            return {"jobRequestId": self.job_request_id, "jobState": JobState.PENDING}
        valid = self.received - len(self.invalid_records)
        failed = self.final_state == JobState.FAILED
        body: dict[str, Any] = {
            "jobRequestId": self.job_request_id,
            "jobState": self.final_state,
            "successful": {
                "recordsProcessedRate": 0.0 if failed else 100.0 * valid / self.received
            },
            "audienceSize": {
                "receivedRecordSize": self.received,
                "idResolutionCount": self.id_resolution_count,
                "dspAudienceSize": self.dsp_audience_size,
            },
        }
        if self.invalid_records:
            body["invalidRecords"] = self.invalid_records
        return body


class Membership:
    """One audience's members and what it received.

    `added` maps externalUserId -> time of its last CREATE, oldest first. The ttl is a logical
    removal (Amazon's guide): a member is live while now < last add + the audience's current
    ttl, so ttl 0 hides every member and a larger ttl brings back those added recently enough.
    Members no ttl can bring back (added more than the maximum ttl ago) are dropped on read.
    """

    def __init__(self) -> None:
        self.added: OrderedDict[str, float] = OrderedDict()
        self.received = 0  # records of jobs that did not fail
        self.resolved = 0  # of those, the ones whose identity resolved

    def create(self, external_user_id: str, now: float) -> None:
        self.added[external_user_id] = now
        self.added.move_to_end(external_user_id)

    def delete(self, external_user_id: str) -> None:
        self.added.pop(external_user_id, None)

    def live(self, now: float, ttl: int) -> list[tuple[str, float]]:
        """Live members as (externalUserId, expiry), the soonest to expire first."""
        expired = self._expired(now, ttl)
        return [(m, t + ttl) for m, t in itertools.islice(self.added.items(), expired, None)]

    def size(self, now: float, ttl: int) -> int:
        return len(self.added) - self._expired(now, ttl)

    def audience_size(self, now: float, ttl: int) -> dict[str, int]:
        return {
            "receivedRecordSize": self.received,
            "idResolutionCount": self.resolved,
            "dspAudienceSize": self.size(now, ttl),
        }

    def _expired(self, now: float, ttl: int) -> int:
        """Drop the members no ttl can bring back; count the expired ones (a prefix, as
        `added` is in the order of adds and the state's clock never goes back)."""
        added = self.added
        while added and next(iter(added.values())) + api.TTL_MAX_SECONDS <= now:
            added.popitem(last=False)
        if ttl == 0:
            return len(added)
        expired = 0
        for time_added in added.values():
            if time_added + ttl > now:
                break
            expired += 1
        return expired


@dataclass
class Faults:
    throttle_until: float = 0.0  # monotonic
    error_rate: float = 0.0
    reset_rate: float = 0.0
    timeout_rate: float = 0.0
    latency_s: float = 0.0
    revoke_refresh_token: bool = False
    # connectionId -> (status, monotonic until, Retry-After seconds or None) for record POSTs
    connection_status: dict[str, tuple[int, float, float | None]] = field(default_factory=dict)
    refuse_records_prefix: str = ""  # 400 for a record POST holding such an externalUserId
    job_request_id: str = ""  # the jobRequestId of every accepted record POST ("": a new UUID)


class SandboxState:
    """Everything the sandbox knows. Handlers call it; tests read it (`stats`, `ledger`)."""

    def __init__(self, settings: SandboxSettings, clock: Callable[[], float] = time.time) -> None:
        self.settings = settings
        self.clock = clock
        self.latest = 0.0  # the latest time read from the clock (see `now`)
        seed = settings.seed
        self.outcomes = random.Random(seed)
        # Which members resolve: a keyed hash per member, so a seed replays it.
        self.match_key = hashlib.sha256(
            secrets.token_bytes(16) if seed is None else str(seed).encode()
        ).digest()
        self.fault_rng = random.Random(None if seed is None else seed + 1)
        self.tokens: dict[str, float] = {}  # access token -> monotonic expiry
        self.audiences: dict[int, dict[str, Any]] = {}
        self.connections: dict[str, dict[str, Any]] = {}
        self.terms_token = secrets.token_urlsafe(24)
        self.terms_accepted = False
        self.closing = asyncio.Event()
        self.reset()
        if settings.provide_for:
            self.provide(config_mod.load(settings.provide_for).destinations)

    def reset(self) -> None:
        """Forget jobs, ledger, members, windows, counters, log and faults (tokens, audiences,
        connections and terms stay, so connected clients keep working)."""
        s = self.settings
        self.faults = Faults(
            error_rate=s.error_rate,
            reset_rate=s.reset_rate,
            timeout_rate=s.timeout_rate,
            latency_s=s.latency_s,
            throttle_until=time.monotonic() + s.throttle_for_s if s.throttle_for_s else 0.0,
            revoke_refresh_token=s.revoke_refresh_token,
        )
        self.jobs: dict[str, Job] = {}
        self.ledgers: dict[str, list[dict[str, Any]]] = {}
        self.windows: dict[str, RollingWindow] = {}
        self.buckets: dict[str, TokenBucket] = {}
        self.memberships: dict[int, Membership] = {}
        self.requests: Counter[str] = Counter()
        self.records: Counter[str] = Counter()
        self.budget_exceeded: Counter[str] = Counter()
        self.polls_in_flight: Counter[str] = Counter()
        self.counters: Counter[str] = Counter(
            terminal_polls=0,
            max_concurrent_polls_per_job=0,
            token_requests=0,
            posts=0,
            throttled=0,
        )
        self.log: deque[dict[str, Any]] = deque(maxlen=LOG_SIZE)

    # -- observation ---------------------------------------------------------------------------

    def ledger(self, connection_id: str) -> list[dict[str, Any]]:
        """Every accepted record sent for `connection_id`, in arrival order (empty when
        keep_ledger is off)."""
        return list(self.ledgers.get(connection_id, ()))

    def stats(self) -> dict[str, Any]:
        return {
            "requests": dict(self.requests),
            "records": dict(self.records),
            "max_window_records": {c: w.max_total for c, w in self.windows.items()},
            "budget_exceeded": dict(self.budget_exceeded),
            **self.counters,
        }

    def log_request(
        self, method: str, route: str, path: str, status: int | str, retry_after: str | None
    ) -> None:
        """Count a request under "METHOD route status" and keep it in the recent log."""
        self.requests[f"{method} {route} {status}"] += 1
        if status == 429:
            self.counters["throttled"] += 1
        self.log.append(
            {
                "method": method,
                "path": path,
                "status": status,
                "time": time.time(),
                "retry_after": float(retry_after) if retry_after is not None else None,
            }
        )

    # -- faults --------------------------------------------------------------------------------

    def set_faults(self, faults: dict[str, Any]) -> None:
        """Change faults at runtime; see FAULT_KEYS. `expire_tokens` expires every access token
        issued so far (they get 401; tokens issued later are valid)."""
        unknown = set(faults) - FAULT_KEYS
        if unknown:
            raise ValueError(f"unknown fault(s): {', '.join(sorted(unknown))}")
        for key in ("error_rate", "reset_rate", "timeout_rate", "latency_s"):
            if key in faults:
                setattr(self.faults, key, float(faults[key]))
        if "throttle_for_s" in faults:
            self.faults.throttle_until = time.monotonic() + float(faults["throttle_for_s"])
        if "revoke_refresh_token" in faults:
            self.faults.revoke_refresh_token = bool(faults["revoke_refresh_token"])
        if faults.get("expire_tokens"):
            self.tokens.clear()
        if "connection_status" in faults:
            self._set_connection_status(faults["connection_status"])
        if "refuse_records_prefix" in faults:
            self.faults.refuse_records_prefix = str(faults["refuse_records_prefix"])
        if "job_request_id" in faults:  # Amazon reusing an id, or one of an odd form
            self.faults.job_request_id = str(faults["job_request_id"])

    def _set_connection_status(self, spec: Any) -> None:
        """`{"connection_id": ..., "status": 403, "for_s": 30, "retry_after_s": 8}`: record POSTs
        for that connection get `status` for `for_s` seconds (with a Retry-After if given)."""
        if not isinstance(spec, dict) or not isinstance(spec.get("connection_id"), str):
            raise ValueError("connection_status needs a connection_id, a status and for_s")
        status = int(spec["status"])
        if not 400 <= status <= 599:
            raise ValueError("connection_status.status must be an HTTP error status")
        retry = spec.get("retry_after_s")
        until = time.monotonic() + float(spec["for_s"])
        self.faults.connection_status[spec["connection_id"]] = (
            status,
            until,
            None if retry is None else float(retry),
        )

    def connection_fault(self, connection_id: str) -> tuple[int, float | None] | None:
        """(status, Retry-After) while a connection_status fault holds for the connection."""
        fault = self.faults.connection_status.get(connection_id)
        if fault is None or fault[1] <= time.monotonic():
            return None
        return fault[0], fault[2]

    def faults_view(self) -> dict[str, Any]:
        f = self.faults
        return {
            "throttle_remaining_s": max(0.0, f.throttle_until - time.monotonic()),
            "error_rate": f.error_rate,
            "reset_rate": f.reset_rate,
            "timeout_rate": f.timeout_rate,
            "latency_s": f.latency_s,
            "revoke_refresh_token": f.revoke_refresh_token,
            "connection_status": {
                c: {"status": st, "remaining_s": max(0.0, until - time.monotonic())}
                for c, (st, until, _) in f.connection_status.items()
            },
            "refuse_records_prefix": f.refuse_records_prefix,
            "job_request_id": f.job_request_id,
        }

    def chance(self, rate: float) -> bool:
        return rate > 0 and self.fault_rng.random() < rate

    async def hang(self) -> None:
        """Hold a request past any client timeout, or until the sandbox shuts down."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.closing.wait(), HANG_S)

    # -- auth and throttling -------------------------------------------------------------------

    def issue_token(self) -> str:
        now = time.monotonic()
        self.tokens = {t: exp for t, exp in self.tokens.items() if exp > now}
        token = "Atza|" + secrets.token_urlsafe(32)
        self.tokens[token] = now + self.settings.token_ttl_s
        return token

    def check_bearer(self, header: str | None) -> Check:
        if not header:
            return "missing Authorization header"
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return "Authorization header must be 'Bearer <access token>'"
        expires = self.tokens.get(token.strip())
        if expires is None or expires <= time.monotonic():
            return "access token is invalid or expired"
        return None

    def check_client_id(self, client_id: str) -> Check:
        if not client_id:
            return f"missing {api.CLIENT_ID_HEADER} header"
        if client_id != self.settings.client_id:
            return f"{api.CLIENT_ID_HEADER} header does not name a known client"
        return None

    def throttle_wait(self, client_id: str) -> float:
        """0.0 when the call may proceed, else seconds to wait (429 storm or empty bucket)."""
        now = time.monotonic()
        if now < self.faults.throttle_until:
            return self.faults.throttle_until - now
        bucket = self.buckets.get(client_id)
        if bucket is None:
            bucket = TokenBucket(self.settings.rate_per_s, self.settings.burst, now)
            self.buckets[client_id] = bucket
        return bucket.take(now)

    # -- jobs ----------------------------------------------------------------------------------

    def budget_wait(self, connection_id: str, count: int) -> float | None:
        """With reject_over_budget, seconds until `count` records fit the window, else None."""
        window = self.windows.get(connection_id)
        if not self.settings.reject_over_budget or window is None:
            return None
        return window.wait_for_room(self.now(), count, self.settings.window_budget)

    def accept_records(self, body: dict[str, Any]) -> str:
        """Accept a validated records body as a new job; returns its jobRequestId."""
        s = self.settings
        audience_id: int = body["audienceId"]
        connection_id: str = body["targetResource"]["connectionId"]
        records: list[dict[str, Any]] = body["records"]
        job_id = self.faults.job_request_id or str(uuid.uuid4())  # a fault's id: filed anew
        received_at = self.now()
        if audience_id not in self.audiences:  # without strict_audiences: created implicitly
            self._add_audience(
                audience_id,
                {
                    "name": f"implicitAudience{audience_id}",
                    "description": "created by its first records POST",
                    "targetResource": {"connectionId": connection_id},
                },
            )
        window = self.windows.setdefault(connection_id, RollingWindow(s.window_seconds))
        if window.add(received_at, len(records)) > s.window_budget:
            self.budget_exceeded[connection_id] += 1
        self.records[connection_id] += len(records)
        self.counters["posts"] += 1
        if s.keep_ledger:
            self.ledgers.setdefault(connection_id, []).extend(
                {
                    "jobRequestId": job_id,
                    "audienceId": audience_id,
                    "connectionId": connection_id,
                    "receivedAt": received_at,
                    "record": record,
                }
                for record in records
            )
        self.jobs[job_id] = self._decide(job_id, audience_id, records, received_at)
        return job_id

    def _decide(
        self, job_id: str, audience_id: int, records: list[dict[str, Any]], now: float
    ) -> Job:
        """The job's outcome, drawn now from the seeded RNG (so a seed replays it exactly).
        Unless it FAILED, its valid records apply to the audience's members in order now."""
        s = self.settings
        roll = self.outcomes.random()
        state = JobState.FAILED if roll < s.failed_rate else JobState.SUCCEEDED
        if state != JobState.FAILED and roll < s.failed_rate + s.partial_rate:
            state = JobState.PARTIALLYSUCCEEDED
        audience = self.audiences[audience_id]
        invalid: list[dict[str, str]] = []
        valid: list[dict[str, Any]] = []
        for record in records:
            problem = self._record_problem(record, audience["countryCode"])
            if problem is None:
                valid.append(record)
            else:
                invalid.append(
                    {
                        "audienceId": str(audience_id),
                        "externalId": record["externalUserId"],
                        "error": problem,
                    }
                )
        if invalid and state == JobState.SUCCEEDED:
            state = JobState.PARTIALLYSUCCEEDED
        membership = self.membership(audience_id)
        resolved = 0
        if state != JobState.FAILED:
            for record in valid:
                member = record["externalUserId"]
                if record.get("countryCode", audience["countryCode"]) in api.MATCHING_COUNTRIES:
                    resolved += self.resolves(member)
                if record["action"] == "CREATE":
                    membership.create(member, now)
                else:
                    membership.delete(member)
            membership.received += len(records)
            membership.resolved += resolved
        return Job(
            job_request_id=job_id,
            audience_id=audience_id,
            ready_at=time.monotonic() + s.job_delay_s,
            final_state=state,
            received=len(records),
            invalid_records=invalid,
            id_resolution_count=resolved,
            dsp_audience_size=membership.size(now, audience["metadata"]["ttl"]),
        )

    def _record_problem(self, record: dict[str, Any], audience_country: str | None) -> Check:
        """Why a valid record ends in invalidRecords (required consent, or the seeded
        invalid_record_rate), or None."""
        s = self.settings
        if s.require_consent_in:
            refusal = consent_refusal(record, audience_country)
            if refusal:
                return refusal
        if s.invalid_record_rate > 0 and self.outcomes.random() < s.invalid_record_rate:
            return "INVALID_HASHED_PII: no hashed identifier could be resolved"
        return None

    def resolves(self, external_user_id: str) -> bool:
        """Whether a member's identity resolves: about `match_rate` of members do, each one
        always the same way (a keyed hash of its id), so a re-sent member counts again."""
        rate = self.settings.match_rate
        if rate >= 1.0:
            return True
        digest = hashlib.blake2b(
            external_user_id.encode(), digest_size=8, key=self.match_key
        ).digest()
        return int.from_bytes(digest) < rate * 2**64

    # -- members -------------------------------------------------------------------------------

    def now(self) -> float:
        """The wall clock, never going back (a stepped clock must not reorder members)."""
        self.latest = max(self.latest, self.clock())
        return self.latest

    def membership(self, audience_id: int) -> Membership:
        return self.memberships.setdefault(audience_id, Membership())

    def members_view(self, audience_id: int) -> dict[str, Any] | None:
        """The audience's live members (None for an unknown audience)."""
        audience = self.audiences.get(audience_id)
        if audience is None:
            return None
        live = self.membership(audience_id).live(self.now(), audience["metadata"]["ttl"])
        return {
            "audienceId": audience_id,
            "members": [{"externalUserId": m, "expiresAt": expiry} for m, expiry in live],
            "size": len(live),
        }

    def job_status(self, job_id: str) -> dict[str, Any] | None:
        job = self.jobs.get(job_id)
        if job is None:
            return None
        status = job.status(time.monotonic())
        if status["jobState"] in TERMINAL_JOB_STATES:
            if job.observed_terminal:
                self.counters["terminal_polls"] += 1
            job.observed_terminal = True
        return status

    def poll_started(self, job_id: str) -> None:
        self.polls_in_flight[job_id] += 1
        peak = max(self.counters["max_concurrent_polls_per_job"], self.polls_in_flight[job_id])
        self.counters["max_concurrent_polls_per_job"] = peak

    def poll_finished(self, job_id: str) -> None:
        self.polls_in_flight[job_id] -= 1
        if self.polls_in_flight[job_id] <= 0:
            del self.polls_in_flight[job_id]

    # -- audiences, connections ----------------------------------------------------------------

    def create_audience(self, body: dict[str, Any]) -> dict[str, Any]:
        audience_id = self.outcomes.randrange(10**17, 10**18)
        while audience_id in self.audiences:
            audience_id = self.outcomes.randrange(10**17, 10**18)
        return self._add_audience(audience_id, body)

    def _add_audience(self, audience_id: int, body: dict[str, Any]) -> dict[str, Any]:
        metadata = body.get("metadata") or {}
        audience = {
            "audienceId": audience_id,
            "name": body["name"],
            "description": body.get("description", ""),
            "countryCode": body.get("countryCode"),
            "targetResource": body["targetResource"],
            "metadata": {
                "externalAudienceId": metadata.get("externalAudienceId", str(uuid.uuid4())),
                "ttl": metadata.get("ttl", api.TTL_MAX_SECONDS),
            },
        }
        self.audiences[audience_id] = audience
        return audience

    def provide_audience(
        self, audience_id: int, connection_id: str, ttl: int | None = None
    ) -> dict[str, Any]:
        """Make sure the audience `audience_id` exists, tied to `connection_id` (a test's or a
        local stack's setup: Amazon gives ids itself, configs name fixed ones). An existing one
        is left as it is."""
        if audience_id in self.audiences:
            return self.audiences[audience_id]
        body: dict[str, Any] = {
            "name": f"providedAudience{audience_id}",
            "targetResource": {"connectionId": connection_id},
        }
        if ttl is not None:
            body["metadata"] = {"ttl": ttl}
        return self._add_audience(audience_id, body)

    def provide(self, destinations: Iterable[Destination]) -> None:
        """Set up what `destinations` need, as an advertiser sets it up at Amazon: the AMC terms
        accepted, each connection and each audience (tied to its destination's connection)."""
        self.terms_accepted = True
        for dest in destinations:
            self.provide_connection(dest.connection_id)
            self.provide_audience(dest.audience_id, dest.connection_id)

    def provide_connection(self, connection_id: str) -> dict[str, Any]:
        """Make sure the connection `connection_id` exists (see `provide_audience`)."""
        if connection_id not in self.connections:
            self.connections[connection_id] = {
                "amcInstanceId": "amcsandbox",
                "isDefault": False,
                "clientId": self.settings.client_id,
                "connectionId": connection_id,
                "customerId": "A0SANDBOXCUSTOMER",
            }
        return self.connections[connection_id]

    def audience_view(self, audience_id: int) -> dict[str, Any] | None:
        audience = self.audiences.get(audience_id)
        if audience is None:
            return None
        size = self.membership(audience_id).audience_size(self.now(), audience["metadata"]["ttl"])
        metadata = {**audience["metadata"], "audienceSize": size}
        return {**audience, "metadata": metadata}

    def update_audience(self, audience_id: int, body: dict[str, Any]) -> None:
        audience = self.audiences[audience_id]
        for key in ("name", "description", "countryCode"):
            if key in body:
                audience[key] = body[key]
        audience["metadata"].update(body.get("metadata") or {})

    def create_connection(self, body: dict[str, Any]) -> str:
        connection_id = str(uuid.uuid4())
        if body.get("isDefault"):
            for other in self.connections.values():
                other["isDefault"] = False
        self.connections[connection_id] = {
            **body,
            "isDefault": bool(body.get("isDefault", False)),
            "clientId": self.settings.client_id,
            "connectionId": connection_id,
            "customerId": "A0SANDBOXCUSTOMER",
        }
        return connection_id
