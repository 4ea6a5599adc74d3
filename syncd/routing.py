"""Route and hash: one decoded ProfileChange -> one hashed MemberRecord per destination.

An identifiers-only change (no audience named) goes to every destination, as an ADD marked
`identifiers_only`: it updates the member wherever it is one (the member table decides where).

Raw identifiers are read here and only here (through the PII engine); what leaves this stage
carries hashes only. An event that yields nothing usable raises `Unusable(reason)`; the reason
is a bounded code (a metric label and the dead-letter header), never data.

Consent (a destination's `consent_policy`): "pass" sends what the event carries; "strict" keeps
back an add whose country needs consent (EEA, GB, CH) and whose `amzn_user_data` is neither
GRANTED nor DENIED (a `consent_missing` member dead letter, never recorded), and turns an add
with DENIED (any country) into a remove. Removes always pass: taking a member out needs no
consent.

Pure: what the router counts (filtered audiences, default countries, dropped values) it keeps
in `RouteCounts`, which the caller publishes as metrics, so it can run in a worker process.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Final, NamedTuple

from syncd.amazon.api import EXTERNAL_USER_ID
from syncd.model import (
    Action,
    Consent,
    Destination,
    MemberRecord,
    ProfileChange,
    member_record,
)
from syncd.pii import HashedPII, build_hashed_pii, normalize_country
from syncd.vocabulary import CONSENT_ANSWERS, ConsentSignal

_ADD = Action.ADD
_REMOVE = Action.REMOVE
_DENIED: Final = ConsentSignal.DENIED.value

STRICT = "strict"
CONSENT_MISSING = "consent_missing"
# Where Amazon requires the user's consent: the EU, the rest of the EEA (IS, LI, NO), GB and CH.
# fmt: off
CONSENT_COUNTRIES = frozenset({
    "AT", "BE", "BG", "HR", "CY", "CZ", "DK", "EE", "FI", "FR", "DE", "GR", "IE", "IT", "LV",
    "LT", "LU", "MT", "NL", "PL", "PT", "RO", "SK", "SI", "ES", "SE", "HU",  # the EU
    "IS", "LI", "NO", "GB", "CH",
})
# fmt: on


class Unusable(Exception):
    """The event cannot produce any record. `reason` is a short code, safe to log and export."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Part(NamedTuple):
    """One record of an event, for one destination (a tuple: cheaper to build, immutable)."""

    destination: Destination
    record: MemberRecord


@dataclass(slots=True)
class RouteCounts:
    """What routing counted since the last `take`, for the metrics of the process that owns
    them (the daemon publishes them: a transform worker imports no metrics)."""

    filtered: Counter[str] = field(default_factory=Counter)  # reason
    default_country: Counter[str] = field(default_factory=Counter)  # audience
    dropped: Counter[tuple[str, str]] = field(default_factory=Counter)  # (field, reason)


def external_user_id(profile_id: str) -> str:
    """The API's externalUserId: the profile id when all of it fits `[0-9a-zA-Z_-]{1,128}`,
    else its SHA-256 hex (deterministic, so adds and removes of one profile still meet). A lone
    surrogate (no decoded event holds one) is hashed as its UTF-8-style bytes, not an error."""
    if EXTERNAL_USER_ID.fullmatch(profile_id):
        return profile_id
    return hashlib.sha256(profile_id.encode("utf-8", "surrogatepass")).hexdigest()


def strict_consent(
    country: str, consent: Consent | None, identifiers_only: bool
) -> tuple[Action, bool, str]:
    """An add under the strict policy: (action, identifiers_only, dead-letter reason).

    DENIED removes the member wherever syncd may hold it (an identifiers-only event too: a
    withdrawn consent must reach every strict audience, and a remove of a non-member is
    harmless); no answer in a country that needs one keeps the add back."""
    user_data = consent.amzn_user_data if consent is not None else None
    if user_data == _DENIED:
        return _REMOVE, False, ""
    if country in CONSENT_COUNTRIES and user_data not in CONSENT_ANSWERS:
        return _ADD, identifiers_only, CONSENT_MISSING
    return _ADD, identifiers_only, ""


class Router:
    def __init__(self, destinations: Iterable[Destination], *, strict_reference: bool) -> None:
        self._by_audience = {d.audience: d for d in destinations}
        self._everywhere = [(d, _ADD) for d in self._by_audience.values()]
        self._strict = strict_reference
        self.counts = RouteCounts()

    def take_counts(self) -> RouteCounts:
        """The counts so far; counting starts again from zero."""
        counts, self.counts = self.counts, RouteCounts()
        return counts

    def route(self, change: ProfileChange) -> list[Part]:
        identifiers_only = change.identifiers_only
        targets = self._everywhere if identifiers_only else self._targets(change)
        event_country = None
        if change.country:
            event_country = normalize_country(change.country)
            if event_country is None:
                raise Unusable("bad_country")
        member = external_user_id(change.profile_id)
        hashed: dict[str, HashedPII] = {}
        parts: list[Part] = []
        for dest, action in targets:
            country = event_country or dest.country_code
            pii = hashed.get(country)
            if pii is None:
                pii = hashed[country] = self._hash(change, country)
            if pii.empty:
                continue
            if event_country is None:
                self.counts.default_country[dest.audience] += 1
            sent, only, dead_letter = action, identifiers_only, ""
            if dest.consent_policy == STRICT and action is _ADD:
                sent, only, dead_letter = strict_consent(country, change.consent, identifiers_only)
            record = member_record(
                member,
                country,
                sent,
                pii.objects,
                change.consent,
                change.occurred_at,
                only,
                dead_letter,
            )
            parts.append(Part(dest, record))
        if not parts:
            raise Unusable("no_usable_identifier")
        return parts

    def _targets(self, change: ProfileChange) -> list[tuple[Destination, Action]]:
        """The destinations of the audiences the change names; unknown ones are counted (an
        event that names no other is unusable, and counted as such)."""
        targets: list[tuple[Destination, Action]] = []
        unknown = 0
        for keys, action in ((change.adds, _ADD), (change.removes, _REMOVE)):
            for key in keys:
                dest = self._by_audience.get(key)
                if dest is None:
                    unknown += 1
                else:
                    targets.append((dest, action))
        if not targets:
            raise Unusable("unknown_audience")
        if unknown:
            self.counts.filtered["unknown_audience"] += unknown
        return targets

    def _hash(self, change: ProfileChange, country: str) -> HashedPII:
        pii = build_hashed_pii(change.identifiers, country, strict_reference=self._strict)
        if pii.dropped:  # mostly empty: skip Counter.update's Python-level call
            self.counts.dropped.update(pii.dropped)
        return pii
