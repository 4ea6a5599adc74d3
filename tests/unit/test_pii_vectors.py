"""Every public test vector of normalization.md, through `normalize` and `hash_field`."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import pytest

from syncd.pii import hash_field, normalize
from tests.vectors import COPY, SPEC, VECTORS


def _strict(vector: dict[str, Any]) -> bool:
    return bool(vector.get("strict_reference", False))


@pytest.mark.parametrize("vector", VECTORS, ids=[v["id"] for v in VECTORS])
def test_vector(vector: dict[str, Any]) -> None:
    strict = _strict(vector)
    result = hash_field(
        vector["field"], vector["input"], vector["country"], strict_reference=strict
    )
    if vector["sha256"] is None:
        assert result is None
        field, value, country = vector["field"], vector["input"], vector["country"]
        assert normalize(field, value, country, strict_reference=strict) is None
        return
    assert result is not None
    normalized, digest = result
    assert digest == vector["sha256"]
    if vector["normalized"] is None:  # already a hash: sent as given, lower-cased
        assert normalized == digest == vector["input"].strip().lower()
    else:
        assert normalized == vector["normalized"]
        assert digest == hashlib.sha256(normalized.encode("utf-8")).hexdigest()


def test_vectors_cover_every_field() -> None:
    assert {v["field"] for v in VECTORS} == {
        "email",
        "phone",
        "firstname",
        "lastname",
        "address",
        "city",
        "state",
        "postal",
    }


# Examples the rules of normalization.md spell out, beyond the public vectors.
SPEC_EXAMPLES = [
    ("email", "US", '"Jane" <jane@example.com>', "janejane@example.com"),
    ("email", "US", "josé@example.com", "jos@example.com"),  # D3: ASCII only
    ("email", "US", "@example.com", None),
    ("phone", "DE", "0049 30 1234567", "49301234567"),  # 00 is +
    ("phone", "US", "１２０６２６６１０００", "12062661000"),  # full-width digits
    ("phone", "US", "+1 206 266 1000 ext. 12", None),  # extension digits make it too long
    ("phone", "US", "1-800-FLOWERS", None),  # vanity letters dropped, not translated
    ("firstname", "ES", "José", "jos"),
    ("firstname", "DE", "Jörg-Æsa Straße", "joergaesastrasse"),
    ("city", "DE", "München", "mnchen"),
    ("state", "US", "N.Y.", "ny"),
    ("state", "GB", "England", "en"),
    ("state", "US", "ca", "ca"),
    ("state", "DE", "Baden-Württemberg", "bw"),
    ("state", "US", "...", None),
    ("postal", "US", "1234", None),
    ("postal", "DE", "10115", "10115"),
    ("postal", "CA", "k1a 0b1", "K1A0B1"),  # D8
    ("postal", "GB", "sw1a 1aa", "SW1A1AA"),  # D8
    ("postal", "GB", "12345", None),
    ("postal", "IN", "110 001", "110001"),
    ("postal", "JP", "100-000", None),
    ("postal", None, "98103-1234", "98103"),
    ("address", "US", "12-B Elm Rd", "12belmrd"),
    ("address", "FR", "12 Rue de l'Église", "12ruedel'église"),
    ("address", "FR", "3 Av. des Champs-Élysées", "3avdeschamps-élysées"),
    ("address", "US", "APT#5 [c/o Smith] 10 North Main Avenue!", "aptnumber5smith10nmainave"),
    ("address", "DE", "Müllerstraße 5", "müllerstrasse5"),
    ("address", "NL", "Damrak 1 Boulevard", "damrak1blvd"),  # D7: default maps
    ("address", "JP", "東京都千代田区1-1", "東京都千代田区1-1"),
]


@pytest.mark.parametrize(("field", "country", "value", "expected"), SPEC_EXAMPLES)
def test_spec_example(field: str, country: str | None, value: str, expected: str | None) -> None:
    assert normalize(field, value, country) == expected


# With strict_reference the AWS reference behaviour returns (D2..D8 off).
STRICT_EXAMPLES = [
    ("email", "US", "836F82DB99121B3481011F16B49DFA5FBC714A0D1B1B9F784A1EBBBF5B39577F", None),
    ("email", "US", "josé@example.com", "josé@example.com"),
    ("phone", "US", "206-266-1000", "2062661000"),  # read as +20 (Egypt): no "1"
    ("state", "CA", "Québec", "qu"),
    ("state", "DE", "Baden-Württemberg", "ba"),  # D5 off: no ü->ue, so no map hit
    ("state", "DE", "Thüringen", "th"),  # the map key is THUERINGEN: the first two letters
    ("address", "US", "500 West Oak Boulevard", "500woakblvd"),  # US map has BOULEVARD
    ("address", "DE", "12 Goethe Boulevard", "12goetheboulevard"),  # BOULED typo
    ("address", "NL", "Damrak 1", None),  # no maps for the country
    ("postal", "CA", "k1a 0b1", "k1a0b1"),
    ("postal", "GB", "sw1a 1aa", "sw1a1aa"),
]


@pytest.mark.parametrize(("field", "country", "value", "expected"), STRICT_EXAMPLES)
def test_strict_reference(field: str, country: str, value: str, expected: str | None) -> None:
    assert normalize(field, value, country, strict_reference=True) == expected


def test_strict_reference_still_passes_lower_case_hashes() -> None:
    digest = hashlib.sha256(b"x").hexdigest()
    assert normalize("email", digest, "US", strict_reference=True) == digest
    assert hash_field("email", digest, "US", strict_reference=True) == (digest, digest)


def test_unknown_field_is_rejected() -> None:
    with pytest.raises(ValueError, match="unknown PII field"):
        normalize("ssn", "123", "US")


def test_the_shipped_copy_is_the_spec() -> None:
    if not SPEC.is_file():
        pytest.skip("../shared/spec is not beside this checkout; the copy is all there is")
    assert json.loads(COPY.read_text(encoding="utf-8")) == json.loads(
        SPEC.read_text(encoding="utf-8")
    )
