"""The canonical decoder: every field rule, every DecodeError reason, hostile input."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from syncd.events import DecodeError, canonical, decode, segment
from syncd.model import Consent
from syncd.sandbox.validation import check_ip_address


def encode(**fields: Any) -> bytes:
    base: dict[str, Any] = {"profile_id": "p-1", "audiences": {"add": ["vip"]}}
    base.update(fields)
    return orjson.dumps({k: v for k, v in base.items() if v is not _DROP})


_DROP = object()


def reason_of(raw: bytes, input_format: str = "canonical", **kwargs: Any) -> str:
    with pytest.raises(DecodeError) as info:
        decode(raw, input_format, **kwargs)
    return info.value.reason


def test_the_contract_example_decodes_field_by_field() -> None:
    raw = orjson.dumps(
        {
            "event_id": "7f0c",
            "profile_id": "cdp-user-123",
            "occurred_at": "2026-11-22T10:00:00Z",
            "country": " US ",
            "identifiers": {
                "email": ["Jane.Doe@Example.com", "jd@work.example"],
                "phone": "+1 (206) 266-1000",
                "first_name": "Jane",
                "last_name": "Doe",
                "address": "123 Main Street, Apt. 4B",
                "city": "Seattle",
                "state": "Washington",
                "postal_code": "98101-1234",
            },
            "audiences": {"add": ["vip"], "remove": ["lapsed"]},
            "consent": {
                "amzn_user_data": "GRANTED",
                "amzn_ad_storage": "granted",
                "tcf": "CPX",
                "gpp": "DBA",
            },
        }
    )
    change = decode(raw, "canonical")
    assert change.profile_id == "cdp-user-123"
    assert change.event_id == "7f0c"
    assert change.occurred_at == 1795341600.0
    assert change.country == "US"
    assert change.adds == ("vip",)
    assert change.removes == ("lapsed",)
    assert change.consent == Consent("GRANTED", "GRANTED", "CPX", "DBA")
    assert change.identifiers == {
        "email": ["Jane.Doe@Example.com", "jd@work.example"],
        "phone": ["+1 (206) 266-1000"],
        "firstname": ["Jane"],
        "lastname": ["Doe"],
        "address": ["123 Main Street, Apt. 4B"],
        "city": ["Seattle"],
        "state": ["Washington"],
        "postal": ["98101-1234"],
    }


def test_minimal_event_has_defaults() -> None:
    change = decode(encode(), "canonical")
    assert change.identifiers == {}
    assert change.removes == ()
    assert (change.country, change.consent, change.occurred_at, change.event_id) == (None,) * 4


def test_api_names_are_aliases_and_merge_without_duplicates() -> None:
    change = decode(
        encode(
            identifiers={
                "firstname": "Jane",
                "first_name": ["Jane", "J"],
                "lastname": "Doe",
                "postal": "98101",
                "postal_code": "98102",
            }
        ),
        "canonical",
    )
    assert change.identifiers == {
        "firstname": ["Jane", "J"],
        "lastname": ["Doe"],
        "postal": ["98101", "98102"],
    }


def test_nulls_blanks_and_unknown_identifier_keys_are_skipped() -> None:
    change = decode(
        encode(
            identifiers={
                "email": [None, "", "  ", "a@example.com"],
                "phone": None,
                "city": "",
                "loyalty_id": {"anything": [1, 2]},  # unknown: ignored, whatever its type
            }
        ),
        "canonical",
    )
    assert change.identifiers == {"email": ["a@example.com"]}


@pytest.mark.parametrize(
    "identifiers",
    [
        {"email": 5.5},
        {"phone": ["+1 206", True]},
        {"postal_code": 98101.5},
        {"city": {"name": "Seattle"}},
        {"email": [["nested"]]},
        {"state": True},
        ["email", "a@example.com"],
        "a@example.com",
    ],
)
def test_identifier_values_of_other_types_are_bad_identifiers(identifiers: Any) -> None:
    with pytest.raises(DecodeError) as info:
        decode(encode(identifiers=identifiers), "canonical")
    assert info.value.reason == "bad_identifiers"
    if isinstance(identifiers, dict):
        [key] = identifiers
        assert f"identifiers.{key}" in str(info.value)  # names the field, not the value


def test_a_whole_number_is_the_text_of_its_digits() -> None:
    """A CDP may type a phone or a postal code as a number: its digits, not a lost event."""
    change = decode(
        encode(identifiers={"phone": [12062661000, "+1 206"], "postal_code": 98101.0}),
        "canonical",
    )
    assert change.identifiers == {"phone": ["12062661000", "+1 206"], "postal": ["98101"]}


def test_a_second_address_line_joins_the_address_with_a_space() -> None:
    for line2 in ("address2", "address_line2"):
        change = decode(
            encode(identifiers={"address": "123 Main Street", line2: "Apt. 4B"}), "canonical"
        )
        assert change.identifiers == {"address": ["123 Main Street Apt. 4B"]}
    alone = decode(encode(identifiers={"address2": "Apt. 4B"}), "canonical")
    assert alone.identifiers == {"address": ["Apt. 4B"]}


def test_a_list_of_addresses_is_several_addresses() -> None:
    change = decode(encode(identifiers={"address": ["1 A Street", "2 B Road"]}), "canonical")
    assert change.identifiers == {"address": ["1 A Street", "2 B Road"]}
    assert (
        reason_of(encode(identifiers={"address": ["1 A Street", "2 B Road"], "address2": "Apt"}))
        == "bad_identifiers"
    )


def test_identifier_values_are_capped_per_event() -> None:
    emails = [f"user{i}@example.com" for i in range(canonical.MAX_IDENTIFIER_VALUES + 50)]
    change = decode(encode(identifiers={"email": emails, "phone": "+12065550100"}), "canonical")
    assert change.identifiers == {"email": emails[: canonical.MAX_IDENTIFIER_VALUES]}


@pytest.mark.parametrize(
    ("profile_id", "expected"),
    [("abc", "abc"), (" spaced ", " spaced "), (12345, "12345"), (0, "0")],
)
def test_profile_id_strings_kept_verbatim_integers_stringified(
    profile_id: Any, expected: str
) -> None:
    assert decode(encode(profile_id=profile_id), "canonical").profile_id == expected


@pytest.mark.parametrize(
    ("profile_id", "reason"),
    [
        (_DROP, "no_profile_id"),
        (None, "no_profile_id"),
        ("", "no_profile_id"),
        ("   ", "no_profile_id"),
        (1.5, "bad_profile_id"),
        (True, "bad_profile_id"),
        (["p-1"], "bad_profile_id"),
        ({"id": "p-1"}, "bad_profile_id"),
    ],
)
def test_profile_id_errors(profile_id: Any, reason: str) -> None:
    assert reason_of(encode(profile_id=profile_id)) == reason


def test_audiences_deduplicate_and_strip() -> None:
    change = decode(encode(audiences={"add": ["vip", " vip", "gold"], "remove": None}), "canonical")
    assert change.adds == ("vip", "gold")
    assert change.removes == ()
    change = decode(encode(audiences={"remove": ["lapsed"]}), "canonical")
    assert (change.adds, change.removes) == ((), ("lapsed",))


@pytest.mark.parametrize("audiences", [_DROP, None, {}, {"add": [], "remove": None}])
def test_an_event_naming_no_audience_is_an_identifiers_only_change(audiences: Any) -> None:
    change = decode(
        encode(audiences=audiences, identifiers={"email": "a@example.com"}, country="DE"),
        "canonical",
    )
    assert (change.adds, change.removes, change.erase) == ((), (), False)
    assert change.identifiers_only
    assert change.identifiers == {"email": ["a@example.com"]}
    assert change.country == "DE"


@pytest.mark.parametrize(
    ("audiences", "reason"),
    [
        ({"add": "vip"}, "bad_audiences"),
        ({"add": ["vip", 3]}, "bad_audiences"),
        ({"add": [""]}, "bad_audiences"),
        ({"remove": [None]}, "bad_audiences"),
        ({"add": ["vip"], "remove": ["vip"]}, "bad_audiences"),
        (["vip"], "bad_audiences"),
    ],
)
def test_audience_errors(audiences: Any, reason: str) -> None:
    assert reason_of(encode(audiences=audiences)) == reason


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("2026-11-22T10:00:00Z", 1795341600.0),
        ("2026-11-22T11:00:00+01:00", 1795341600.0),
        ("2026-11-22T10:00:00.250Z", 1795341600.25),
        ("2026-11-22t10:00:00z", 1795341600.0),  # RFC 3339 allows lower case t and z
        ("2026-11-22T09:59:60Z", 1795341600.0),  # a leap second: the second after :59
        ("2026-11-22T09:59:60.5+00:00", 1795341600.5),
        (None, None),
    ],
)
def test_occurred_at_becomes_epoch_seconds(value: str | None, expected: float | None) -> None:
    assert decode(encode(occurred_at=value), "canonical").occurred_at == expected


@pytest.mark.parametrize(
    "value", ["2026-11-22T10:00:00", "2026-11-22", "yesterday", "", 1795341600, [], {}]
)
def test_bad_occurred_at(value: Any) -> None:
    assert reason_of(encode(occurred_at=value)) == "bad_occurred_at"


@pytest.mark.parametrize("value", ["0001-01-01T00:00:00+01:00", "0001-01-01T00:59:59.9+01:00"])
def test_an_occurred_at_before_year_one_utc_is_bad(value: str) -> None:
    """Legal ISO-8601 with a zone, but in UTC a moment before 0001-01-01: no date can show it,
    and `syncd members show` failed with a traceback (year 0 is out of range) on the member
    such an event recorded."""
    assert reason_of(encode(occurred_at=value)) == "bad_occurred_at"
    erase = orjson.dumps({"profile_id": "p", "erase": True, "occurred_at": value})
    assert reason_of(erase) == "bad_occurred_at"


def test_the_first_moment_of_year_one_utc_is_taken() -> None:
    at = decode(encode(occurred_at="0001-01-01T01:00:00+01:00"), "canonical").occurred_at
    assert at == -62135596800.0


def iso(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).isoformat()


# A minute either side of the 5-minute limit: the clock's progress during a test stays far below.
@settings(max_examples=50)
@given(ahead=st.one_of(st.floats(-1e9, 240), st.floats(360, 1e10)))
def test_an_occurred_at_more_than_five_minutes_ahead_is_bad(ahead: float) -> None:
    raw = encode(occurred_at=iso(time.time() + ahead))
    if ahead <= 240:
        assert decode(raw, "canonical").occurred_at is not None
    else:
        assert reason_of(raw) == "bad_occurred_at"


def test_country_is_passed_through_stripped() -> None:
    assert decode(encode(country=" gb "), "canonical").country == "gb"
    assert decode(encode(country="  "), "canonical").country is None
    assert decode(encode(country=None), "canonical").country is None
    assert reason_of(encode(country=840)) == "bad_country"


def test_consent_values_are_upper_cased_and_empty_consent_is_none() -> None:
    change = decode(encode(consent={"amzn_user_data": " denied ", "tcf": ""}), "canonical")
    assert change.consent == Consent(amzn_user_data="DENIED")
    assert decode(encode(consent={}), "canonical").consent is None
    assert decode(encode(consent={"gpp": None}), "canonical").consent is None


@pytest.mark.parametrize(
    ("ip", "kept"),
    [
        ("203.0.113.7", "203.0.113.7"),
        (" 2001:DB8:0:0::1 ", "2001:db8::1"),
        ("::ffff:192.0.2.1", "::ffff:c000:201"),
        ("  ", None),
        (None, None),
    ],
)
def test_the_consent_ip_address_is_kept_in_its_compressed_form(ip: Any, kept: str | None) -> None:
    change = decode(encode(consent={"amzn_user_data": "GRANTED", "ip_address": ip}), "canonical")
    assert change.consent == Consent(amzn_user_data="GRANTED", ip_address=kept)


@pytest.mark.parametrize(
    "consent",
    [
        {"ip_address": "203.0.113.300"},
        {"ip_address": "example.com"},
        {"ip_address": 3405803783},
        {"ip_address": ["203.0.113.7"]},
        {"ip_address": "fe80::1%eth0"},  # a scoped address: its zone means nothing off the host
        {"ip_address": "fe80::1%canary@example.com"},
        {"amzn_user_data": "YES"},
        {"amzn_ad_storage": True},
        {"tcf": 1},
        {"gpp": ["x"]},
        "GRANTED",
    ],
)
def test_bad_consent(consent: Any) -> None:
    assert reason_of(encode(consent=consent)) == "bad_consent"


@given(
    st.one_of(
        st.ip_addresses().map(str),
        st.tuples(st.ip_addresses(v=6), st.text(max_size=8)).map(lambda p: f"{p[0]}%{p[1]}"),
        st.text(max_size=40),
    )
)
def test_a_consent_ip_address_syncd_keeps_is_one_amazon_takes(ip: str) -> None:
    """Whatever `ip_address` decodes is sent as userConsent.geo.ipAddress: it must be what the
    API takes (the sandbox's check), else the member is refused after it cost budget."""
    event = encode(consent={"tcf": "t", "ip_address": ip})
    kept = _decoded_ip(event)
    if kept == "":
        assert reason_of(event) == "bad_consent"
    else:
        assert kept is None or check_ip_address(kept)


def _decoded_ip(event: bytes) -> str | None:
    """The consent IP decode keeps (None: none), or "" when decode refuses the event."""
    try:
        consent = decode(event, "canonical").consent
    except DecodeError:
        return ""
    assert consent is not None
    return consent.ip_address


@pytest.mark.parametrize(
    "extra",
    [
        {},
        {"occurred_at": None},
        {"identifiers": {"email": 5}, "country": 840, "consent": "x"},  # ignored, even bad
        {"audiences": None},
    ],
)
def test_an_erase_event_reads_only_its_profile_id_and_occurred_at(extra: dict[str, Any]) -> None:
    change = decode(orjson.dumps({"profile_id": "p 1", "erase": True, **extra}), "canonical")
    assert change.erase
    assert not change.identifiers_only
    assert (change.profile_id, change.occurred_at) == ("p 1", None)
    assert (change.identifiers, change.adds, change.removes) == ({}, (), ())
    assert (change.country, change.consent) == (None, None)


def test_an_erase_keeps_its_occurred_at_and_event_id() -> None:
    raw = orjson.dumps(
        {"profile_id": 7, "erase": True, "occurred_at": "2026-11-22T10:00:00Z", "event_id": "e"}
    )
    change = decode(raw, "canonical")
    assert (change.erase, change.profile_id) == (True, "7")
    assert (change.occurred_at, change.event_id) == (1795341600.0, "e")


@pytest.mark.parametrize("flag", [False, None])
def test_erase_false_or_null_is_an_ordinary_event(flag: Any) -> None:
    change = decode(encode(erase=flag), "canonical")
    assert not change.erase
    assert change.adds == ("vip",)


@pytest.mark.parametrize(
    ("doc", "reason"),
    [
        ({"profile_id": "p-1", "erase": "true"}, "bad_erase"),
        ({"profile_id": "p-1", "erase": 1}, "bad_erase"),
        ({"profile_id": "p-1", "erase": [True]}, "bad_erase"),
        ({"profile_id": "p-1", "erase": {}}, "bad_erase"),
        ({"profile_id": "p-1", "erase": True, "audiences": {"add": ["vip"]}}, "bad_erase"),
        ({"profile_id": "p-1", "erase": True, "audiences": {}}, "bad_erase"),
        ({"erase": True}, "no_profile_id"),
        ({"profile_id": 1.5, "erase": True}, "bad_profile_id"),
        ({"profile_id": "p-1", "erase": True, "occurred_at": "noon"}, "bad_occurred_at"),
        (
            {"profile_id": "p-1", "erase": True, "occurred_at": "9999-12-31T00:00:00Z"},
            "bad_occurred_at",
        ),
    ],
)
def test_erase_errors(doc: dict[str, Any], reason: str) -> None:
    assert reason_of(orjson.dumps(doc)) == reason


def test_event_id_is_for_tracing_only() -> None:
    assert decode(encode(event_id=42), "canonical").event_id == "42"
    assert decode(encode(event_id={"x": 1}), "canonical").event_id is None
    long_id = "e" * 500
    assert decode(encode(event_id=long_id), "canonical").event_id == long_id[:128]


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"{not json", "not_json"),
        (b"", "not_json"),
        (b'{"profile_id": "p"} trailing', "not_json"),
        (b"[" * 5000 + b"]" * 5000, "not_json"),  # deeper than orjson's limit
        (b'{"profile_id": "caf\xe9"}', "not_utf8"),
        (b"\xff\xfe{}", "not_utf8"),
        (b"[1, 2]", "not_object"),
        (b'"p-1"', "not_object"),
        (b"null", "not_object"),
    ],
)
def test_unparseable_input(raw: bytes, reason: str) -> None:
    assert reason_of(raw) == reason


