"""Routing's output is always a valid API record: a profile id becomes the externalUserId only
when all of it fits Amazon's pattern (else its SHA-256 hex), and the record encoder escapes
every string, whatever the id, country, digest or consent text holds."""

from __future__ import annotations

import hashlib
import re
from typing import Any

import orjson
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from syncd.members import without_consent_ip
from syncd.model import (
    Action,
    Consent,
    Destination,
    ProfileChange,
    encode_record,
    member_record,
    record_digest,
)
from syncd.routing import Router, Unusable, external_user_id
from syncd.sandbox.validation import CONSENT_COUNTRIES as SANDBOX_CONSENT_COUNTRIES
from syncd.sandbox.validation import check_record
from syncd.vocabulary import CONSENT_VALUES

# Amazon's externalUserId pattern, written out here as the oracle (not imported from syncd).
API_ID = re.compile(r"[0-9a-zA-Z_-]{1,128}")

# Any code point, lone surrogates and control characters included.
ANY_TEXT = st.text(st.characters(codec=None, exclude_categories=()))
# What a decoded event can hold: JSON strings never carry a lone surrogate.
EVENT_TEXT = st.text(st.characters(exclude_categories=("Cs",)))


def sha(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


@pytest.mark.parametrize(
    ("profile_id", "kept"),
    [
        ("cdp-user-1", True),
        ("cdp-user-1\n", False),  # `match` with `$` accepted this
        ("cdp-user-1\r\n", False),
        ("\ncdp-user-1", False),
        ('cdp"1', False),
        ("cdp\\1", False),
        ("cdp\x00\x01\x1f\x7f1", False),
        ("cdp user", False),
        ("é", False),
        ("a" * 128, True),
        ("a" * 129, False),
        ("", False),
    ],
)
def test_only_a_whole_id_of_the_api_pattern_is_kept(profile_id: str, kept: bool) -> None:
    assert external_user_id(profile_id) == (profile_id if kept else sha(profile_id))


@given(profile_id=st.one_of(ANY_TEXT, st.from_regex(API_ID, fullmatch=True)))
@example(profile_id="\ud800")
def test_external_user_id_is_the_id_exactly_when_it_fits_the_pattern(profile_id: str) -> None:
    got = external_user_id(profile_id)
    if API_ID.fullmatch(profile_id):
        assert got == profile_id
    else:
        assert got == sha(profile_id)
        assert re.fullmatch(r"[0-9a-f]{64}", got)


_SIGNAL = st.one_of(st.none(), st.sampled_from(sorted(CONSENT_VALUES)), ANY_TEXT)


@settings(max_examples=300)
@given(
    member=ANY_TEXT,
    country=ANY_TEXT,
    action=st.sampled_from(Action),
    hashed_pii=st.lists(st.dictionaries(ANY_TEXT, ANY_TEXT, max_size=4), max_size=3),
    consent=st.one_of(
        st.none(),
        st.builds(
            Consent,
            _SIGNAL,
            _SIGNAL,
            st.one_of(st.none(), ANY_TEXT),
            st.one_of(st.none(), ANY_TEXT),
            st.one_of(st.none(), ANY_TEXT),
        ),
    ),
)
@example(
    member='x","countryCode":"US',
    country="D\nE",
    action=Action.ADD,
    hashed_pii=[{'em"ail': "\\", "\U0001f600": "\u2028"}],
    consent=Consent(tcf="\x00\x1f"),
)
@example(  # a pair named twice, a geo of its IP alone
    member="m",
    country="FR",
    action=Action.ADD,
    hashed_pii=[{"email": "a"}, {"email": "a", "phone": "b"}],
    consent=Consent(ip_address="2001:db8::1"),
)
def test_an_encoded_record_is_the_json_of_its_fields(
    member: str,
    country: str,
    action: Action,
    hashed_pii: list[dict[str, str]],
    consent: Consent | None,
) -> None:
    """The encoded record parses and equals the plain dict; text no JSON document can hold (a
    lone surrogate) raises instead of producing bytes. A record's digest, made of the parts it
    is encoded from, is `record_digest` of its bytes (a stored or reconciled record's)."""
    plain: dict[str, Any] = {
        "externalUserId": member,
        "countryCode": country,
        "action": action.value,
        "hashedPII": hashed_pii,
    }
    user_consent = consent.to_api(country) if consent is not None else None
    if user_consent is not None:
        plain["userConsent"] = user_consent
    try:
        expected = orjson.loads(orjson.dumps(plain))
    except orjson.JSONEncodeError:  # a lone surrogate somewhere
        with pytest.raises(orjson.JSONEncodeError):
            encode_record(member, country, action, hashed_pii, consent)
        return
    for _ in range(2):  # the second time with the consent's cached object
        assert orjson.loads(encode_record(member, country, action, hashed_pii, consent)) == expected
        record = member_record(member, country, action, hashed_pii, consent)
        assert record.digest == record_digest(record.json)


ROUTER_DESTINATIONS = (Destination("vip", "conn-1", 413642381039213536, "US"),)


@settings(max_examples=200)
@given(profile_id=EVENT_TEXT.filter(bool), tcf=st.one_of(st.none(), EVENT_TEXT))
@example(profile_id="cdp-user-1\n", tcf=None)
@example(profile_id='cdp"1\\', tcf='"\\\n')
def test_a_routed_record_is_valid_json_for_any_profile_id(profile_id: str, tcf: str | None) -> None:
    change = ProfileChange(
        profile_id,
        {"email": ["jane@example.com"]},
        adds=("vip",),
        consent=Consent(amzn_user_data="GRANTED", tcf=tcf),
    )
    [part] = Router(ROUTER_DESTINATIONS, strict_reference=False).route(change)
    record = orjson.loads(part.record.json)
    want_id = profile_id if API_ID.fullmatch(profile_id) else sha(profile_id)
    assert part.record.external_user_id == record["externalUserId"] == want_id
    assert record["countryCode"] == "US"
    assert record["hashedPII"] == [{"email": sha("jane@example.com")}]
    assert record["userConsent"]["consent"].get("tcf") == (tcf or None)


DESTINATIONS = (
    Destination("vip", "conn-1", 413642381039213536, "US"),
    Destination("lapsed", "conn-1", 347891, "GB"),
    Destination("gold", "conn-2", 5, "US"),
)


def routed(change: ProfileChange) -> list[tuple[str, Action, bool, bytes]]:
    parts = Router(DESTINATIONS, strict_reference=False).route(change)
    return [
        (p.destination.audience, p.record.action, p.record.identifiers_only, p.record.json)
        for p in parts
    ]


@pytest.mark.parametrize("country", [None, "DE"])
def test_an_identifiers_only_change_is_an_add_to_every_destination_hashed_as_an_add(
    country: str | None,
) -> None:
    fields: dict[str, Any] = {
        "identifiers": {"email": ["Jane@Example.com"], "postal": ["SW1A 1AA"]},
        "country": country,
        "consent": Consent(amzn_user_data="GRANTED", ip_address="203.0.113.7"),
        "occurred_at": 1795341600.0,
    }
    only = routed(ProfileChange("cdp-1", **fields))
    assert [(a, action, flag) for a, action, flag, _ in only] == [
        (d.audience, Action.ADD, True) for d in DESTINATIONS
    ]
    adds = [routed(ProfileChange("cdp-1", adds=(d.audience,), **fields)) for d in DESTINATIONS]
    assert [json for *_, json in only] == [json for [(*_, json)] in adds]
    countries = [orjson.loads(json)["countryCode"] for *_, json in only]
    assert countries == ([country] * 3 if country else ["US", "GB", "US"])
    parts = Router(DESTINATIONS, strict_reference=False).route(ProfileChange("cdp-1", **fields))
    assert {p.record.occurred_at for p in parts} == {1795341600.0}


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        (ProfileChange("cdp-1", {"email": ["not-an-email"]}), "no_usable_identifier"),
        (ProfileChange("cdp-1", {}), "no_usable_identifier"),
        (ProfileChange("cdp-1", {"email": ["a@example.com"]}, country="XX"), "bad_country"),
    ],
)
def test_an_identifiers_only_change_without_a_usable_identifier_is_unusable(
    change: ProfileChange, reason: str
) -> None:
    with pytest.raises(Unusable) as info:
        Router(DESTINATIONS, strict_reference=False).route(change)
    assert info.value.reason == reason


