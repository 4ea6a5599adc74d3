"""Plain data passed between the pipeline stages. No I/O, no behaviour beyond (de)serialization.

source -> SourceRef + bytes; decode -> ProfileChange; route+hash -> MemberRecord per destination
(or an Erase), recorded in the member table; a sender's claims -> Batch (the members of one
POST) -> job row + the members' sent state.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import StrEnum
from functools import lru_cache
from typing import Any

import orjson

from syncd.vocabulary import Partition


class Action(StrEnum):
    """Member action; the value is the API's `action`."""

    ADD = "CREATE"
    REMOVE = "DELETE"


# One SourceRef, Message and Member is made per event: they are plain slotted classes, not
# frozen ones, whose `__init__` costs three times as much (treat them as immutable all the same).


@dataclass(slots=True)
class SourceRef:
    """Where an event came from: acknowledging it means the offset may be committed."""

    topic: str
    partition: int
    offset: int

    @property
    def topic_partition(self) -> Partition:
        return Partition(self.topic, self.partition)


@dataclass(frozen=True, slots=True)
class Destination:
    """One `[[destinations]]` entry: an audience key routed to an Amazon audience."""

    audience: str
    connection_id: str
    audience_id: int
    country_code: str
    paused: bool = False  # true: its changes are recorded and wait; nothing is sent
    consent_policy: str = "pass"  # pass | strict (see routing.apply_consent_policy)


@dataclass(frozen=True, slots=True)
class Consent:
    """An event's consent. `ip_address` (where the consent was collected) is personal data: it
    goes out as `userConsent.geo.ipAddress`, with the record's country as `geo.countryCode`."""

    amzn_user_data: str | None = None
    amzn_ad_storage: str | None = None
    tcf: str | None = None
    gpp: str | None = None
    ip_address: str | None = None

    def to_api(self, country_code: str | None = None) -> dict[str, Any] | None:
        """The record's `userConsent` object, or None if nothing is set. `geo` only comes with
        an IP address (`country_code` is then the record's country), and always beside a
        `consent` object (the API's `userConsent` holds one), empty if no signal is set."""
        consent: dict[str, Any] = {}
        amzn = {}
        if self.amzn_ad_storage:
            amzn["amznAdStorage"] = self.amzn_ad_storage
        if self.amzn_user_data:
            amzn["amznUserData"] = self.amzn_user_data
        if amzn:
            consent["amzn"] = amzn
        if self.tcf:
            consent["tcf"] = self.tcf
        if self.gpp:
            consent["gpp"] = self.gpp
        if self.ip_address:  # `geo` goes beside a `consent` object, if an empty one
            geo = {"countryCode": country_code, "ipAddress": self.ip_address}
            return {"consent": consent, "geo": geo}
        return {"consent": consent} if consent else None


@dataclass(slots=True)
class ProfileChange:
    """One decoded input event. `identifiers` maps a PII key to its raw (or pre-hashed) values.

    Raw PII lives here only between decode and hash; never log or persist this object.
    """

    profile_id: str
    identifiers: dict[str, list[str]]
    adds: tuple[str, ...] = ()
    removes: tuple[str, ...] = ()
    country: str | None = None
    consent: Consent | None = None
    occurred_at: float | None = None  # epoch seconds
    event_id: str | None = None
    erase: bool = False  # an erase event: no identifiers, audiences, country or consent

    @property
    def identifiers_only(self) -> bool:
        """No audience named: the change updates the profile wherever it is a member."""
        return not self.adds and not self.removes and not self.erase

    def __repr__(self) -> str:  # never print identifiers
        return (
            f"ProfileChange(event_id={self.event_id!r}, adds={self.adds!r}, "
            f"removes={self.removes!r}, erase={self.erase!r}, "
            f"identifiers=<{len(self.identifiers)} keys>)"
        )


@dataclass(slots=True)
class MemberRecord:
    """One member change for one destination, hashed and encoded: safe to hold and send.

    `json` is the API's record object (`member_record` builds it); batching concatenates these
    bytes into request bodies, so a record is encoded once, wherever it was hashed.

    `identifiers_only`: the event named no audience; the record (action ADD) updates the member
    only where it is one already. `dead_letter` (a reason, e.g. `consent_missing`): the record
    must not be sent or recorded, only dead-lettered."""

    external_user_id: str
    action: Action
    json: bytes
    digest: bytes  # record_digest(json), computed where the record is encoded
    occurred_at: float | None = None
    identifiers_only: bool = False  # an event without `audiences`: updates existing members
    dead_letter: str = ""  # a policy kept the record back: its member dead-letter reason