def test_size_is_checked_before_parsing() -> None:
    raw = encode(identifiers={"email": "a@example.com"})
    assert decode(raw, "canonical", max_bytes=len(raw)).profile_id == "p-1"
    assert reason_of(raw, max_bytes=len(raw) - 1) == "too_large"
    assert reason_of(b"{" * 2_000_000) == "too_large"  # the default limit, never parsed


def test_unknown_input_format_is_a_programming_error() -> None:
    with pytest.raises(ValueError, match="input format"):
        decode(encode(), "avro")


def test_repr_of_a_change_hides_identifiers() -> None:
    change = decode(encode(identifiers={"email": "secret@example.com"}), "canonical")
    assert "secret" not in repr(change)


# --- hostile input: properties ------------------------------------------------------------------

# Text that may legitimately appear in an error message: the decoders' own source (read from the
# files: a module compiled by mypyc has no source for `inspect`).
VOCABULARY = "".join(
    (Path(segment.__file__).with_name(f"{name}.py")).read_text()
    for name in ("canonical", "segment")
)

FIELDS = [
    "profile_id",
    "event_id",
    "occurred_at",
    "country",
    "identifiers",
    "audiences",
    "consent",
    "erase",
]
IDENTIFIER_FIELDS = [*canonical.IDENTIFIER_KEYS, *canonical.SECOND_ADDRESS_LINE_KEYS]
CONSENT_FIELDS = ["amzn_user_data", "amzn_ad_storage", "tcf", "gpp", "ip_address"]
secrets = st.text(min_size=4, max_size=30).filter(lambda s: s not in VOCABULARY)
scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
)
named = st.sampled_from(["GRANTED", "vip", "2026-11-22T10:00:00Z", "", "203.0.113.7"])
leaves = st.one_of(secrets, secrets, secrets, scalars, named)  # weighted towards secrets
json_values = st.recursive(
    leaves,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=8), inner, max_size=6)
    ),
    max_leaves=30,
)


