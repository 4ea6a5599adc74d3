"""The Segment Engage adapter: audience track and identify events -> ProfileChange."""

from __future__ import annotations

import importlib
import time
from datetime import UTC, datetime
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from syncd.events import DecodeError, decode
from tests.unit.test_events_canonical import assert_safe_error, json_values, leaves

TRAITS = {
    "email": "jane.doe@example.com",
    "phone": "+1 206 266 1000",
    "first_name": "Jane",
    "last_name": "Doe",
    "address": {
        "street": "123 Main Street",
        "city": "Seattle",
        "state": "WA",
        "postal_code": "98101",
        "country": "US",
    },
}


def track(name: str = "Audience Entered", **fields: Any) -> dict[str, Any]:
    return {
        "type": "track",
        "event": name,
        "userId": "u-1",
        "anonymousId": "anon-1",
        "messageId": "msg-1",
        "timestamp": "2026-11-22T10:00:00.000Z",
        "properties": {"audience_key": "vip", "vip": name == "Audience Entered"},
        "context": {
            "traits": TRAITS,
            "personas": {"computation_class": "audience", "computation_key": "vip"},
        },
        **fields,
    }


def identify(member: object = True, **fields: Any) -> dict[str, Any]:
    return {
        "type": "identify",
        "userId": "u-1",
        "traits": {**TRAITS, "vip": member},
        "context": {"personas": {"computation_class": "audience", "computation_key": "vip"}},
        **fields,
    }


def seg(doc: dict[str, Any]) -> Any:
    return decode(orjson.dumps(doc), "segment")


def reason_of(doc: Any) -> str:
    with pytest.raises(DecodeError) as info:
        decode(orjson.dumps(doc), "segment")
    return info.value.reason


EXPECTED_IDENTIFIERS = {
    "email": ["jane.doe@example.com"],
    "phone": ["+1 206 266 1000"],
    "firstname": ["Jane"],
    "lastname": ["Doe"],
    "address": ["123 Main Street"],
    "city": ["Seattle"],
    "state": ["WA"],
    "postal": ["98101"],
}


def test_audience_entered_is_an_add() -> None:
    change = seg(track())
    assert (change.adds, change.removes) == (("vip",), ())
    assert change.profile_id == "u-1"
    assert change.identifiers == EXPECTED_IDENTIFIERS
    assert change.country == "US"
    assert change.occurred_at == 1795341600.0
    assert change.event_id == "msg-1"
    assert change.consent is None


def test_audience_exited_is_a_remove() -> None:
    change = seg(track("Audience Exited"))
    assert (change.adds, change.removes) == ((), ("vip",))


def test_track_falls_back_to_the_computation_key() -> None:
    change = seg(track(properties={}))
    assert change.adds == ("vip",)


def test_identify_with_an_audience_computation() -> None:
    entered, exited = seg(identify(True)), seg(identify(False))
    assert (entered.adds, entered.removes) == (("vip",), ())
    assert (exited.adds, exited.removes) == ((), ("vip",))
    assert entered.identifiers == EXPECTED_IDENTIFIERS


def test_anonymous_id_when_there_is_no_user_id() -> None:
    assert seg(track(userId=None)).profile_id == "anon-1"
    assert seg(track(userId="")).profile_id == "anon-1"
    assert seg(track(userId=42)).profile_id == "42"
    assert reason_of(track(userId=None, anonymousId=None)) == "no_profile_id"
    assert reason_of(track(userId=["u"])) == "bad_profile_id"


def test_traits_and_context_traits_merge_and_camel_case_names_are_accepted() -> None:
    doc = identify(
        traits={"vip": True, "email": "a@example.com", "firstName": "Ann"},
        context={
            "traits": {
                "email": ["a@example.com", "b@example.com"],
                "lastName": "Lee",
                "address": {"postalCode": "SW1A 1AA", "country": "GB"},
            },
            "personas": {"computation_class": "audience", "computation_key": "vip"},
        },
    )
    change = seg(doc)
    assert change.identifiers == {
        "email": ["a@example.com", "b@example.com"],
        "firstname": ["Ann"],
        "lastname": ["Lee"],
        "postal": ["SW1A 1AA"],
    }
    assert change.country == "GB"


