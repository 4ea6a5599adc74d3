"""Constants and typed results of the Advertiser audiences API, as syncd uses it.

Pure data: no I/O here. The client (client.py) and the sandbox (syncd/sandbox) both import it,
so the two can never disagree about a path or a media type. The words the API shares with the
rest of syncd (job states, consent values, regions, PII keys and caps) are in syncd.vocabulary.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, TypeGuard

from syncd.vocabulary import JobState, Region

ENDPOINTS: dict[str, tuple[str, str]] = {
    # region: (API base URL, LwA token URL)
    Region.NA: ("https://advertising-api.amazon.com", "https://api.amazon.com/auth/o2/token"),
    Region.EU: ("https://advertising-api-eu.amazon.com", "https://api.amazon.co.uk/auth/o2/token"),
    Region.FE: ("https://advertising-api-fe.amazon.com", "https://api.amazon.co.jp/auth/o2/token"),
}

TOKEN_PATH = "/auth/o2/token"
RECORDS_PATH = "/amc/audiences/records"
METADATA_PATH = "/amc/audiences/metadata"
CONNECTIONS_PATH = "/amc/audiences/connections"
TERMS_PATH = "/amc/audiences/connections/terms"

AUDIENCES_MEDIA_TYPE = "application/vnd.amcaudiences.v1+json"  # records, metadata
CONNECTIONS_MEDIA_TYPE = "application/vnd.amcaudiencesconnections.v1+json"  # connections, terms

CLIENT_ID_HEADER = "Amazon-Advertising-API-ClientId"

MAX_RECORDS_PER_REQUEST = 10_000  # OpenAPI bound; Amazon's guidance (and our maximum) is 6000
# Whole-string patterns: use `fullmatch` (`match` would accept a prefix, and with `$` also a
# trailing newline).
EXTERNAL_USER_ID = re.compile(r"[0-9a-zA-Z_-]{1,128}")
SHA256_HEX = re.compile(r"[0-9a-f]{64}")
TTL_MAX_SECONDS = 34_300_800


def as_object(value: object) -> Mapping[str, Any]:
    """A part of Amazon's answer that should be a JSON object; anything else reads as none."""
    return value if isinstance(value, Mapping) else {}


def usable_ttl(value: object) -> TypeGuard[int | float]:
    """An audience's `ttl` as syncd uses it: a number of 0..TTL_MAX_SECONDS seconds (None, not
    set, means Amazon's default; anything else is unusable)."""
    return (
        isinstance(value, int | float)
        and not isinstance(value, bool)
        and 0 <= value <= TTL_MAX_SECONDS
    )


MATCHING_COUNTRIES = frozenset(
    [
        "AE",
        "AU",
        "BE",
        "BR",
        "CA",
        "DE",
        "EG",
        "ES",
        "FR",
        "GB",
        "IN",
        "IT",
        "JP",
        "MX",
        "NL",
        "PL",
        "SA",
        "SE",
        "SG",
        "TR",
        "US",
    ]
)


@dataclass(frozen=True, slots=True)
class AccessToken:
    value: str
    expires_at: float  # monotonic clock seconds


@dataclass(frozen=True, slots=True)
class InvalidRecord:
    external_id: str | None
    error: str


@dataclass(frozen=True, slots=True)
class JobStatus:
    job_request_id: str
    job_state: str
    processed_rate: float | None = None
    invalid_records: tuple[InvalidRecord, ...] = ()
    received_record_size: int | None = None
    id_resolution_count: int | None = None
    dsp_audience_size: int | None = None

    @property
    def terminal(self) -> bool:
        return self.job_state != JobState.PENDING


@dataclass(frozen=True, slots=True)
class Connection:
    connection_id: str
    raw: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Terms:
    agreement_content: str
    agreement_token: str
    has_accepted: bool


@dataclass(frozen=True, slots=True)
class Audience:
    audience_id: int
    raw: dict[str, Any]


def records_body(
    audience_id: int,
    connection_id: str,
    records: list[dict[str, Any]],
    target_types: tuple[str, ...] = (),
) -> dict[str, Any]:
    """The POST /amc/audiences/records body. `audience_id` stays an int (18 digits)."""
    target: dict[str, Any] = {"connectionId": connection_id}
    if target_types:
        target["targetTypes"] = list(target_types)
    return {"audienceId": audience_id, "targetResource": target, "records": records}