def objects(keys: list[str]) -> st.SearchStrategy[dict[str, Any]]:
    return st.dictionaries(st.sampled_from(keys), leaves | st.lists(leaves, max_size=4))


VALID = {
    "profile_id": "p-1",
    "event_id": "e-1",
    "occurred_at": "2026-11-22T10:00:00Z",
    "country": "US",
    "identifiers": {"email": "a@example.com"},
    "audiences": {"add": ["vip"]},
    "consent": {"amzn_user_data": "GRANTED"},
}
HOSTILE = {
    "identifiers": objects(IDENTIFIER_FIELDS) | json_values,
    "audiences": objects(["add", "remove"]) | json_values,
    "consent": objects(CONSENT_FIELDS) | json_values,
}


VALID_ERASE = {"profile_id": "p-1", "erase": True, "occurred_at": "2026-11-22T10:00:00Z"}


def with_hostile(field: str) -> st.SearchStrategy[dict[str, Any]]:
    """A valid event (or erase event, or identifiers-only event) whose `field` is hostile: every
    rule of the decoder gets reached."""
    identifiers_only = {k: v for k, v in VALID.items() if k != "audiences"}
    return st.tuples(
        st.sampled_from([VALID, VALID, VALID_ERASE, identifiers_only]),
        HOSTILE.get(field, json_values),
    ).map(lambda base_value: {**base_value[0], field: base_value[1]})


