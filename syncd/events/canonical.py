"""The canonical input event (its fields are listed below) -> ProfileChange.

Also the pieces every input format shares: `DecodeError`, the hostile-input guards of `load`,
and the identifier/consent/timestamp readers the Segment adapter reuses.

Field rules (anything not listed here is ignored):

- `profile_id` (required): a non-blank string, kept verbatim; an integer is accepted and
  stringified (CDPs often use numeric ids). Missing, null or blank -> `no_profile_id`; any
  other type -> `bad_profile_id`.
- `identifiers`: an object. Keys `email phone address city state` and `first_name last_name
  postal_code` (the API names `firstname lastname postal` are accepted as aliases) map to the
  API's hashedPII keys. A value is a string or a list of strings; a whole number is the text of
  its digits (a phone or a postal code a CDP typed as a number); nulls and blank strings are
  skipped; any other type -> `bad_identifiers`. Unknown keys are ignored (a CDP may send more
  than Amazon takes). `address2` / `address_line2` is a second address line, joined to a single
  `address` with a space (docs/normalization.md); with several addresses -> `bad_identifiers`.
  At most `MAX_IDENTIFIER_VALUES` values per event are kept (in key order); the hashedPII
  builder applies Amazon's own caps later.
- `audiences`: `{"add": [...], "remove": [...]}`, lists of non-blank strings (missing = empty,
  duplicates collapse); a key in both lists -> `bad_audiences`. Missing, null or both lists
  empty: an identifiers-only change, which updates the profile wherever it is a member.
- `erase`: `true` makes the event an erase: only `profile_id` and `occurred_at` are read (the
  rest is ignored, so no stray field can hold an erasure back), except `audiences`, which
  contradicts it -> `bad_erase`. `false` or null is an ordinary event; any other value ->
  `bad_erase`.
- `country`: a string, passed through stripped (the PII engine validates codes); null or blank
  means "the destination's country".
- `consent`: `amzn_user_data` / `amzn_ad_storage` are one of GRANTED DENIED NOT_APPLICABLE
  UNKNOWN (any case), `tcf` / `gpp` are strings, `ip_address` an IPv4 or IPv6 address (kept in
  its compressed form); anything else -> `bad_consent`.
- `occurred_at`: ISO-8601 with `Z` or an offset -> epoch seconds; missing or null -> None (the
  Kafka message's timestamp stands in: one more than `MAX_FUTURE_S` ahead, a producer's clock
  gone wrong, is `bad_occurred_at` too; none (message format v0) counts as older than any
  change). A
  timestamp without a zone is ambiguous, and one more than `MAX_FUTURE_S` ahead of this host's
  clock would outrank every later change of the member: both are rejected like any other bad
  value (`bad_occurred_at`), as is one before 0001-01-01T00:00:00Z (legal with an offset east
  of UTC, but no date).
- `event_id`: a string or integer, for tracing only; other types are ignored.

Privacy: a DecodeError's reason is a bounded code; its message may name a field and a JSON type,
never a value from the event.
"""

from __future__ import annotations

import ipaddress
import time
from collections.abc import Iterable, Mapping
from datetime import datetime
from typing import Any, Final

import orjson

from syncd.model import Consent, ProfileChange
from syncd.vocabulary import CONSENT_VALUES, PiiKey

DEFAULT_MAX_BYTES = 1_000_000
MAX_IDENTIFIER_VALUES = 1000
MAX_EVENT_ID_CHARS = 128
MAX_FUTURE_S = 300.0  # how far ahead of the clock an occurred_at may be (contract: 5 minutes)
YEAR_ONE = -62135596800.0  # 0001-01-01T00:00:00Z, the earliest occurred_at a date can show

IDENTIFIER_KEYS: dict[str, str] = {
    "email": PiiKey.EMAIL.value,
    "phone": PiiKey.PHONE.value,
    "first_name": PiiKey.FIRSTNAME.value,
    "firstname": PiiKey.FIRSTNAME.value,
    "last_name": PiiKey.LASTNAME.value,
    "lastname": PiiKey.LASTNAME.value,
    "address": PiiKey.ADDRESS.value,
    "city": PiiKey.CITY.value,
    "state": PiiKey.STATE.value,
    "postal_code": PiiKey.POSTAL.value,
    "postal": PiiKey.POSTAL.value,
}
SECOND_ADDRESS_LINE_KEYS = ("address2", "address_line2")
_ADDRESS: Final = PiiKey.ADDRESS.value


class DecodeError(Exception):
    """An event that cannot be used. `reason` is a short code: a metric label and the
    dead-letter header. The message adds at most a field name and a JSON type, never data."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


def json_type(value: object) -> str:
    """The JSON name of a decoded value's type (safe to put in an error message)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"


