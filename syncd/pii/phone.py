"""The phone rule: E.164 (without "+") of numbers libphonenumber finds possible.

`e164(text, region, strict)` answers exactly what `_phone_reference` (`phonenumbers.parse`, then
`is_possible_number_with_reason`, then E.164) answers, for every input. Clean input, ASCII digits
with at most one leading "+" (what the normalizer produces for nearly every number), takes a
direct path: it replays the steps `parse` takes on such a string, with libphonenumber's own
metadata and the same regular expressions compiled once per region, and skips the generic
extraction and normalization work that is a no-op on it (docs/benchmarks.md). Anything else
goes to the reference. It reads libphonenumber internals (`_test_number_length`, the length
limits), so tests/unit/test_pii_phone_fastpath.py holds the two against each other: run it
after any upgrade of `phonenumbers`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cache

import phonenumbers
from phonenumbers import COUNTRY_CODE_TO_REGION_CODE, SUPPORTED_REGIONS, PhoneMetadata
from phonenumbers.phonenumberutil import (
    _MAX_INPUT_STRING_LENGTH,
    _MAX_LENGTH_FOR_NSN,
    _MIN_LENGTH_FOR_NSN,
    _test_number_length,
)

_VR = phonenumbers.ValidationResult
_IS_POSSIBLE = _VR.IS_POSSIBLE
_IS_POSSIBLE_LOCAL_ONLY = _VR.IS_POSSIBLE_LOCAL_ONLY
_TOO_LONG = _VR.TOO_LONG
_KEEPS_PREFIX = frozenset({_VR.TOO_SHORT, _VR.IS_POSSIBLE_LOCAL_ONLY, _VR.INVALID_LENGTH})
_E164 = phonenumbers.PhoneNumberFormat.E164


def _calling_code_prefixes() -> dict[str, tuple[int, int]]:
    """Every 3-digit string -> (calling code, its length) for the shortest calling code it starts
    with, as `_extract_country_code` finds it (calling codes have 1 to 3 digits)."""
    codes = {str(code): code for code in COUNTRY_CODE_TO_REGION_CODE}
    prefixes: dict[str, tuple[int, int]] = {}
    for number in range(1000):
        digits = f"{number:03d}"
        for size in (1, 2, 3):
            if digits[:size] in codes:
                prefixes[digits] = codes[digits[:size]], size
                break
    return prefixes


_CALLING_CODE_PREFIXES = _calling_code_prefixes()


def e164(text: str, region: str | None, strict: bool) -> str | None:
    """`text` parsed with `region` as default region, in E.164 without "+", when it is possible.

    Possible: `IS_POSSIBLE`; in strict mode `IS_POSSIBLE_LOCAL_ONLY` too (the AWS reference's
    `is_possible_number`). None when it is not, or does not parse.
    """
    if text.startswith("+"):
        digits = text[1:]
        if region is None and digits.isascii() and digits.isdigit():
            return _international(digits, strict)
    elif region is not None and text.isascii() and text.isdigit():
        return _national(text, region, strict)
    return _phone_reference(text, region, strict)


def _phone_reference(text: str, region: str | None, strict: bool) -> str | None:
    """The rule spelled with libphonenumber's public API: the definition `e164` keeps to."""
    try:
        number = phonenumbers.parse(text, region)
    except phonenumbers.NumberParseException:
        return None
    reason = phonenumbers.is_possible_number_with_reason(number)
    if reason == _IS_POSSIBLE or (strict and reason == _IS_POSSIBLE_LOCAL_ONLY):
        formatted: str = phonenumbers.format_number(number, _E164)
        return formatted[1:]
    return None


@dataclass(frozen=True, slots=True)
class _Plan:
    """What `parse` reads from one region's metadata, with its patterns compiled."""

    country_code: int
    country_code_digits: str
    international_prefix: re.Pattern[str] | None  # None: the region has none
    national_prefix: re.Pattern[str] | None  # `national_prefix_for_parsing`; None: none
    transform_rule: str | None
    general: re.Pattern[str] | None  # the general national number pattern; None: none
    lengths: tuple[int, ...]  # `_test_number_length` result by length (0.._MAX_INPUT)
    possible: tuple[int, ...]  # the same for the calling code's main region: the final check

    @classmethod
    def of(cls, metadata: PhoneMetadata, main: _Plan | None) -> _Plan:
        """The plan of `metadata`; `main` is its calling code's main plan (None: this is it)."""
        assert metadata.country_code is not None
        general = metadata.general_desc
        general_pattern = general.national_number_pattern if general is not None else None
        lengths = tuple(  # the result depends on the length alone
            _test_number_length("0" * size, metadata)
            for size in range(_MAX_INPUT_STRING_LENGTH + 1)
        )
        return cls(
            country_code=metadata.country_code,
            country_code_digits=str(metadata.country_code),
            international_prefix=_compiled(metadata.international_prefix, empty_too=True),
            national_prefix=_compiled(metadata.national_prefix_for_parsing),
            transform_rule=metadata.national_prefix_transform_rule or None,
            general=_compiled(general_pattern),
            lengths=lengths,
            possible=lengths if main is None else main.possible,
        )

    def is_national_number(self, digits: str) -> bool:
        """`_match_national_number(digits, general_desc, False)`."""
        return self.general is not None and self.general.fullmatch(digits) is not None

    def strip_national_prefix(self, digits: str) -> str:
        """`_maybe_strip_national_prefix_carrier_code(digits, metadata)[1]`."""
        prefix = self.national_prefix
        if not digits or prefix is None:
            return digits
        match = prefix.match(digits)
        if match is None:
            return digits
        viable = self.is_national_number(digits)
        if self.transform_rule is None or match.groups()[-1] is None:
            stripped = digits[match.end() :]
        else:
            stripped = prefix.sub(self.transform_rule, digits, count=1)
        return digits if viable and not self.is_national_number(stripped) else stripped