def test_an_audience_change_is_not_marked_identifiers_only() -> None:
    change = ProfileChange("cdp-1", {"email": ["a@example.com"]}, adds=("vip",), removes=("x",))
    assert [(a, action, flag) for a, action, flag, _ in routed(change)] == [
        ("vip", Action.ADD, False)
    ]


@pytest.mark.parametrize("country", [None, "DE"])
def test_a_consent_ip_address_goes_out_as_geo_with_the_records_country(
    country: str | None,
) -> None:
    def records(ip: str | None) -> list[dict[str, Any]]:
        change = ProfileChange(
            "cdp-1",
            {"email": ["a@example.com"]},
            adds=("vip", "lapsed"),
            country=country,
            consent=Consent(amzn_user_data="GRANTED", ip_address=ip),
        )
        return [orjson.loads(json) for *_, json in routed(change)]

    with_ip, without = records("203.0.113.7"), records(None)
    for record, plain in zip(with_ip, without, strict=True):
        assert record["userConsent"] == {
            "consent": {"amzn": {"amznUserData": "GRANTED"}},
            "geo": {"countryCode": record["countryCode"], "ipAddress": "203.0.113.7"},
        }
        assert plain["userConsent"] == {"consent": {"amzn": {"amznUserData": "GRANTED"}}}
    assert [r["countryCode"] for r in with_ip] == ([country] * 2 if country else ["US", "GB"])
    # the IP is never part of the digest: another IP is the same change
    other = records("198.51.100.1")
    assert [record_digest(orjson.dumps(r)) for r in with_ip] == [
        record_digest(orjson.dumps(r)) for r in other
    ]


