"""Properties of the normalization rules over arbitrary Unicode input."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable

from hypothesis import example, given, settings
from hypothesis import strategies as st

from syncd.pii import build_hashed_pii, hash_field, normalize, normalize_country
from syncd.vocabulary import PII_KEYS

EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()
COUNTRIES = st.sampled_from(
    [None, "", "US", "GB", "UK", "gb", "DE", "FR", "IT", "ES", "CA", "JP", "IN", "NL", "XX", "1"]
)
FIELDS = st.sampled_from(PII_KEYS)
# Arbitrary Unicode, with the characters the rules care about made frequent.
VALUES = st.text() | st.text(alphabet=st.sampled_from(" +-#.,!@()/0123456789aAßÄøÉ字\t１"))
HEX64 = st.text(alphabet="0123456789abcdefABCDEF", min_size=64, max_size=64)

ALLOWED = {
    "email": re.compile(r"[a-z0-9_.-]+@[a-z0-9_.@-]+"),
    "phone": re.compile(r"[1-9][0-9]{1,16}"),
    "firstname": re.compile(r"[a-z0-9]+"),
    "lastname": re.compile(r"[a-z0-9]+"),
    "city": re.compile(r"[a-z0-9]+"),
    "state": re.compile(r"[a-z]{1,2}"),
    "postal": re.compile(r"[0-9]{5,7}|[A-Za-z0-9]{5,7}"),
    "address": re.compile(r"[^\s,!\[\]{}().]+"),
}
IDEMPOTENT = ("email", "firstname", "lastname", "city", "state", "postal")
HEX_RE = re.compile(r"[0-9a-f]{64}")


@settings(max_examples=400)
@given(field=FIELDS, value=VALUES, country=COUNTRIES, strict=st.booleans())
@example(field="address", value="#", country="US", strict=False)
@example(field="phone", value="00", country="GB", strict=False)
@example(field="state", value="ǅ", country="DE", strict=False)
def test_never_raises_and_never_hashes_empty(
    field: str, value: str, country: str | None, strict: bool
) -> None:
    result = hash_field(field, value, country, strict_reference=strict)
    normalized = normalize(field, value, country, strict_reference=strict)
    if result is None:
        assert normalized is None
        return
    assert result[0] == normalized
    assert normalized != ""
    assert result[1] != EMPTY_SHA256
    assert HEX_RE.fullmatch(result[1])


@settings(max_examples=400)
@given(field=FIELDS, value=VALUES, country=COUNTRIES)
def test_output_uses_only_the_rule_characters(field: str, value: str, country: str | None) -> None:
    normalized = normalize(field, value, country)
    if normalized is None or HEX_RE.fullmatch(normalized):
        return
    assert ALLOWED[field].fullmatch(normalized), normalized


@settings(max_examples=300)
@given(field=st.sampled_from(IDEMPOTENT), value=VALUES, country=COUNTRIES)
def test_idempotent_rules(field: str, value: str, country: str | None) -> None:
    once = normalize(field, value, country)
    if once is not None:
        assert normalize(field, once, country) == once


@given(field=FIELDS, digest=HEX64, pad=st.sampled_from(["", " ", "\t", " \n"]), country=COUNTRIES)
def test_prehashed_values_pass_through_lower_cased(
    field: str, digest: str, pad: str, country: str | None
) -> None:
    assert normalize(field, pad + digest + pad, country) == digest.lower()
    assert hash_field(field, pad + digest + pad, country) == (digest.lower(), digest.lower())


@given(
    field=FIELDS,
    case=st.sampled_from([str.lower, str.upper]),
    pad=st.sampled_from(["", " ", "\t", " \n"]),
    country=COUNTRIES,
    strict=st.booleans(),
)
def test_the_hash_of_the_empty_string_is_omitted_even_pre_hashed(
    field: str, case: Callable[[str], str], pad: str, country: str | None, strict: bool
) -> None:
    """D1 (which the reference switch keeps): the hash of "" is everyone's; sent as a value's
    hash it is noise, so it is omitted like an empty value, also when the value is that hash."""
    value = pad + case(EMPTY_SHA256) + pad
    hashed = hash_field(field, value, country, strict_reference=strict)
    if not strict or value == EMPTY_SHA256:  # the reference knows bare lower-case hashes only
        assert normalize(field, value, country, strict_reference=strict) is None
        assert hashed is None
    else:  # not a hash to the reference: a value like any other
        assert hashed is None or hashed[1] != EMPTY_SHA256
    for identifiers in ({field: value}, {field: [value]}, {field: [value, "x@example.com"]}):
        pii = build_hashed_pii(identifiers, country or "US", strict_reference=strict)
        assert EMPTY_SHA256 not in str(pii.objects)


@given(value=st.text(alphabet="0123456789abcdef", min_size=64, max_size=64), field=FIELDS)
def test_strict_reference_passes_lower_case_hashes(value: str, field: str) -> None:
    assert normalize(field, value, "US", strict_reference=True) == value


@given(value=VALUES, country=COUNTRIES)
def test_email_is_ascii_and_contains_an_at(value: str, country: str | None) -> None:
    email = normalize("email", value, country)
    if email is not None and not HEX_RE.fullmatch(email):
        assert email.isascii()
        assert email.index("@") > 0


@given(code=st.text(max_size=4))
def test_normalize_country_gives_upper_alpha2_or_none(code: str) -> None:
    result = normalize_country(code)
    assert result is None or re.fullmatch(r"[A-Z]{2}", result)
    if result is not None:
        assert normalize_country(result) == result


def test_normalize_country_examples() -> None:
    assert normalize_country(" us ") == "US"
    assert normalize_country("uk") == "GB"
    assert normalize_country("GB") == "GB"
    assert normalize_country("XX") is None
    assert normalize_country("USA") is None
    assert normalize_country("") is None