def _compiled(pattern: str | None, *, empty_too: bool = False) -> re.Pattern[str] | None:
    if pattern is None or (not pattern and not empty_too):
        return None
    return re.compile(pattern)


@cache
def _region_plan(region: str) -> _Plan | None:
    """The plan of a default region; None when libphonenumber does not know the region."""
    if region not in SUPPORTED_REGIONS:
        return None
    metadata = PhoneMetadata.metadata_for_region(region)
    assert metadata is not None
    assert metadata.country_code is not None
    return _Plan.of(metadata, _calling_code_plan(metadata.country_code))


@cache
def _calling_code_plan(country_code: int) -> _Plan:
    """The plan of the main region of a calling code (the metadata `parse` switches to)."""
    metadata = PhoneMetadata.metadata_for_region_or_calling_code(
        country_code, COUNTRY_CODE_TO_REGION_CODE[country_code][0]
    )
    assert metadata is not None
    return _Plan.of(metadata, None)


def _with_calling_code(digits: str, strict: bool) -> str | None:
    """The end of `parse` for `digits` (3 or more) after "+" or an international prefix."""
    found = _CALLING_CODE_PREFIXES.get(digits[:3])
    if found is None:
        return None
    country_code, size = found
    return _finish(digits[size:], _calling_code_plan(country_code), strict)


def _international(digits: str, strict: bool) -> str | None:
    """`parse("+" + digits, None)` and the possibility check."""
    if len(digits) <= _MIN_LENGTH_FOR_NSN or len(digits) >= _MAX_INPUT_STRING_LENGTH:
        return None  # not viable (under 3 digits after "+"), or input too long
    return _with_calling_code(digits, strict)


def _national(digits: str, region: str, strict: bool) -> str | None:
    """`parse(digits, region)` and the possibility check."""
    if len(digits) < _MIN_LENGTH_FOR_NSN or len(digits) > _MAX_INPUT_STRING_LENGTH:
        return None
    plan = _region_plan(region)
    if plan is None:
        return None
    prefix = plan.international_prefix
    idd = prefix.match(digits) if prefix is not None else None
    if idd is not None and not digits.startswith("0", idd.end()):
        # Dialled with the region's international prefix: a calling code must follow.
        after = digits[idd.end() :]
        if len(after) <= _MIN_LENGTH_FOR_NSN:
            return None
        return _with_calling_code(after, strict)
    if digits.startswith(plan.country_code_digits):
        # The region's own calling code without "+", kept when the rest reads better.
        rest = plan.strip_national_prefix(digits[len(plan.country_code_digits) :])
        reads_better = not plan.is_national_number(digits) and plan.is_national_number(rest)
        if reads_better or plan.lengths[len(digits)] == _TOO_LONG:
            return _finish(rest, _calling_code_plan(plan.country_code), strict)
    return _finish(digits, plan, strict)


def _finish(national: str, plan: _Plan, strict: bool) -> str | None:
    """The end of `parse` (national prefix, length limits) and the possibility check.

    `plan` is the metadata `parse` holds at that point: the calling code's main region once a
    calling code was read from the number, else the default region.
    """
    if len(national) < _MIN_LENGTH_FOR_NSN:
        return None
    stripped = plan.strip_national_prefix(national)
    if plan.lengths[len(stripped)] not in _KEEPS_PREFIX:
        national = stripped
    if not _MIN_LENGTH_FOR_NSN <= len(national) <= _MAX_LENGTH_FOR_NSN:
        return None
    reason = plan.possible[len(national)]
    if reason == _IS_POSSIBLE or (strict and reason == _IS_POSSIBLE_LOCAL_ONLY):
        return plan.country_code_digits + national
    return None