@pytest.mark.parametrize(
    ("text", "code"),
    [
        ("USA", "US"),
        ("United States", "US"),
        ("united states of america", "US"),
        ("U.S.A.", "US"),
        ("U.S.", "US"),
        ("u.k.", "GB"),
        ("DEU", "DE"),
        ("Germany", "DE"),
        ("The Netherlands", "NL"),
        ("Great Britain", "GB"),
        ("South Korea", "KR"),
        ("Korea, Republic of", "KR"),
        ("  côte d'ivoire ", "CI"),
        ("Russia", "RU"),
        ("Côte d’Ivoire", "CI"),
        ("St. Lucia", "LC"),
        ("St Kitts and Nevis", "KN"),
        ("Republic of Korea", "KR"),
    ],
)
def test_an_address_country_in_words_is_its_country(text: str, code: str) -> None:
    """Segment's spec types `address.country` as free text ("USA" in its examples). An ISO
    3166-1 alpha-3 code or the country's English name was no country: the destination's
    country_code applied, and with it that country's phone and postal rules to a member of
    another (a poorer match). Either is the country now, in any case and with dots or not; so are
    "U.S." and "U.K." (which with their dots were no country, though "U.S.A." was the US)."""
    address = {"city": "Seattle", "country": text}
    change = seg(identify(traits={"vip": True, "email": "a@example.com", "address": address}))
    assert (change.adds, change.country) == (("vip",), code)


@pytest.mark.parametrize("text", ["Deutschland", "Narnia", "Seattle", "U", ".", "N.A.", "n/a"])
def test_an_address_country_in_other_words_leaves_the_destinations_country(text: str) -> None:
    """Words that name no country (in English) are no country (the destination's country_code
    applies), never a reason to lose the membership change as bad_country. A two-letter code
    with dots is no code ("N.A." is "not applicable", not Namibia)."""
    address = {"city": "Seattle", "country": text}
    change = seg(identify(traits={"vip": True, "email": "a@example.com", "address": address}))
    assert (change.adds, change.country) == (("vip",), None)
    assert change.identifiers == {"email": ["a@example.com"], "city": ["Seattle"]}
    # a code in context.traits still counts when traits' country is words
    context = {"traits": {"address": {"country": "gb"}}, **identify()["context"]}
    change = seg(identify(traits={"vip": True, "address": address}, context=context))
    assert change.country == "GB"


def test_a_string_address_is_the_street() -> None:
    change = seg(identify(traits={"vip": True, "address": "10 Downing Street"}))
    assert change.identifiers == {"address": ["10 Downing Street"]}
    assert change.country is None


@pytest.mark.parametrize(
    "doc",
    [
        {"type": "page", "userId": "u-1", "name": "Home"},
        {"type": "screen", "userId": "u-1"},
        {"type": "group", "userId": "u-1", "groupId": "g"},
        {"type": "track", "userId": "u-1", "event": "Order Completed"},
        {"type": "track", "userId": "u-1", "event": ["Audience Entered"]},
        {"type": "track", "userId": "u-1", "event": "Order Completed", "traits": TRAITS},
        {"type": "identify", "userId": "u-1", "traits": {"plan": "pro", "email": " "}},
        {"type": "identify", "userId": "u-1"},
        identify(context={"personas": "audience"}),
        identify(context=[]),
        {"userId": "u-1"},
    ],
)
def test_other_events_are_not_audience_events(doc: dict[str, Any]) -> None:
    assert reason_of(doc) == "not_an_audience_event"


@pytest.mark.parametrize(
    "doc",
    [
        {**identify(), "context": {}},
        {**identify(), "context": {"personas": {"computation_class": "trait"}}},
        {"type": "identify", "anonymousId": "anon-1", "context": {"traits": TRAITS}},
    ],
)
def test_an_identify_without_an_audience_computation_is_an_identifiers_only_change(
    doc: dict[str, Any],
) -> None:
    traits = doc.get("traits") or doc["context"]["traits"]
    doc = {**doc, "traits": {k: v for k, v in traits.items() if k != "vip"}}
    change = seg({**doc, "timestamp": "2026-11-22T10:00:00Z", "messageId": "m"})
    assert change.identifiers_only
    assert not change.erase
    assert change.profile_id == doc.get("userId", "anon-1")
    assert change.identifiers == EXPECTED_IDENTIFIERS
    assert (change.country, change.occurred_at, change.event_id) == ("US", 1795341600.0, "m")


