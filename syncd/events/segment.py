"""Segment Engage audience events -> ProfileChange (`input_format = "segment"`).

Two shapes carry an audience membership change:

- `track` events named `Audience Entered` (add) / `Audience Exited` (remove); the audience key
  is `properties.audience_key` (else `context.personas.computation_key`).
- `identify` events with `context.personas.computation_class == "audience"`: the audience key
  is `context.personas.computation_key` and `traits[<key>]` is true (add) or false (remove).

An `identify` event without an audience computation that carries identifiers is an
identifiers-only change (Segment's way of updating a profile's traits): it updates the profile
wherever it is a member. Every other event (page, screen, other track names, identify without an
audience computation or identifiers) is `not_an_audience_event`. Segment events have no erase.

The profile id is `userId`, else `anonymousId`. Identifiers come from `traits` and
`context.traits` (both, merged): `email`, `phone`, `first_name`/`firstName`,
`last_name`/`lastName`, `address.street`, `address.city`, `address.state`,
`address.postal_code`/`address.postalCode` (an `address` given as a string is the street);
`address.country` is the event's country when it is an ISO 3166-1 code (alpha-2, `UK` for `GB`,
or alpha-3) or a country's English name: Segment's spec types it as free text ("USA", "United
States"); any other text is no country (the destination's `country_code` applies, counted by
syncd_records_default_country_total), never a reason to lose the event. `timestamp` is
`occurred_at` and `messageId` the event id. Segment's consent object has no Amazon equivalent, so
no consent is set.
"""

from __future__ import annotations

from typing import Any

from syncd.events.canonical import (
    DEFAULT_MAX_BYTES,
    DecodeError,
    IdentifierSet,
    country,
    event_id,
    json_type,
    load,
    occurred_at,
    profile_id,
    string_values,
)
from syncd.model import ProfileChange
from syncd.pii.normalize import country_in_words
from syncd.vocabulary import PiiKey

TRACK_ACTIONS = {"Audience Entered": "add", "Audience Exited": "remove"}

_TRAIT_KEYS = {
    "email": PiiKey.EMAIL.value,
    "phone": PiiKey.PHONE.value,
    "first_name": PiiKey.FIRSTNAME.value,
    "firstName": PiiKey.FIRSTNAME.value,
    "last_name": PiiKey.LASTNAME.value,
    "lastName": PiiKey.LASTNAME.value,
}
_ADDRESS_KEYS = {
    "street": PiiKey.ADDRESS.value,
    "city": PiiKey.CITY.value,
    "state": PiiKey.STATE.value,
    "postal_code": PiiKey.POSTAL.value,
    "postalCode": PiiKey.POSTAL.value,
}


def _object(value: object, field: str, reason: str) -> dict[str, Any]:
    """An optional nested object: missing/null is empty, any other non-object is an error."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise DecodeError(reason, f"{field} is {json_type(value)}")
    return value


def _audience(doc: dict[str, Any]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(adds, removes) of an audience event: one audience key in one of them. Both empty for an
    identify event without an audience computation."""
    kind = doc.get("type")
    context = _object(doc.get("context"), "context", "not_an_audience_event")
    personas = _object(context.get("personas"), "context.personas", "not_an_audience_event")
    name = doc.get("event")
    if kind == "track" and isinstance(name, str) and name in TRACK_ACTIONS:
        properties = _object(doc.get("properties"), "properties", "bad_audiences")
        key = _key(
            properties.get("audience_key", personas.get("computation_key")),
            "properties.audience_key",
        )
        return ((key,), ()) if TRACK_ACTIONS[name] == "add" else ((), (key,))
    if kind == "identify" and personas.get("computation_class") == "audience":
        key = _key(personas.get("computation_key"), "context.personas.computation_key")
        member = _object(doc.get("traits"), "traits", "bad_identifiers").get(key)
        if not isinstance(member, bool):
            raise DecodeError("bad_audiences", f"traits[computation_key] is {json_type(member)}")
        return ((key,), ()) if member else ((), (key,))
    if kind == "identify":
        return (), ()
    raise DecodeError("not_an_audience_event", "neither an audience track nor identify event")


def _key(value: object, field: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise DecodeError("bad_audiences", f"{field} is a blank or non-string value")
    return value.strip()


def _identifiers(doc: dict[str, Any]) -> tuple[dict[str, list[str]], str | None]:
    """Identifiers from `traits` then `context.traits`, and the first `address.country`."""
    context = _object(doc.get("context"), "context", "not_an_audience_event")
    found = IdentifierSet()
    event_country: str | None = None
    for where, traits in (
        ("traits", _object(doc.get("traits"), "traits", "bad_identifiers")),
        ("context.traits", _object(context.get("traits"), "context.traits", "bad_identifiers")),
    ):
        for name, key in _TRAIT_KEYS.items():
            found.add(key, string_values(traits.get(name), f"{where}.{name}"))
        address = traits.get("address")
        if isinstance(address, str | list):
            found.add(PiiKey.ADDRESS.value, string_values(address, f"{where}.address"))
            continue
        address = _object(address, f"{where}.address", "bad_identifiers")
        for name, key in _ADDRESS_KEYS.items():
            found.add(key, string_values(address.get(name), f"{where}.address.{name}"))
        event_country = event_country or _address_country(address.get("country"))
    return found.values, event_country


def _address_country(value: object) -> str | None:
    """`address.country`: a country code or a country's English name ("USA", "Germany");
    other text is no country."""
    text = country(value, "address.country")
    return None if text is None else country_in_words(text)


def decode_segment(raw: bytes, max_bytes: int = DEFAULT_MAX_BYTES) -> ProfileChange:
    doc = load(raw, max_bytes)
    adds, removes = _audience(doc)
    user_id = doc.get("userId")
    if user_id is None or (isinstance(user_id, str) and not user_id.strip()):
        user_id = doc.get("anonymousId")
    pid = profile_id(user_id, "userId/anonymousId")
    identifiers, event_country = _identifiers(doc)
    if not adds and not removes and not identifiers:
        raise DecodeError("not_an_audience_event", "an identify event without identifiers")
    return ProfileChange(
        profile_id=pid,
        identifiers=identifiers,
        adds=adds,
        removes=removes,
        country=event_country,
        occurred_at=occurred_at(doc.get("timestamp"), "timestamp"),
        event_id=event_id(doc.get("messageId")),
    )
