"""The sandbox application: a strict, observable emulator of the Advertiser audiences API.

It serves the LwA token endpoint and the ten operations of amazon-api.md with the same paths,
bodies, status codes and media types, and validates requests the way a careful server would
(Amazon-like 400 `{"message": ...}` naming the problem). Around that it adds what tests need:
a token bucket per client id (429 + Retry-After), a rolling per-connection record window with a
budget, fault injection (latency, 5xx, dropped connections, hangs, 429 storms, expired tokens,
a revoked refresh token, one status for one connection's record POSTs for a while, records
refused by an externalUserId marker), counters, and a ledger of every accepted record.

Validation error messages name fields and rules, never the values: a request may carry PII.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import ipaddress
import itertools
import math
import random
import re
import secrets
import time
import uuid
from collections import Counter, OrderedDict, deque
from collections.abc import Awaitable, Callable, Collection, Iterable
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web

from syncd import config as config_mod
from syncd.amazon import api
from syncd.model import Destination
from syncd.vocabulary import (
    CONSENT_ANSWERS,
    CONSENT_VALUES,
    MAX_HASHED_PII_OBJECTS,
    MAX_HASHED_VALUES_PER_MEMBER,
    PII_KEYS,
    TERMINAL_JOB_STATES,
    ConsentSignal,
    JobState,
)


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
CONTROL_PREFIX = "/_sandbox"
API_PREFIX = "/amc/"
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
    }
)

# ----------------------------------------------------------------------------------------------
# Validation: small functions returning an error message (naming field and rule) or None.
# ----------------------------------------------------------------------------------------------

PII_KEY_SET = frozenset(PII_KEYS)
ACTIONS = ("CREATE", "DELETE")
TARGET_TYPES = ("AMC", "DSP")
RECORDS_BODY_KEYS = frozenset({"audienceId", "targetResource", "records"})
RECORD_KEYS = frozenset(
    {"externalUserId", "countryCode", "action", "hashedPII", "userConsent", "measurements"}
)
USER_CONSENT_KEYS = frozenset({"consent", "geo"})
CONSENT_KEYS = frozenset({"amzn", "tcf", "gpp"})
AMZN_CONSENT_KEYS = frozenset({"amznAdStorage", "amznUserData"})
GEO_KEYS = frozenset({"countryCode", "ipAddress"})
# Members whose personal data needs a consent signal (Amazon: UK and EEA; we add CH): the EU,
# Iceland, Liechtenstein, Norway, the United Kingdom and Switzerland.
EU_COUNTRIES = "AT BE BG CY CZ DE DK EE ES FI FR GR HR HU IE IT LT LU LV MT NL PL PT RO SE SI SK"
CONSENT_COUNTRIES = frozenset(f"{EU_COUNTRIES} IS LI NO GB CH".split())
METADATA_KEYS = frozenset({"name", "description", "countryCode", "targetResource", "metadata"})
CONNECTION_KEYS = frozenset(
    {
        "amcAccountId",
        "amcAccountMarketplaceId",
        "amcInstanceId",
        "dspAdvertiserId",
        "dspProfileId",
        "isDefault",
    }
)
COUNTRY_CODE = re.compile(r"[A-Z]{2}")
AUDIENCE_NAME = re.compile(r"[0-9A-Za-z]{10,128}")

Check = str | None


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _json_type(value: Any) -> str:
    names = {bool: "boolean", int: "integer", float: "number", str: "string", list: "array"}
    if value is None:
        return "null"
    return names.get(type(value), "object")


def check_keys(obj: dict[str, Any], allowed: frozenset[str], where: str) -> Check:
    if obj.keys() <= allowed:
        return None
    unknown = sorted(str(k)[:64] for k in obj if k not in allowed)
    return f"{where} has unknown key(s) {', '.join(unknown)}; allowed: {', '.join(sorted(allowed))}"


def check_audience_id(value: Any) -> Check:
    if not _is_int(value):
        return f"audienceId must be an integer, got {_json_type(value)}"
    if value <= 0:
        return "audienceId must be a positive integer"
    return None


def check_target_resource(value: Any) -> Check:
    if value is None:
        return "targetResource.connectionId is required"
    if not isinstance(value, dict):
        return f"targetResource must be an object, got {_json_type(value)}"
    error = check_keys(value, frozenset({"connectionId", "targetTypes"}), "targetResource")
    if error:
        return error
    connection_id = value.get("connectionId")
    if connection_id is None:
        return "targetResource.connectionId is required"
    if not isinstance(connection_id, str) or not connection_id.strip():
        return "targetResource.connectionId must be a non-empty string"
    types = value.get("targetTypes")
    if types is not None and (
        not isinstance(types, list) or not all(t in TARGET_TYPES for t in types)
    ):
        return "targetResource.targetTypes must be a list of AMC and/or DSP"
    return None


def check_records_list(value: Any, max_records: int) -> Check:
    if not isinstance(value, list):
        return f"records must be an array, got {_json_type(value)}"
    if not value:
        return "records must hold at least 1 record"
    if len(value) > max_records:
        return f"records holds {len(value)} records; at most {max_records} per request"
    return None


# The record checks return the rest of a message that starts with the record's path
# (`records[i]`), which `check_record` puts in front: nothing is formatted for a valid record.


def check_external_user_id(value: Any) -> Check:
    if value is None:
        return ".externalUserId is required"
    if not isinstance(value, str) or not api.EXTERNAL_USER_ID.fullmatch(value):
        return f".externalUserId must match {api.EXTERNAL_USER_ID.pattern}"
    return None


def check_action(value: Any) -> Check:
    if value not in ACTIONS or not isinstance(value, str):
        return f".action must be one of {', '.join(ACTIONS)}"
    return None


def check_country_code(value: Any, where: str = "") -> Check:
    """Optional; when present an ISO 3166-1 alpha-2 code (2 upper-case letters)."""
    if value is not None and (not isinstance(value, str) or not COUNTRY_CODE.fullmatch(value)):
        return f"{where}.countryCode must be an ISO 3166-1 alpha-2 code (2 upper-case letters)"
    return None


_HEX = b"0123456789abcdef"


def _all_digests(values: Collection[Any]) -> bool:
    """Every value matches `api.SHA256_HEX` (64 lower-case hex characters), checked for all of
    them at once: half of what the regex cost. `translate` deletes the hex bytes and so
    keeps anything else (non-ASCII text encodes to bytes that are not hex)."""
    try:
        joined = "".join(values).encode("utf-8", "surrogatepass")
    except TypeError:  # a value that is not a string
        return False
    return set(map(len, values)) == {64} and not joined.translate(None, _HEX)


def check_pii_object(obj: Any) -> Check:
    """One hashedPII object; the message continues its path (" must be ...", ".email ...")."""
    if not isinstance(obj, dict) or not obj:
        return " must be a non-empty object"
    error = check_keys(obj, PII_KEY_SET, "")
    if error:
        return error
    if _all_digests(obj.values()):  # the common case
        return None
    for key, digest in obj.items():
        if not isinstance(digest, str) or not api.SHA256_HEX.fullmatch(digest):
            return f".{key} must be a 64-character lowercase hex SHA-256 digest"
    return None


def check_hashed_pii(value: Any) -> Check:
    limit = MAX_HASHED_PII_OBJECTS
    if not isinstance(value, list) or not 1 <= len(value) <= limit:
        return f".hashedPII must be an array of 1 to {limit} objects"
    total = 0
    for j, obj in enumerate(value):
        error = check_pii_object(obj)
        if error:
            return f".hashedPII[{j}]{error}"
        total += len(obj)
    if total > MAX_HASHED_VALUES_PER_MEMBER:
        return (
            f".hashedPII holds {total} hashed values; "
            f"at most {MAX_HASHED_VALUES_PER_MEMBER} per member"
        )
    return None


def check_ip_address(value: Any) -> bool:
    """An IPv4 or IPv6 address in its plain text form (no zone id, no padding)."""
    if not isinstance(value, str) or "%" in value:
        return False
    try:
        ipaddress.ip_address(value)
    except ValueError:
        return False
    return True


def check_geo(value: Any) -> Check:
    """Where the consent was collected: `{"countryCode": ISO2, "ipAddress": IPv4/IPv6}`, both
    optional."""
    if value is None:
        return None
    if not isinstance(value, dict):
        return ".userConsent.geo must be an object"
    error = check_keys(value, GEO_KEYS, ".userConsent.geo") or check_country_code(
        value.get("countryCode"), ".userConsent.geo"
    )
    if error:
        return error
    if "ipAddress" in value and not check_ip_address(value["ipAddress"]):
        return ".userConsent.geo.ipAddress must be an IPv4 or IPv6 address"
    return None


def check_user_consent(value: Any) -> Check:
    if value is None:
        return None
    if not isinstance(value, dict) or "consent" not in value:
        return ".userConsent must be an object with a consent key (and optionally geo)"
    error = check_keys(value, USER_CONSENT_KEYS, ".userConsent") or check_geo(value.get("geo"))
    if error:
        return error
    consent = value["consent"]
    if not isinstance(consent, dict):
        return ".userConsent.consent must be an object"
    error = check_keys(consent, CONSENT_KEYS, ".userConsent.consent")
    if error:
        return error
    for key in ("tcf", "gpp"):
        if key in consent and not isinstance(consent[key], str):
            return f".userConsent.consent.{key} must be a string"
    amzn = consent.get("amzn")
    if amzn is None:
        return None
    if not isinstance(amzn, dict):
        return ".userConsent.consent.amzn must be an object"
    error = check_keys(amzn, AMZN_CONSENT_KEYS, ".userConsent.consent.amzn")
    if error:
        return error
    for key, grant in amzn.items():
        if not isinstance(grant, str) or grant not in CONSENT_VALUES:
            return f".userConsent.consent.amzn.{key} must be one of {', '.join(ConsentSignal)}"
    return None


def consent_refusal(record: dict[str, Any], audience_country: str | None) -> Check:
    """Why a valid record is refused when consent is required, or None.

    A CREATE for a member of the UK/EEA/CH needs a consent signal: `amznUserData` GRANTED or
    DENIED, or a TCF or GPP string (Amazon accepts any of the three formats). The member's
    country for consent is `userConsent.geo.countryCode`, else the record's `countryCode`,
    else the audience's (Amazon's resolution order)."""
    if record["action"] != "CREATE":
        return None
    user_consent = record.get("userConsent") or {}
    geo = user_consent.get("geo") or {}
    country = geo.get("countryCode") or record.get("countryCode") or audience_country
    if country not in CONSENT_COUNTRIES:
        return None
    consent = user_consent.get("consent") or {}
    amzn = consent.get("amzn") or {}
    if amzn.get("amznUserData") in CONSENT_ANSWERS or consent.get("tcf") or consent.get("gpp"):
        return None
    return (
        "CONSENT_REQUIRED: a UK/EEA/CH member needs consent: userConsent.consent.amzn."
        "amznUserData GRANTED or DENIED, or a tcf or gpp string"
    )


def check_record(record: Any, index: int) -> Check:
    error = _record_error(record)
    return None if error is None else f"records[{index}]{error}"


def _record_error(record: Any) -> Check:
    if not isinstance(record, dict):
        return f" must be an object, got {_json_type(record)}"
    measurements = record.get("measurements")
    if measurements is not None and not isinstance(measurements, dict):
        return ".measurements must be an object"
    return (
        check_keys(record, RECORD_KEYS, "")
        or check_external_user_id(record.get("externalUserId"))
        or check_action(record.get("action"))
        or check_country_code(record.get("countryCode"))
        or check_hashed_pii(record.get("hashedPII"))
        or check_user_consent(record.get("userConsent"))
    )


def check_records_body(body: Any, max_records: int) -> Check:
    """The first problem of a POST /amc/audiences/records body, or None when it is valid."""
    if not isinstance(body, dict):
        return f"request body must be a JSON object, got {_json_type(body)}"
    error = (
        check_keys(body, RECORDS_BODY_KEYS, "request body")
        or check_audience_id(body.get("audienceId"))
        or check_target_resource(body.get("targetResource"))
        or check_records_list(body.get("records"), max_records)
    )
    if error:
        return error
    for index, record in enumerate(body["records"]):
        error = check_record(record, index)
        if error:
            return error
    return None


def check_ttl(value: Any) -> Check:
    if value is not None and (not _is_int(value) or not 0 <= value <= api.TTL_MAX_SECONDS):
        return f"metadata.ttl must be an integer from 0 to {api.TTL_MAX_SECONDS} seconds"
    return None


def check_audience_metadata(value: Any) -> Check:
    if value is None:
        return None
    if not isinstance(value, dict):
        return "metadata must be an object"
    error = check_keys(value, frozenset({"externalAudienceId", "ttl"}), "metadata")
    if error:
        return error
    external = value.get("externalAudienceId")
    if external is not None and not isinstance(external, str):
        return "metadata.externalAudienceId must be a string"
    return check_ttl(value.get("ttl"))


def check_audience_name(value: Any) -> Check:
    if value is None:
        return "name is required"
    if not isinstance(value, str) or not AUDIENCE_NAME.fullmatch(value):
        return "name must be 10 to 128 alphanumeric characters"
    return None


def check_description(value: Any) -> Check:
    if value is not None and not isinstance(value, str):
        return "description must be a string"
    return None


def check_audience_target(value: Any) -> Check:
    if not isinstance(value, dict):
        return "targetResource with a connectionId or an advertiserId is required"
    error = check_keys(value, frozenset({"connectionId", "advertiserId"}), "targetResource")
    if error:
        return error
    connection_id, advertiser_id = value.get("connectionId"), value.get("advertiserId")
    if connection_id is None and advertiser_id is None:
        return "targetResource needs a connectionId or an advertiserId"
    if connection_id is not None and (not isinstance(connection_id, str) or not connection_id):
        return "targetResource.connectionId must be a non-empty string"
    if advertiser_id is not None and not _is_int(advertiser_id):
        return "targetResource.advertiserId must be an integer"
    return None


def check_create_audience(body: Any) -> Check:
    if not isinstance(body, dict):
        return f"request body must be a JSON object, got {_json_type(body)}"
    return (
        check_keys(body, METADATA_KEYS, "request body")
        or check_audience_name(body.get("name"))
        or check_description(body.get("description"))
        or check_country_code(body.get("countryCode"), "request body")
        or check_audience_target(body.get("targetResource"))
        or check_audience_metadata(body.get("metadata"))
    )


def check_update_audience(body: Any) -> Check:
    if not isinstance(body, dict):
        return f"request body must be a JSON object, got {_json_type(body)}"
    error = check_keys(body, METADATA_KEYS - {"targetResource"}, "request body")
    if error:
        return error
    name = body.get("name")
    return (
        (check_audience_name(name) if name is not None else None)
        or check_description(body.get("description"))
        or check_country_code(body.get("countryCode"), "request body")
        or check_audience_metadata(body.get("metadata"))
    )


def check_create_connection(body: Any) -> Check:
    if not isinstance(body, dict):
        return f"request body must be a JSON object, got {_json_type(body)}"
    error = check_keys(body, CONNECTION_KEYS, "request body")
    if error:
        return error
    if not body.get("amcInstanceId") and not body.get("dspAdvertiserId"):
        return "a connection needs an amcInstanceId or a dspAdvertiserId"
    for key in CONNECTION_KEYS - {"isDefault"}:
        if key in body and not isinstance(body[key], str):
            return f"{key} must be a string"
    if "isDefault" in body and not isinstance(body["isDefault"], bool):
        return "isDefault must be a boolean"
    return None


def check_terms_acceptance(body: Any, agreement_token: str) -> Check:
    if not isinstance(body, dict):
        return f"request body must be a JSON object, got {_json_type(body)}"
    error = check_keys(body, frozenset({"agreementToken", "hasAccepted"}), "request body")
    if error:
        return error
    if body.get("hasAccepted") is not True:
        return "hasAccepted must be true"
    if body.get("agreementToken") != agreement_token:
        return "agreementToken does not match the current terms (GET them first)"
    return None


def accepts(accept_header: str, media_type: str) -> bool:
    """Whether an Accept header allows `media_type` (wildcards included)."""
    main_type = media_type.split("/", 1)[0]
    allowed = {media_type, "*/*", f"{main_type}/*"}
    return any(part.split(";", 1)[0].strip() in allowed for part in accept_header.split(","))


# ----------------------------------------------------------------------------------------------
# State
# ----------------------------------------------------------------------------------------------


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


class ConnectionDropped(Exception):
    """Raised by the gate after it dropped the connection (reset or timeout fault)."""


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
        job_id = str(uuid.uuid4())
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


SANDBOX_STATE = web.AppKey("sandbox_state", SandboxState)

# ----------------------------------------------------------------------------------------------
# HTTP
# ----------------------------------------------------------------------------------------------

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def json_response(
    data: Any, status: int = 200, content_type: str = "application/json"
) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type=content_type)


def error(
    request: web.Request, status: int, message: str, headers: dict[str, str] | None = None
) -> web.Response:
    """Amazon-like error body; the connections API adds a requestId."""
    body: dict[str, str] = {"message": message}
    if request.path.startswith(api.CONNECTIONS_PATH):
        body["requestId"] = str(uuid.uuid4())
    response = json_response(body, status)
    response.headers.update(headers or {})
    return response


def media_type_of(path: str) -> str:
    if path.startswith(api.CONNECTIONS_PATH):  # includes the terms path
        return api.CONNECTIONS_MEDIA_TYPE
    return api.AUDIENCES_MEDIA_TYPE


def ok(request: web.Request, data: Any, status: int = 200) -> web.Response:
    return json_response(data, status, media_type_of(request.path))


def retry_after(seconds: float) -> dict[str, str]:
    return {"Retry-After": str(max(1, math.ceil(seconds)))}


async def read_json(request: web.Request) -> tuple[Any, web.Response | None]:
    """The parsed body, or an error response when it is not JSON."""
    raw = await request.read()
    if not raw:
        return None, error(request, 400, "request body is required (JSON)")
    try:
        return orjson.loads(raw), None
    except orjson.JSONDecodeError:
        return None, error(request, 400, "request body is not valid JSON")


def route_name(request: web.Request) -> str:
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else "unmatched"


@web.middleware
async def observe(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Count and log every non-control request; unmatched routes get JSON errors too."""
    state = request.app[SANDBOX_STATE]
    control = request.path.startswith(CONTROL_PREFIX)
    status: int | str = "dropped"
    response: web.StreamResponse
    try:
        response = await handler(request)
        status = response.status
    except web.HTTPException as exc:
        response = error(request, exc.status, f"{exc.reason}: {request.method} {request.path}")
        status = exc.status
    except ConnectionDropped:
        response = web.Response(status=500)  # written to a closed transport: never seen
    if not control:
        retry_after = response.headers.get("Retry-After")
        state.log_request(request.method, route_name(request), request.path, status, retry_after)
    return response