def test_a_segment_timestamp_more_than_five_minutes_ahead_is_bad() -> None:
    ahead = datetime.fromtimestamp(time.time() + 3600, UTC).isoformat()
    assert reason_of(track(timestamp=ahead)) == "bad_occurred_at"
    assert reason_of({**identify(), "context": {}, "timestamp": ahead}) == "bad_occurred_at"


def test_a_segment_erase_flag_is_not_an_erase() -> None:
    change = seg(track(erase=True))
    assert not change.erase
    assert change.adds == ("vip",)


def test_numeric_traits_read_as_their_digits() -> None:
    """A phone or a postal code typed as a number keeps the event (and its email)."""
    traits = {"email": "a@example.com", "phone": 12062661000, "address": {"postal_code": 98101}}
    change = seg(track(context={"traits": traits}))
    assert change.identifiers == {
        "email": ["a@example.com"],
        "phone": ["12062661000"],
        "postal": ["98101"],
    }


@pytest.mark.parametrize(
    ("doc", "reason"),
    [
        (track(properties={"audience_key": 7}), "bad_audiences"),
        (track(properties={"audience_key": " "}), "bad_audiences"),
        (track(properties="vip"), "bad_audiences"),
        (
            track(properties={}, context={"personas": {"computation_class": "audience"}}),
            "bad_audiences",
        ),
        (identify("yes"), "bad_audiences"),
        (identify(None), "bad_audiences"),
        (
            identify(context={"personas": {"computation_class": "audience"}}),
            "bad_audiences",
        ),
        (identify(traits=["vip"]), "bad_identifiers"),
        (track(context={"traits": {"email": False}}), "bad_identifiers"),
        (track(context={"traits": {"address": {"city": ["Paris", {}]}}}), "bad_identifiers"),
        (track(context={"traits": {"address": 12}}), "bad_identifiers"),
        (track(context={"traits": {"address": {"country": 840}}}), "bad_country"),
        (track(timestamp="noon"), "bad_occurred_at"),
        ([track()], "not_object"),
    ],
)
def test_segment_errors(doc: Any, reason: str) -> None:
    assert reason_of(doc) == reason


SEGMENT_FIELDS = [
    "type",
    "event",
    "userId",
    "anonymousId",
    "timestamp",
    "properties",
    "traits",
    "context",
]
# an audience track, an audience identify, and an identify that only updates identifiers
BASES = [track(), identify(), {**identify(), "context": {"traits": TRAITS}}]


def hostile_segment(field: str) -> st.SearchStrategy[dict[str, Any]]:
    values = st.dictionaries(
        st.sampled_from(["vip", "audience_key", "email", "address", "first_name", "personas"]),
        leaves | st.dictionaries(st.sampled_from(["street", "city", "country"]), leaves),
    )
    return st.tuples(st.sampled_from(BASES), values | json_values).map(
        lambda base_value: {**base_value[0], field: base_value[1]}
    )


@settings(max_examples=500)
@given(st.sampled_from(SEGMENT_FIELDS).flatmap(hostile_segment) | json_values)
def test_hostile_segment_events_only_raise_decode_error_and_never_echo_a_value(doc: Any) -> None:
    assert_safe_error(doc, "segment")


def test_every_country_name_is_keyed_as_a_text_is_looked_up() -> None:
    """A key of country-names.json that `_country_key` would not produce (a capital, a dot, an
    accent) could never be found; a value that is no ISO 3166-1 alpha-2 code would be
    refused downstream."""
    normalize = importlib.import_module("syncd.pii.normalize")
    assert len(normalize._COUNTRY_NAMES) > 600
    for key, code in normalize._COUNTRY_NAMES.items():
        assert normalize._country_key(key) == key
        assert normalize.normalize_country(code) == code