events = st.sampled_from(FIELDS).flatmap(with_hostile)


def strings_in(value: object) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list):
        return [s for item in value for s in strings_in(item)]
    if isinstance(value, dict):
        return [s for k, v in value.items() for s in (*strings_in(k), *strings_in(v))]
    return []


@settings(max_examples=300)
@given(st.binary(max_size=300))
def test_arbitrary_bytes_only_ever_raise_decode_error(raw: bytes) -> None:
    for input_format in ("canonical", "segment"):
        exc = decode_error(raw, input_format, max_bytes=200)
        assert exc is None or exc.reason in REASONS


def decode_error(raw: bytes, input_format: str, max_bytes: int = 1_000_000) -> DecodeError | None:
    """The DecodeError decoding raises, or None; any other exception propagates."""
    try:
        decode(raw, input_format, max_bytes=max_bytes)
    except DecodeError as exc:
        return exc
    return None


def assert_safe_error(doc: Any, input_format: str) -> None:
    """Decoding `doc` succeeds or raises a DecodeError with a known reason whose message
    holds no string of the input longer than 3 characters."""
    exc = decode_error(orjson.dumps(doc), input_format)
    if exc is None:
        return
    assert exc.reason in REASONS
    message = str(exc)
    values = [s for s in strings_in(doc) if len(s) > 3 and s not in VOCABULARY]
    assert not [s for s in values if s in message], message


@settings(max_examples=300)
@given(json_values)
def test_arbitrary_json_only_raises_decode_error(doc: Any) -> None:
    assert_safe_error(doc, "canonical")


@settings(max_examples=1000)
@given(events)
def test_hostile_fields_only_raise_decode_error_and_never_echo_a_value(doc: Any) -> None:
    assert_safe_error(doc, "canonical")


REASONS = {
    "too_large",
    "not_utf8",
    "not_json",
    "not_object",
    "no_profile_id",
    "bad_profile_id",
    "bad_identifiers",
    "bad_audiences",
    "bad_country",
    "bad_consent",
    "bad_occurred_at",
    "bad_erase",
    "not_an_audience_event",
}