@web.middleware
async def gate(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Everything in front of an API operation: poll tracking, faults, auth, client id,
    throttling and media types."""
    if not request.path.startswith(API_PREFIX):
        return await handler(request)
    state = request.app[SANDBOX_STATE]
    job_id = request.match_info.get("jobRequestId") if request.method == "GET" else None
    if job_id:
        state.poll_started(job_id)
    try:
        return await _guarded(request, handler, state)
    finally:
        if job_id:
            state.poll_finished(job_id)


async def _guarded(
    request: web.Request, handler: Handler, state: SandboxState
) -> web.StreamResponse:
    faults = state.faults
    if faults.latency_s > 0:
        await asyncio.sleep(faults.latency_s)
    if state.chance(faults.timeout_rate):
        await state.hang()
        _drop(request)
    if state.chance(faults.reset_rate):
        _drop(request)
    if state.chance(faults.error_rate):
        status = state.fault_rng.choice((500, 502, 503, 504))
        return error(request, status, "injected server error")
    problem = state.check_bearer(request.headers.get("Authorization"))
    if problem:
        return error(request, 401, problem)
    client_id = request.headers.get(api.CLIENT_ID_HEADER, "")
    problem = state.check_client_id(client_id)
    if problem:
        return error(request, 400, problem)
    wait = state.throttle_wait(client_id)
    if wait > 0:
        return error(request, 429, "Too Many Requests", retry_after(wait))
    if faults.connection_status and request.method == "POST" and request.path == api.RECORDS_PATH:
        injected = await _connection_fault(request, state)
        if injected is not None:
            return injected
    media_type = media_type_of(request.path)
    accept = request.headers.get("Accept")
    if accept and not accepts(accept, media_type):
        return error(request, 406, f"Accept must allow {media_type}")
    if request.method in ("POST", "PUT", "PATCH"):
        if "Content-Type" not in request.headers:
            return error(request, 415, f"Content-Type header is required: {media_type}")
        if request.content_type != media_type:
            return error(request, 415, f"Content-Type must be {media_type}")
    return await handler(request)


async def _connection_fault(request: web.Request, state: SandboxState) -> web.Response | None:
    """The injected answer for a record POST to a connection under a connection_status fault."""
    try:
        body = orjson.loads(await request.read())
        connection_id = body["targetResource"]["connectionId"]
    except (orjson.JSONDecodeError, KeyError, TypeError):
        return None  # the handler reports what is wrong with the body
    fault = state.connection_fault(connection_id) if isinstance(connection_id, str) else None
    if fault is None:
        return None
    status, wait = fault
    headers = {"Retry-After": str(math.ceil(wait))} if wait is not None else None
    return error(request, status, f"injected HTTP {status} for this connection", headers)


def _drop(request: web.Request) -> None:
    if request.transport is not None:
        request.transport.abort()
    raise ConnectionDropped


# -- LwA -------------------------------------------------------------------------------------


def lwa_error(code: str, description: str, status: int = 400) -> web.Response:
    return json_response({"error": code, "error_description": description}, status)


async def token(request: web.Request) -> web.Response:
    state = request.app[SANDBOX_STATE]
    s = state.settings
    state.counters["token_requests"] += 1
    if request.content_type != "application/x-www-form-urlencoded":
        return lwa_error("invalid_request", "body must be application/x-www-form-urlencoded")
    form = await request.post()
    fields = {k: form.get(k) for k in ("grant_type", "refresh_token", "client_id", "client_secret")}
    missing = [k for k, v in fields.items() if not v]
    if missing:
        return lwa_error("invalid_request", f"missing parameter(s): {', '.join(missing)}")
    if fields["grant_type"] != "refresh_token":
        return lwa_error("unsupported_grant_type", "only grant_type=refresh_token is supported")
    if fields["client_id"] != s.client_id or fields["client_secret"] != s.client_secret:
        return lwa_error("invalid_client", "Client authentication failed", 401)
    if fields["refresh_token"] != s.refresh_token or state.faults.revoke_refresh_token:
        return lwa_error(
            "invalid_grant", "The request has an invalid grant parameter : refresh_token"
        )
    return json_response(
        {
            "access_token": state.issue_token(),
            "refresh_token": s.refresh_token,
            "token_type": "bearer",
            "expires_in": math.ceil(s.token_ttl_s),
        }
    )


# -- records ---------------------------------------------------------------------------------


async def post_records(request: web.Request) -> web.Response:
    state = request.app[SANDBOX_STATE]
    body, problem = await read_json(request)
    if problem:
        return problem
    message = check_records_body(body, state.settings.max_records)
    if message:
        return error(request, 400, message)
    if body["audienceId"] == state.settings.records_error_for_audience:
        return error(request, 400, f"audienceId {body['audienceId']} is not a valid audience")
    prefix = state.faults.refuse_records_prefix
    if prefix:
        for index, record in enumerate(body["records"]):
            if record["externalUserId"].startswith(prefix):
                return error(request, 400, f"records[{index}].externalUserId is not valid")
    if state.settings.strict_audiences and body["audienceId"] not in state.audiences:
        message = f"audience {body['audienceId']} not found (create it with {api.METADATA_PATH})"
        return error(request, 404, message)
    wait = state.budget_wait(body["targetResource"]["connectionId"], len(body["records"]))
    if wait is not None:
        return error(request, 429, "records per connection per hour exceeded", retry_after(wait))
    return ok(request, {"jobRequestId": state.accept_records(body)}, 202)


async def get_job(request: web.Request) -> web.Response:
    state = request.app[SANDBOX_STATE]
    job_id = request.match_info["jobRequestId"]
    status = state.job_status(job_id)
    if status is None:
        return error(request, 404, f"jobRequestId {job_id[:64]} not found")
    return ok(request, status)


# -- metadata --------------------------------------------------------------------------------


def path_audience_id(request: web.Request) -> int | None:
    raw = request.match_info["audienceId"]
    return int(raw) if raw.isascii() and raw.isdigit() else None


async def create_audience(request: web.Request) -> web.Response:
    state = request.app[SANDBOX_STATE]
    body, problem = await read_json(request)
    if problem:
        return problem
    message = check_create_audience(body)
    if message:
        return error(request, 400, message)
    audience = state.create_audience(body)
    data = {
        "audienceId": audience["audienceId"],
        "externalAudienceId": audience["metadata"]["externalAudienceId"],
    }
    return ok(request, data, 201)


async def get_audience(request: web.Request) -> web.Response:
    state = request.app[SANDBOX_STATE]
    audience_id = path_audience_id(request)
    if audience_id is None:
        return error(request, 400, "audienceId in the path must be an integer")
    audience = state.audience_view(audience_id)
    if audience is None:
        return error(request, 404, f"audience {audience_id} not found")
    return ok(request, audience)


async def update_audience(request: web.Request) -> web.Response:
    state = request.app[SANDBOX_STATE]
    audience_id = path_audience_id(request)
    if audience_id is None:
        return error(request, 400, "audienceId in the path must be an integer")
    body, problem = await read_json(request)
    if problem:
        return problem
    message = check_update_audience(body)
    if message:
        return error(request, 400, message)
    if audience_id not in state.audiences:
        return error(request, 404, f"audience {audience_id} not found")
    state.update_audience(audience_id, body)
    return ok(request, state.audience_view(audience_id))


# -- connections and terms -------------------------------------------------------------------


async def create_connection(request: web.Request) -> web.Response:
    state = request.app[SANDBOX_STATE]
    body, problem = await read_json(request)
    if problem:
        return problem
    message = check_create_connection(body)
    if message:
        return error(request, 400, message)
    return ok(request, {"connectionId": state.create_connection(body)}, 201)


async def list_connections(request: web.Request) -> web.Response:
    state = request.app[SANDBOX_STATE]
    connection_id = request.query.get("connectionId")
    connections = list(state.connections.values())
    if connection_id is not None:
        if connection_id not in state.connections:
            return error(request, 404, f"connection {connection_id[:64]} not found")
        connections = [state.connections[connection_id]]
    elif request.query.get("isDefault", "").lower() == "true":
        connections = [c for c in connections if c["isDefault"]]
    return ok(request, {"connections": connections})


async def delete_connection(request: web.Request) -> web.StreamResponse:
    state = request.app[SANDBOX_STATE]
    connection_id = request.query.get("connectionId")
    if not connection_id:
        message = "connectionId query parameter is required (without it ALL connections go)"
        return error(request, 400, message)
    if state.connections.pop(connection_id, None) is None:
        return error(request, 404, f"connection {connection_id[:64]} not found")
    return web.Response(status=204)


async def get_terms(request: web.Request) -> web.Response:
    state = request.app[SANDBOX_STATE]
    data = {
        "agreementContent": "<h1>Amazon Marketing Cloud Agreement</h1><p>Sandbox terms.</p>",
        "agreementToken": state.terms_token,
        "hasAccepted": state.terms_accepted,
    }
    return ok(request, data)


async def accept_terms(request: web.Request) -> web.StreamResponse:
    state = request.app[SANDBOX_STATE]
    body, problem = await read_json(request)
    if problem:
        return problem
    message = check_terms_acceptance(body, state.terms_token)
    if message:
        return error(request, 400, message)
    state.terms_accepted = True
    return web.Response(status=204)


# -- control ---------------------------------------------------------------------------------


async def control_stats(request: web.Request) -> web.Response:
    return json_response(request.app[SANDBOX_STATE].stats())


async def control_ledger(request: web.Request) -> web.Response:
    connection_id = request.query.get("connectionId")
    if not connection_id:
        return json_response({"message": "connectionId query parameter is required"}, 400)
    return json_response(request.app[SANDBOX_STATE].ledger(connection_id))


async def control_log(request: web.Request) -> web.Response:
    return json_response(list(request.app[SANDBOX_STATE].log))


async def control_faults(request: web.Request) -> web.Response:
    state = request.app[SANDBOX_STATE]
    try:
        faults = orjson.loads(await request.read())
        if not isinstance(faults, dict):
            raise ValueError("faults must be a JSON object")
        state.set_faults(faults)
    except (orjson.JSONDecodeError, ValueError, TypeError) as exc:
        return json_response({"message": str(exc)}, 400)
    return json_response(state.faults_view())


async def control_members(request: web.Request) -> web.Response:
    audience_id = path_audience_id(request)
    if audience_id is None:
        return json_response({"message": "audienceId in the path must be an integer"}, 400)
    view = request.app[SANDBOX_STATE].members_view(audience_id)
    if view is None:
        return json_response({"message": f"audience {audience_id} not found"}, 404)
    return json_response(view)


async def control_provide(request: web.Request) -> web.Response:
    """`{"terms_accepted": true, "connections": [id, ...], "audiences": [{"audienceId": n,
    "connectionId": id, "ttl": s}, ...]}`: make these exist as a setup made them (ids a config
    names; what exists stays). Every key is optional."""
    state = request.app[SANDBOX_STATE]
    try:
        body = orjson.loads(await request.read())
        if not isinstance(body, dict):
            raise ValueError("the body must be a JSON object")
        audiences = body.get("audiences", [])
        connections = body.get("connections", [])
        if not isinstance(audiences, list) or not isinstance(connections, list):
            raise ValueError("audiences and connections must be lists")
        for connection_id in connections:
            if not isinstance(connection_id, str) or not connection_id:
                raise ValueError("a connection id must be a non-empty string")
            state.provide_connection(connection_id)
        for audience in audiences:
            audience_id, connection_id = audience["audienceId"], audience["connectionId"]
            ttl = audience.get("ttl")
            if check_audience_id(audience_id) or not isinstance(connection_id, str):
                raise ValueError("an audience needs an integer audienceId and a connectionId")
            if problem := check_ttl(ttl):
                raise ValueError(problem)
            state.provide_audience(audience_id, connection_id, ttl)
        if body.get("terms_accepted"):
            state.terms_accepted = True
    except (orjson.JSONDecodeError, ValueError, TypeError, KeyError) as exc:
        return json_response({"message": str(exc)}, 400)
    return json_response(
        {
            "terms_accepted": state.terms_accepted,
            "connections": sorted(state.connections),
            "audiences": sorted(state.audiences),
        }
    )


async def control_reset(request: web.Request) -> web.Response:
    request.app[SANDBOX_STATE].reset()
    return web.Response(status=204)


async def _release_hanging(app: web.Application) -> None:
    app[SANDBOX_STATE].closing.set()


def create_app(
    settings: SandboxSettings | None = None, clock: Callable[[], float] = time.time
) -> web.Application:
    settings = settings or SandboxSettings()
    app = web.Application(middlewares=[observe, gate], client_max_size=settings.max_body_bytes)
    app[SANDBOX_STATE] = SandboxState(settings, clock)
    app.on_shutdown.append(_release_hanging)
    r = app.router
    r.add_post(api.TOKEN_PATH, token)
    r.add_post(api.RECORDS_PATH, post_records)
    r.add_get(api.RECORDS_PATH + "/{jobRequestId}", get_job)
    r.add_post(api.METADATA_PATH, create_audience)
    r.add_get(api.METADATA_PATH + "/{audienceId}", get_audience)
    r.add_put(api.METADATA_PATH + "/{audienceId}", update_audience)
    r.add_post(api.CONNECTIONS_PATH, create_connection)
    r.add_get(api.CONNECTIONS_PATH, list_connections)
    r.add_delete(api.CONNECTIONS_PATH, delete_connection)
    r.add_get(api.TERMS_PATH, get_terms)
    r.add_patch(api.TERMS_PATH, accept_terms)
    r.add_get(CONTROL_PREFIX + "/stats", control_stats)
    r.add_get(CONTROL_PREFIX + "/ledger", control_ledger)
    r.add_get(CONTROL_PREFIX + "/log", control_log)
    r.add_get(CONTROL_PREFIX + "/audiences/{audienceId}/members", control_members)
    r.add_post(CONTROL_PREFIX + "/faults", control_faults)
    r.add_post(CONTROL_PREFIX + "/provide", control_provide)
    r.add_post(CONTROL_PREFIX + "/reset", control_reset)
    return app