def load(raw: bytes, max_bytes: int) -> dict[str, Any]:
    """Parse one message value into a JSON object, guarding against hostile input: the size is
    checked before parsing; orjson rejects invalid UTF-8 and nesting deeper than 1024."""
    if len(raw) > max_bytes:
        raise DecodeError("too_large", f"{len(raw)} bytes > {max_bytes}")
    try:
        doc = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError as utf8:
            raise DecodeError("not_utf8", f"invalid byte at {utf8.start}") from None
        raise DecodeError("not_json", f"line {exc.lineno} column {exc.colno}") from None
    if not isinstance(doc, dict):
        raise DecodeError("not_object", f"top level is {json_type(doc)}")
    return doc


def profile_id(value: object, field: str) -> str:
    if value is None or (isinstance(value, str) and not value.strip()):
        raise DecodeError("no_profile_id", f"{field} missing or blank")
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, str):
        raise DecodeError("bad_profile_id", f"{field} is {json_type(value)}")
    return value


def event_id(value: object) -> str | None:
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if isinstance(value, str) and value:
        return value[:MAX_EVENT_ID_CHARS]
    return None


def occurred_at(value: object, field: str = "occurred_at") -> float | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise DecodeError("bad_occurred_at", f"{field} is {json_type(value)}")
    text = value.strip()
    if text[-1:] == "z":  # RFC 3339 allows a lower-case z (and t, which Python reads)
        text = text[:-1] + "Z"
    leap = text[16:19] == ":60" and text[10:11] in ("T", "t", " ")  # hh:mm:60, a leap second
    if leap:
        text = text[:17] + "59" + text[19:]
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise DecodeError("bad_occurred_at", f"{field} is not ISO-8601") from None
    if moment.tzinfo is None:
        raise DecodeError("bad_occurred_at", f"{field} has no time zone")
    at = moment.timestamp() + leap  # the leap second: the second after :59
    if at > time.time() + MAX_FUTURE_S:
        raise DecodeError("bad_occurred_at", f"{field} is more than 5 minutes in the future")
    if at < YEAR_ONE:  # no date shows it (`syncd members show` failed on such a member)
        raise DecodeError("bad_occurred_at", f"{field} is before the year 1 in UTC")
    return at


def country(value: object, field: str = "country") -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise DecodeError("bad_country", f"{field} is {json_type(value)}")
    return value.strip() or None


def string_values(value: object, field: str) -> list[str]:
    """A string or a list of strings -> the non-blank strings (nulls skipped). A whole number
    (a phone or a postal code a CDP typed as one) is the text of its digits."""
    if type(value) is str:  # the common case
        return [value] if value.strip() else []
    items: Iterable[object] = value if isinstance(value, list) else (value,)
    out: list[str] = []
    for item in items:
        if item is None:
            continue
        if not isinstance(item, str):
            item = _digits(item, field)
        if item.strip():
            out.append(item)
    return out


def _digits(value: object, field: str) -> str:
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    raise DecodeError("bad_identifiers", f"{field} holds a value of type {json_type(value)}")


class IdentifierSet:
    """Collects identifier values per hashedPII key, in order, without duplicates, capped at
    MAX_IDENTIFIER_VALUES per event."""

    def __init__(self) -> None:
        self.values: dict[str, list[str]] = {}
        self._count = 0

    def add(self, key: str, values: Iterable[str]) -> None:
        for value in values:
            if self._count >= MAX_IDENTIFIER_VALUES:
                return
            bucket = self.values.setdefault(key, [])
            if value not in bucket:
                bucket.append(value)
                self._count += 1


def _amzn_consents() -> dict[tuple[str | None, str | None], Consent | None]:
    """Every Consent with only the two Amazon signals set (or None), by (user data, storage)."""
    signals = [None, *sorted(CONSENT_VALUES)]
    return {
        (user_data, ad_storage): Consent(user_data, ad_storage) if user_data or ad_storage else None
        for user_data in signals
        for ad_storage in signals
    }


_AMZN_CONSENTS = _amzn_consents()  # frozen values: one shared instance each


def _consent_signal(value: Mapping[str, object], key: str) -> str | None:
    signal = value.get(key)
    if signal is None:
        return None
    if type(signal) is str and signal in CONSENT_VALUES:  # the common case
        return signal
    if not isinstance(signal, str):
        raise DecodeError("bad_consent", f"consent.{key} is {json_type(signal)}")
    upper = signal.strip().upper()
    if upper not in CONSENT_VALUES:
        raise DecodeError("bad_consent", f"consent.{key} is not one of the consent values")
    return upper


def _consent_text(value: Mapping[str, object], key: str) -> str | None:
    text = value.get(key)
    if text is None:
        return None
    if not isinstance(text, str):
        raise DecodeError("bad_consent", f"consent.{key} is {json_type(text)}")
    return text.strip() or None


def _ip_address(value: Mapping[str, object]) -> str | None:
    text = _consent_text(value, "ip_address")
    if text is None:
        return None
    try:
        if "%" in text:  # a scoped IPv6 address: its zone means nothing off the host
            raise ValueError(text)
        return str(ipaddress.ip_address(text))
    except ValueError:
        raise DecodeError("bad_consent", "consent.ip_address is not an IP address") from None