def test_an_ip_address_alone_goes_out_beside_an_empty_consent() -> None:
    """The API's `userConsent` holds a `consent` object (the sandbox refuses one without): an
    event's IP address with no consent signal still goes out, as `geo` beside `consent: {}`."""
    record = orjson.loads(
        encode_record("m", "FR", Action.ADD, [], Consent(ip_address="2001:db8::1"))
    )
    assert record["userConsent"] == {
        "consent": {},
        "geo": {"countryCode": "FR", "ipAddress": "2001:db8::1"},
    }


_TEXT = st.text(st.characters(codec="ascii", categories=("L", "N")), min_size=1)


@given(
    country=st.sampled_from(["US", "DE", "FR", "GB"]),
    action=st.sampled_from(Action),
    consent=st.builds(
        Consent,
        st.one_of(st.none(), st.sampled_from(sorted(CONSENT_VALUES))),
        st.one_of(st.none(), st.sampled_from(sorted(CONSENT_VALUES))),
        st.one_of(st.none(), _TEXT),
        st.one_of(st.none(), _TEXT),
        st.one_of(st.none(), st.sampled_from(["203.0.113.7", "2001:db8::1"])),
    ),
)
def test_every_consent_an_event_can_carry_makes_a_record_the_api_accepts(
    country: str, action: Action, consent: Consent
) -> None:
    """Whatever mix of consent fields a well-formed event carries, the record (and the one a
    refresh sends, its IP dropped) passes the sandbox's check of a record: else Amazon refuses
    the member, and marks it invalid, for a shape of syncd's making."""
    pii = [{"email": sha("a@example.com")}]
    encoded = encode_record("m", country, action, pii, consent)
    for record in (encoded, without_consent_ip(encoded)):
        assert check_record(orjson.loads(record), 0) is None, record


STRICT_DESTINATIONS = (
    Destination("eu", "conn-1", 7, "DE", consent_policy="strict"),
    Destination("us", "conn-1", 8, "US", consent_policy="strict"),
    Destination("open", "conn-1", 9, "DE"),  # pass
)
# the sandbox's list (Amazon's emulator, written apart from routing): the EU, IS, LI, NO, GB, CH
CONSENT_ORACLE = SANDBOX_CONSENT_COUNTRIES


def strict_route(change: ProfileChange) -> dict[str, tuple[Action, bool, str]]:
    parts = Router(STRICT_DESTINATIONS, strict_reference=False).route(change)
    out = {}
    for p in parts:
        assert orjson.loads(p.record.json)["action"] == p.record.action.value
        out[p.destination.audience] = (
            p.record.action,
            p.record.identifiers_only,
            p.record.dead_letter,
        )
    return out


@settings(max_examples=300)
@given(
    country=st.one_of(
        st.none(), st.sampled_from(sorted(CONSENT_ORACLE | {"US", "JP", "BR", "TR"}))
    ),
    user_data=st.one_of(st.none(), st.sampled_from(sorted(CONSENT_VALUES))),
    identifiers_only=st.booleans(),
)
def test_strict_consent_keeps_back_unanswered_consent_countries_and_removes_on_denied(
    country: str | None, user_data: str | None, identifiers_only: bool
) -> None:
    audiences = {} if identifiers_only else {"adds": ("eu", "us", "open")}
    change = ProfileChange(
        "cdp-1",
        {"email": ["jane@example.com"]},
        country=country,
        consent=None if user_data is None else Consent(amzn_user_data=user_data),
        **audiences,
    )
    got = strict_route(change)
    for dest in STRICT_DESTINATIONS:
        effective = country or dest.country_code
        if dest.consent_policy == "pass":
            want = (Action.ADD, identifiers_only, "")
        elif user_data == "DENIED":
            want = (Action.REMOVE, False, "")
        elif effective in CONSENT_ORACLE and user_data != "GRANTED":
            want = (Action.ADD, identifiers_only, "consent_missing")
        else:
            want = (Action.ADD, identifiers_only, "")
        assert got[dest.audience] == want, dest


@pytest.mark.parametrize("user_data", [None, "UNKNOWN", "DENIED", "GRANTED"])
def test_strict_consent_lets_every_remove_through(user_data: str | None) -> None:
    change = ProfileChange(
        "cdp-1",
        {"email": ["jane@example.com"]},
        removes=("eu",),
        consent=None if user_data is None else Consent(amzn_user_data=user_data),
    )
    assert strict_route(change) == {"eu": (Action.REMOVE, False, "")}
