"""The phone fast path (`syncd.pii.phone.e164`) answers exactly what libphonenumber answers."""

from __future__ import annotations

from unittest import mock

import phonenumbers
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from syncd.pii.phone import e164

REGIONS = ["US", "GB", "DE", "FR", "JP", "IN", "CA", "AU", "IT", "ES", "BR", "MX"]
UNKNOWN_REGIONS = ["AQ", "UM"]  # ISO 3166 codes libphonenumber has no metadata for
TYPES = [
    phonenumbers.PhoneNumberType.FIXED_LINE,
    phonenumbers.PhoneNumberType.MOBILE,
    phonenumbers.PhoneNumberType.TOLL_FREE,
    phonenumbers.PhoneNumberType.PREMIUM_RATE,
    phonenumbers.PhoneNumberType.VOIP,
]
# International call prefixes as dialled from the region, to reach the IDD branch of `parse`.
DIALLED_IDD = {"US": "011", "CA": "011", "JP": "010", "AU": "0011", "BR": "0021", "IN": "00"}


def reference(text: str, region: str | None, strict: bool) -> str | None:
    """The rule with libphonenumber's public API, as the normalizer used to spell it."""
    try:
        number = phonenumbers.parse(text, region)
    except phonenumbers.NumberParseException:
        return None
    if strict:
        possible = phonenumbers.is_possible_number(number)
    else:
        reason = phonenumbers.is_possible_number_with_reason(number)
        possible = reason == phonenumbers.ValidationResult.IS_POSSIBLE
    if not possible:
        return None
    formatted: str = phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)
    return formatted[1:]


def assert_same(text: str, region: str | None, strict: bool) -> None:
    assert e164(text, region, strict) == reference(text, region, strict), (text, region, strict)


def examples() -> list[tuple[str, phonenumbers.PhoneNumber]]:
    numbers = []
    for region in REGIONS:
        for kind in TYPES:
            number = phonenumbers.example_number_for_type(region, kind)
            if number is not None:
                numbers.append((region, number))
    return numbers


EXAMPLES = examples()
DIGITS = st.text(alphabet="0123456789", max_size=20)
REGION_OR_NONE = st.sampled_from([*REGIONS, *UNKNOWN_REGIONS, None])


@settings(max_examples=2000)
@given(
    digits=DIGITS,
    lead=st.sampled_from(["", "+", "00", "0", "+0", "1", "+1"]),
    region=REGION_OR_NONE,
    strict=st.booleans(),
)
@example(digits="", lead="+", region=None, strict=False)
@example(digits="12", lead="+", region=None, strict=False)
@example(digits="2", lead="", region="US", strict=False)
@example(digits="011442079460000", lead="", region="US", strict=False)
@example(digits="2062661000", lead="1", region="US", strict=False)
def test_random_digit_strings(digits: str, lead: str, region: str | None, strict: bool) -> None:
    text = lead + digits
    # As the normalizer calls it: no region once the number is international...
    assert_same(text, None if text.startswith("+") else region, strict)
    # ... and any other pairing too (these take the reference path).
    assert_same(text, region, strict)


@st.composite
def realistic(draw: st.DrawFn) -> tuple[str, str]:
    """A region and one of its example numbers, written some way, maybe with a typo."""
    region, number = draw(st.sampled_from(EXAMPLES))
    national = phonenumbers.national_significant_number(number)
    code = str(number.country_code)
    nationally = phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.NATIONAL)
    forms = [
        national,
        "".join(c for c in nationally if c.isdigit()),  # with the trunk prefix, if any
        "0" + national,
        code + national,
        "+" + code + national,
        "00" + code + national,
        DIALLED_IDD.get(region, "00") + code + national,
    ]
    text = draw(st.sampled_from(forms))
    edit = draw(st.sampled_from(["none", "drop", "insert", "replace", "append"]))
    position = draw(st.integers(0, len(text)))
    digit = draw(st.sampled_from("0123456789"))
    if edit == "drop":
        text = text[:position] + text[position + 1 :]
    elif edit == "insert":
        text = text[:position] + digit + text[position:]
    elif edit == "replace":
        text = text[:position] + digit + text[position + 1 :]
    elif edit == "append":
        text += digit * draw(st.integers(1, 4))
    dialled_from = draw(st.sampled_from([region, region, *REGIONS]))
    return text, dialled_from


@settings(max_examples=2000)
@given(case=realistic(), strict=st.booleans())
def test_realistic_numbers(case: tuple[str, str], strict: bool) -> None:
    text, region = case
    assert_same(text, None if text.startswith("+") else region, strict)


@settings(max_examples=500)
@given(
    text=st.text(alphabet="0123456789+１٣ -()x", max_size=16),
    region=REGION_OR_NONE,
    strict=st.booleans(),
)
@example(text="++12062661000", region=None, strict=False)
@example(text="1+2062661000", region="US", strict=False)
@example(text="+１２０６２６６１０００", region=None, strict=True)
def test_other_input_matches_too(text: str, region: str | None, strict: bool) -> None:
    assert_same(text, region, strict)


@pytest.mark.parametrize("strict", [False, True])
def test_every_calling_code_and_length(strict: bool) -> None:
    for country_code in phonenumbers.COUNTRY_CODE_TO_REGION_CODE:
        for size in range(19):
            assert_same(f"+{country_code}" + "9876543210987654321"[:size], None, strict)
            assert_same(f"+{country_code}" + "0123456789012345678"[:size], None, strict)


@pytest.mark.parametrize("strict", [False, True])
def test_every_region_with_its_own_numbers(strict: bool) -> None:
    for region in sorted(phonenumbers.SUPPORTED_REGIONS):
        number = phonenumbers.example_number(region)
        if number is None:
            continue
        national = phonenumbers.national_significant_number(number)
        code = str(number.country_code)
        nationally = phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.NATIONAL)
        for text in (
            national,
            "".join(c for c in nationally if c.isdigit()),
            code + national,
            "00" + code + national,
            national[:-1],
            national + "0",
        ):
            assert_same(text, region, strict)


def test_clean_input_skips_the_reference() -> None:
    """The equality tests above would pass trivially if everything went to the reference."""
    cases: list[tuple[str, str | None]] = []
    for region, number in EXAMPLES:
        national = phonenumbers.national_significant_number(number)
        cases += [(f"+{number.country_code}{national}", None), (national, region)]
    cases += [("2", "US"), ("+12", None), ("123", "AQ")]  # rejected without it too
    expected = {
        (text, region, strict): reference(text, region, strict)
        for text, region in cases
        for strict in (False, True)
    }
    # The reference starts with phonenumbers.parse. Patched on the library, not on
    # syncd.pii.phone: calls inside a module compiled by mypyc do not see a patched attribute.
    with mock.patch.object(phonenumbers, "parse", side_effect=AssertionError("slow path")):
        for (text, region, strict), answer in expected.items():
            assert e164(text, region, strict) == answer
