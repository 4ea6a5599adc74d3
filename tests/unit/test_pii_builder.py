"""`build_hashed_pii`: hashedPII objects of one member."""

from __future__ import annotations

import hashlib
from collections import Counter

from syncd.pii import build_hashed_pii
from syncd.vocabulary import MAX_HASHED_VALUES_PER_MEMBER


def sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def test_one_value_per_key_in_one_object() -> None:
    pii = build_hashed_pii(
        {"email": "Jane@Example.com", "phone": "+1 206 266 1000", "city": "Seattle"}, "US"
    )
    assert pii.objects == [
        {"email": sha("jane@example.com"), "phone": sha("12062661000"), "city": sha("seattle")}
    ]
    assert not pii.dropped
    assert not pii.empty


def test_several_values_go_into_several_objects() -> None:
    pii = build_hashed_pii(
        {"email": ["a@x.com", "b@x.com", "c@x.com"], "lastname": ["Doe", "Roe"], "city": "Oslo"},
        "US",
    )
    assert pii.objects == [
        {"email": sha("a@x.com"), "lastname": sha("doe"), "city": sha("oslo")},
        {"email": sha("b@x.com"), "lastname": sha("roe")},
        {"email": sha("c@x.com")},
    ]


def test_duplicates_after_normalization_are_sent_once() -> None:
    digest = sha("a@x.com")
    pii = build_hashed_pii({"email": ["A@x.com", " a@x.com", digest.upper(), "b@x.com"]}, "US")
    assert pii.objects == [{"email": digest}, {"email": sha("b@x.com")}]
    assert not pii.dropped


def test_invalid_values_are_counted_and_leave_no_gap() -> None:
    pii = build_hashed_pii({"email": ["not-an-email", "", "a@x.com"], "phone": "555"}, "US")
    assert pii.objects == [{"email": sha("a@x.com")}]
    assert pii.dropped == Counter({("email", "invalid"): 2, ("phone", "invalid"): 1})


def test_nothing_usable_gives_an_empty_result() -> None:
    pii = build_hashed_pii({"email": "nope", "lastname": "山田", "postal": []}, "US")
    assert pii.empty
    assert pii.objects == []
    assert pii.dropped == Counter({("email", "invalid"): 1, ("lastname", "invalid"): 1})


def test_unknown_keys_are_ignored() -> None:
    pii = build_hashed_pii({"first_name": "Jane", "ssn": "123", "firstname": "Jane"}, "US")
    assert pii.objects == [{"firstname": sha("jane")}]
    assert not pii.dropped


def test_at_most_100_values_and_the_first_ones_are_kept() -> None:
    emails = [f"user{i}@x.com" for i in range(80)]
    phones = [f"+1 206 266 {i:04d}" for i in range(40)]
    pii = build_hashed_pii({"email": emails, "phone": phones}, "US")
    values = [v for obj in pii.objects for v in obj.values()]
    assert len(values) == MAX_HASHED_VALUES_PER_MEMBER
    assert len(set(values)) == MAX_HASHED_VALUES_PER_MEMBER
    # Objects fill in order, email before phone: 40 full objects, then 20 emails alone.
    assert [len(obj) for obj in pii.objects] == [2] * 40 + [1] * 20
    assert pii.objects[0] == {"email": sha("user0@x.com"), "phone": sha("12062660000")}
    assert pii.objects[-1] == {"email": sha("user59@x.com")}
    assert pii.dropped == Counter({("email", "over_limit"): 20})


def test_over_limit_is_deterministic() -> None:
    identifiers = {"email": [f"u{i}@x.com" for i in range(150)], "city": ["Oslo"]}
    first = build_hashed_pii(identifiers, "NO")
    assert first == build_hashed_pii(identifiers, "NO")
    assert first.dropped == Counter({("email", "over_limit"): 51})


def test_country_selects_the_rules_and_uk_is_gb() -> None:
    uk = build_hashed_pii({"postal": "sw1a 1aa", "phone": "020 7946 0958"}, "UK")
    gb = build_hashed_pii({"postal": "sw1a 1aa", "phone": "020 7946 0958"}, "GB")
    assert uk == gb
    assert gb.objects == [{"phone": sha("442079460958"), "postal": sha("SW1A1AA")}]
    us = build_hashed_pii({"postal": "sw1a 1aa"}, "US")
    assert us.empty


def test_strict_reference_is_passed_through() -> None:
    pii = build_hashed_pii({"state": "Québec"}, "CA", strict_reference=True)
    assert pii.objects == [{"state": sha("qu")}]
    assert build_hashed_pii({"state": "Québec"}, "CA").objects == [{"state": sha("qc")}]