def consent(value: object) -> Consent | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise DecodeError("bad_consent", f"consent is {json_type(value)}")
    user_data = _consent_signal(value, "amzn_user_data")
    ad_storage = _consent_signal(value, "amzn_ad_storage")
    tcf = _consent_text(value, "tcf")
    gpp = _consent_text(value, "gpp")
    ip_address = _ip_address(value)
    if tcf is None and gpp is None and ip_address is None:
        return _AMZN_CONSENTS[user_data, ad_storage]
    return Consent(user_data, ad_storage, tcf, gpp, ip_address)


def _identifiers(value: object) -> dict[str, list[str]]:
    """What `IdentifierSet` collects from the `identifiers` object, unrolled for speed: most
    values are single strings, and this runs for every event."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise DecodeError("bad_identifiers", f"identifiers is {json_type(value)}")
    found: dict[str, list[str]] = {}
    count = 0
    for name, raw in value.items():
        key = IDENTIFIER_KEYS.get(name)
        if key is None:
            continue
        if key == _ADDRESS:
            values = _address(value)
        elif type(raw) is str:  # the common case
            if not raw.strip() or count >= MAX_IDENTIFIER_VALUES:
                continue
            bucket = found.get(key)
            if bucket is None:
                found[key] = [raw]
                count += 1
            elif raw not in bucket:
                bucket.append(raw)
                count += 1
            continue
        else:
            values = string_values(raw, f"identifiers.{name}")
        count = _collect(found, key, values, count)
    if "address" not in value and any(k in value for k in SECOND_ADDRESS_LINE_KEYS):
        _collect(found, _ADDRESS, _address(value), count)
    return found


def _collect(found: dict[str, list[str]], key: str, values: Iterable[str], count: int) -> int:
    """`IdentifierSet.add` on `found`, which holds `count` values: returns the new count."""
    for value in values:
        if count >= MAX_IDENTIFIER_VALUES:
            break
        bucket = found.setdefault(key, [])
        if value not in bucket:
            bucket.append(value)
            count += 1
    return count


def _address(identifiers: Mapping[str, object]) -> list[str]:
    """The address values; a second line (address2 / address_line2) joins a single address."""
    addresses = string_values(identifiers.get("address"), "identifiers.address")
    if "address2" not in identifiers and "address_line2" not in identifiers:
        return addresses  # the common case: no second line
    second = [
        line
        for key in SECOND_ADDRESS_LINE_KEYS
        for line in string_values(identifiers.get(key), f"identifiers.{key}")
    ]
    if not second:
        return addresses
    if len(addresses) > 1:
        raise DecodeError("bad_identifiers", "a second address line with several addresses")
    return [" ".join([*addresses, *second])]


def audience_keys(value: object, field: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list):
        raise DecodeError("bad_audiences", f"{field} is {json_type(value)}")
    if len(value) == 1 and type(value[0]) is str and (key := value[0].strip()):
        return (key,)  # the common case
    keys: dict[str, None] = {}
    for item in value:
        if not isinstance(item, str) or not item.strip():
            raise DecodeError("bad_audiences", f"{field} holds a blank or non-string item")
        keys[item.strip()] = None
    return tuple(keys)


def _audiences(value: object) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(adds, removes); both empty: an identifiers-only change."""
    if value is None:
        return (), ()
    if not isinstance(value, dict):
        raise DecodeError("bad_audiences", f"audiences is {json_type(value)}")
    adds = audience_keys(value.get("add"), "audiences.add")
    removes = audience_keys(value.get("remove"), "audiences.remove")
    if adds and removes and not set(adds).isdisjoint(removes):
        raise DecodeError("bad_audiences", "an audience is both added and removed")
    return adds, removes


def _is_erase(doc: Mapping[str, object]) -> bool:
    flag = doc.get("erase")
    if flag is None or flag is False:
        return False
    if flag is not True:
        raise DecodeError("bad_erase", f"erase is {json_type(flag)}, not true")
    if doc.get("audiences") is not None:
        raise DecodeError("bad_erase", "an erase event names audiences")
    return True


def decode_canonical(raw: bytes, max_bytes: int = DEFAULT_MAX_BYTES) -> ProfileChange:
    doc = load(raw, max_bytes)
    pid = profile_id(doc.get("profile_id"), "profile_id")
    if _is_erase(doc):
        return ProfileChange(
            profile_id=pid,
            identifiers={},
            occurred_at=occurred_at(doc.get("occurred_at")),
            event_id=event_id(doc.get("event_id")),
            erase=True,
        )
    adds, removes = _audiences(doc.get("audiences"))
    return ProfileChange(
        profile_id=pid,
        identifiers=_identifiers(doc.get("identifiers")),
        adds=adds,
        removes=removes,
        country=country(doc.get("country")),
        consent=consent(doc.get("consent")),
        occurred_at=occurred_at(doc.get("occurred_at")),
        event_id=event_id(doc.get("event_id")),
    )