@dataclass(frozen=True, slots=True)
class Erase:
    """An erase event: remove the member from every audience (`occurred_at` None: the Kafka
    message's timestamp stands in)."""

    external_user_id: str
    occurred_at: float | None


def member_record(
    external_user_id: str,
    country_code: str,
    action: Action,
    hashed_pii: list[dict[str, str]],
    consent: Consent | None = None,
    occurred_at: float | None = None,
    identifiers_only: bool = False,
    dead_letter: str = "",
) -> MemberRecord:
    user_consent = _record_consent(country_code, consent)
    encoded = _encode(external_user_id, country_code, action, hashed_pii, user_consent)
    return MemberRecord(
        external_user_id,
        action,
        encoded,
        _digest(country_code, hashed_pii, user_consent),  # = record_digest(encoded), unparsed
        occurred_at,
        identifiers_only,
        dead_letter,
    )


def encode_record(
    external_user_id: str,
    country_code: str,
    action: Action,
    hashed_pii: list[dict[str, str]],
    consent: Consent | None = None,
) -> bytes:
    """The API's record object as JSON. orjson escapes every string, so no id, country, digest
    or consent text can break the request body it is spliced into (a lone surrogate, which no
    decoded event holds, raises `orjson.JSONEncodeError` instead)."""
    return _encode(
        external_user_id, country_code, action, hashed_pii, _record_consent(country_code, consent)
    )


def _record_consent(country_code: str, consent: Consent | None) -> dict[str, Any] | None:
    """The record's `userConsent`, if any."""
    if consent is None:
        return None
    # an IP address is (nearly) unique per event and personal: never cached
    return _user_consent(consent) if consent.ip_address is None else consent.to_api(country_code)


def _encode(
    external_user_id: str,
    country_code: str,
    action: Action,
    hashed_pii: list[dict[str, str]],
    user_consent: dict[str, Any] | None,
) -> bytes:
    body: dict[str, Any] = {
        "externalUserId": external_user_id,
        "countryCode": country_code,
        "action": action.value,
        "hashedPII": hashed_pii,
    }
    if user_consent is not None:
        body["userConsent"] = user_consent
    encoded: bytes = orjson.dumps(body)  # typed: orjson is Any where mypyc compiles this
    return encoded


def record_digest(record: bytes) -> bytes:
    """SHA-256 (32 bytes) of a record's canonical content: its country, its hashed identifiers as
    a sorted set of (key, hash) pairs, and its consent values. Not the action (a column of its
    own), the externalUserId (the key), nor the consent's IP address: a change that differs only
    there is not sent again."""
    obj = orjson.loads(record)
    return _digest(obj.get("countryCode"), obj.get("hashedPII") or (), obj.get("userConsent"))


def _digest(country: Any, hashed_pii: Iterable[dict[str, str]], consent: Any) -> bytes:
    """`record_digest` of the record made of these parts (`member_record` has them at hand: it
    spares the parse, most of the digest's cost). Reads `consent`, never changes it (it may be
    `_user_consent`'s cached object)."""
    pairs = sorted({(k, v) for pii in hashed_pii for k, v in pii.items()})
    if isinstance(consent, dict) and isinstance(consent.get("geo"), dict):
        geo = {k: v for k, v in consent["geo"].items() if k != "ipAddress"}
        consent = (
            {**consent, "geo": geo} if geo else {k: v for k, v in consent.items() if k != "geo"}
        )
    canonical = orjson.dumps([country, pairs, consent or None], option=orjson.OPT_SORT_KEYS)
    return hashlib.sha256(canonical).digest()


@lru_cache(maxsize=64)  # a few consents make up most events; their objects are only read
def _user_consent(consent: Consent) -> dict[str, Any] | None:
    return consent.to_api()


@dataclass(slots=True)
class Member:
    """What a sent batch keeps of each record: who and which action (the hashed identifiers
    live on only in the request body)."""

    external_user_id: str
    action: Action


@dataclass(slots=True)
class Batch:
    """Claimed members of one destination, as one POST carries them."""

    destination: Destination
    records: list[Member] = field(default_factory=list)
    size_bytes: int = 0
    first_event_at: float | None = None
