"""Field normalization rules, pure functions (the rules and deviations: docs/normalization.md).

`normalize(field, value, country)` returns the string whose SHA-256 Amazon expects, the value
itself (lower-cased) when it is already a SHA-256 hex, or None when the value must be omitted.
With `strict_reference=True` the rules follow the AWS reference implementation (deviations
D2..D8 off); D1 (never send the hash of "") always applies.

Hot path notes: character filters drop non-ASCII with `encode("ascii", "ignore")` and the rest
with `bytes.translate` (a C table lookup per byte); non-ASCII input only takes a Unicode step where
a rule needs one (German folding, NFKD, Unicode digits, address splitting). Regexes are compiled
once, per-country tables are built at import. The phone rule's libphonenumber part is in
`syncd.pii.phone`.
"""

from __future__ import annotations

import json
import re
import unicodedata
from collections.abc import Callable, Iterable
from functools import lru_cache
from importlib import resources
from typing import Any, Final, NamedTuple

from syncd.pii.phone import e164
from syncd.vocabulary import PiiKey

# --- countries ---------------------------------------------------------------------------------

_ISO_ALPHA2_CODES = """
    AD AE AF AG AI AL AM AO AQ AR AS AT AU AW AX AZ BA BB BD BE BF BG BH BI BJ BL BM BN BO BQ BR
    BS BT BV BW BY BZ CA CC CD CF CG CH CI CK CL CM CN CO CR CU CV CW CX CY CZ DE DJ DK DM DO DZ
    EC EE EG EH ER ES ET FI FJ FK FM FO FR GA GB GD GE GF GG GH GI GL GM GN GP GQ GR GS GT GU GW
    GY HK HM HN HR HT HU ID IE IL IM IN IO IQ IR IS IT JE JM JO JP KE KG KH KI KM KN KP KR KW KY
    KZ LA LB LC LI LK LR LS LT LU LV LY MA MC MD ME MF MG MH MK ML MM MN MO MP MQ MR MS MT MU MV
    MW MX MY MZ NA NC NE NF NG NI NL NO NP NR NU NZ OM PA PE PF PG PH PK PL PM PN PR PS PT PW PY
    QA RE RO RS RU RW SA SB SC SD SE SG SH SI SJ SK SL SM SN SO SR SS ST SV SX SY SZ TC TD TF TG
    TH TJ TK TL TM TN TO TR TT TV TW TZ UA UG UM US UY UZ VA VC VE VG VI VN VU WF WS YE YT ZA ZM
    ZW
"""
_ISO_ALPHA2 = frozenset(_ISO_ALPHA2_CODES.split())


@lru_cache(maxsize=512)
def normalize_country(code: str) -> str | None:
    """ISO 3166-1 alpha-2, upper case (`UK` is an alias of `GB`); None when not a valid code."""
    upper = code.strip().upper()
    if upper == "UK":
        return "GB"
    return upper if upper in _ISO_ALPHA2 else None


def country_in_words(text: str) -> str | None:
    """The alpha-2 code of a country given as free text: an ISO 3166-1 code (alpha-2 or
    alpha-3) or its English name (ISO's short, official or common name, or a usual alias such as
    "Great Britain"), in any case, with or without accents; None for other text. Dots are
    ignored in a name or an alpha-3 code ("U.S.A."), not in a two-letter code: of those only
    "U.S." and "U.K." are read (aliases), "N.A." (not applicable) is no Namibia."""
    code = normalize_country(text)
    if code is not None:
        return code
    named = _COUNTRY_NAMES.get(_country_key(text))
    return None if named is None else normalize_country(named)


def _country_key(text: str) -> str:
    """How country-names.json keys a text: case-folded, no accents, no dots, straight
    apostrophes, single spaces, no leading "the", "saint" for a leading "st"."""
    text = unicodedata.normalize("NFKD", text.casefold()).replace("\u2019", "'")
    text = "".join(c for c in text if not unicodedata.combining(c)).replace(".", "")
    text = " ".join(text.split()).removeprefix("the ")
    return f"saint {text[3:]}" if text.startswith("st ") else text


def rules_country(code: str | None) -> str:
    """The country whose rules apply: its canonical code, or "" (rules of no specific country)."""
    if not code:
        return ""
    return normalize_country(code) or ""


# --- character tables ----------------------------------------------------------------------------


def _ascii_except(keep: str) -> bytes:
    """The `delete` argument of `bytes.translate` that keeps `keep` (ASCII) and no other byte."""
    return bytes(byte for byte in range(128) if chr(byte) not in keep)


class _PhoneTable(dict[int, str | None]):
    """The `str.translate` table of non-ASCII phone input: ASCII digits and `+` stay, any other
    Unicode decimal digit (full-width...) becomes ASCII, every other character is deleted.

    ASCII is listed in full (a dict hit, no `__missing__` call, for the common characters);
    other characters are not cached, so arbitrary input cannot grow the table.
    """

    def __init__(self) -> None:
        super().__init__(dict.fromkeys(range(128)))
        self.update({ord(c): c for c in "0123456789+"})

    def __missing__(self, key: int) -> str | None:
        char = chr(key)
        return str(unicodedata.decimal(char)) if char.isdecimal() else None


def _fold_germanic(text: str) -> str:
    """ß->ss, ä->ae, ö->oe, ü->ue, ø->o, æ->ae: outputs are ASCII, so order does not matter."""
    return (
        text.replace("ß", "ss")
        .replace("ä", "ae")
        .replace("ö", "oe")
        .replace("ü", "ue")
        .replace("ø", "o")
        .replace("æ", "ae")
    )


_LOWER = "abcdefghijklmnopqrstuvwxyz"
_UPPER = _LOWER.upper()
_DIGITS = "0123456789"

# Applied to `text.encode("ascii", "ignore")`, which has already dropped every non-ASCII char.
_NOT_EMAIL = _ascii_except(_LOWER + _DIGITS + "_.@-")
_NOT_EMAIL_OR_UPPER = _ascii_except(_LOWER + _UPPER + _DIGITS + "_.@-")
_TO_LOWER = bytes.maketrans(_UPPER.encode(), _LOWER.encode())
_NOT_ALNUM_LOWER = _ascii_except(_LOWER + _DIGITS)
_NOT_ALNUM = _ascii_except(_LOWER + _UPPER + _DIGITS)
_NOT_DIGIT = _ascii_except(_DIGITS)
_NOT_UPPER = _ascii_except(_UPPER)
_NOT_PHONE = _ascii_except(_DIGITS + "+")
_PHONE_CHARS = _PhoneTable()

_HEX64 = re.compile(r"[0-9a-fA-F]{64}")
_LOWER_HEX64 = re.compile(r"[0-9a-f]{64}")
EMPTY_SHA256: Final = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"  # of ""

# --- reference data ------------------------------------------------------------------------------


def _load(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(
        resources.files("syncd.pii").joinpath("data", name).read_text(encoding="utf-8")
    )
    return data


_COUNTRY_NAMES: dict[str, str] = _load("country-names.json")["names"]
_STATE_CODES: dict[str, dict[str, str]] = {
    country: codes for country, codes in _load("state-codes.json").items() if country != "_about"
}
_NO_STATE_CODES: dict[str, str] = {}


def _address_maps() -> tuple[dict[str, dict[str, str]], dict[str, dict[str, str]]]:
    """Per-country merged word maps (later maps override earlier ones: the last match wins).

    Returns (maps, strict_maps); a country missing from a dict uses its "" entry, except in
    `strict_maps`, where a country without maps has none (the reference rejects it: D7).
    """
    raw = _load("address-maps.json")

    def lists(name: str) -> list[dict[str, str]]:
        entries: list[dict[str, str]] = raw[name]
        return entries

    reference_default = [
        {"BOULED" if key == "BOULEVARD" else key: value for key, value in entry.items()}
        for entry in lists("DefaultStreetSuffixes")
    ]  # the reference's typo, restored for strict parity (D6)
    common = ["NumberIndicators", "DirectionalWords"]
    by_country = {
        "US": [*common, "USStreetSuffixes", "USSubBuildingDesignator"],
        "GB": [*common, "UKOrganizationSuffixes", "UKStreetSuffixes", "UKSubBuildingDesignator"],
        "FR": [*common, "FRStreetDesignator", "DefaultStreetSuffixes"],
        "ES": [*common, "DefaultStreetSuffixes", "ESStreetPrefixes"],
        "IT": [*common, "DefaultStreetSuffixes", "ITStreetPrefixes"],
        "": [*common, "DefaultStreetSuffixes"],
    }

    def merge(names: Iterable[str], *, strict: bool) -> dict[str, str]:
        merged: dict[str, str] = {}
        for name in names:
            entries = reference_default if strict and name == "DefaultStreetSuffixes" else None
            for entry in entries or lists(name):
                merged.update(entry)
        return merged

    maps = {country: merge(names, strict=False) for country, names in by_country.items()}
    strict_maps = {country: merge(names, strict=True) for country, names in by_country.items()}
    for country in ("CA", "DE", "JP", "IN"):
        strict_maps[country] = strict_maps[""]
    del strict_maps[""]
    return maps, strict_maps


_ADDRESS_MAPS, _STRICT_ADDRESS_MAPS = _address_maps()

# --- field rules ---------------------------------------------------------------------------------
# Each rule takes the trimmed, non-empty value, the canonical country ("" = none) and the strict
# flag, and returns the normalized string or None (omit). Empty results are handled by the caller.

_REFERENCE_EMAIL_STRIP = re.compile(r"[^\w.@-]+")
_REFERENCE_EMAIL_VALID = re.compile(r"[\w.-]+@[\w.-]+")


def _email(value: str, country: str, strict: bool) -> str | None:
    if strict:
        email = _REFERENCE_EMAIL_STRIP.sub("", value.lower())
        return email if _REFERENCE_EMAIL_VALID.match(email) else None
    if value.isascii():  # lower-cased by the translation table, one pass
        email = value.encode().translate(_TO_LOWER, _NOT_EMAIL_OR_UPPER).decode()
    else:
        email = value.lower().encode("ascii", "ignore").translate(None, _NOT_EMAIL).decode()
    # Every character is now in [a-z0-9_.@-], so `^[a-z0-9_.-]+@[a-z0-9_.-]+` holds exactly when
    # the first "@" has a character before it and a non-"@" character after it.
    at = email.find("@")
    if at > 0 and at + 1 < len(email) and email[at + 1] != "@":
        return email
    return None


def _phone(value: str, country: str, strict: bool) -> str | None:
    if strict:  # the reference: always international
        return e164(value if value.startswith("+") else "+" + value, None, strict)
    if value.isascii():
        text = value.encode().translate(None, _NOT_PHONE).decode()
    else:
        text = value.translate(_PHONE_CHARS)
    if text.startswith("00"):
        text = "+" + text[2:]
    return e164(text, None if text.startswith("+") else (country or None), strict)


def _name(value: str, country: str, strict: bool) -> str:
    lowered = value.lower()
    if not lowered.isascii():
        lowered = _fold_germanic(lowered)
    return lowered.encode("ascii", "ignore").translate(None, _NOT_ALNUM_LOWER).decode()


def _city(value: str, country: str, strict: bool) -> str:
    return value.lower().encode("ascii", "ignore").translate(None, _NOT_ALNUM_LOWER).decode()


def _state(value: str, country: str, strict: bool) -> str:
    folded = value.lower()
    # D5: fold German letters and accents before the map lookup. The reference does neither:
    # the A-Z filter below drops such letters (strict: `Baden-Württemberg` is `ba`, not `bw`).
    if not strict and not folded.isascii():
        folded = _fold_germanic(folded)
        if not folded.isascii():
            # NFKD splits accents off their letters; the A-Z filter below drops the marks.
            folded = unicodedata.normalize("NFKD", folded)
    letters = folded.upper().encode("ascii", "ignore").translate(None, _NOT_UPPER).decode()
    code = _STATE_CODES.get(country, _NO_STATE_CODES).get(letters)
    if code is None:
        code = letters[:2]
    return code.lower()


class _PostalRule(NamedTuple):
    delete: bytes  # `bytes.translate` deletions: what the postcode may not contain
    length: int
    pattern: re.Pattern[str] | None  # None: `length` digits


_POSTAL_DEFAULT = _PostalRule(_NOT_DIGIT, 5, None)
_POSTAL_RULES = {
    "CA": _PostalRule(_NOT_ALNUM, 6, re.compile(r"([A-Za-z]\d){3}")),
    "GB": _PostalRule(
        _NOT_ALNUM,
        7,
        re.compile(r"(([A-Za-z]{1,2}\d{2,3})|([A-Za-z]{1,2}\d[A-Za-z]\d))[A-Za-z]{2}"),
    ),
    "JP": _PostalRule(_NOT_DIGIT, 7, None),
    "IN": _PostalRule(_NOT_DIGIT, 6, None),
}


def _postal(value: str, country: str, strict: bool) -> str | None:
    delete, length, pattern = _POSTAL_RULES.get(country, _POSTAL_DEFAULT)
    postal = value.encode("ascii", "ignore").translate(None, delete)[:length].decode()
    if pattern is None:
        return postal if len(postal) == length else None
    if not pattern.fullmatch(postal):
        return None
    return postal if strict else postal.upper()  # D8: one postcode, one hash


_ADDRESS_DELIMITERS = re.compile(r"(?:\s?,\s?)+|\bC/O\b|!|[\[{(]|[\]})]|\s+|\.", re.IGNORECASE)
# Without "C/O" every delimiter is a single character, whitespace or one of these: the tokens are
# then the runs of other characters, which `str.split()` finds once these became spaces. They are
# ASCII, so they can be replaced in UTF-8 (where an ASCII byte is always that ASCII character).
_ADDRESS_SEPARATORS = b",![{()}]."
_SPACED_ADDRESS_SEPARATORS = bytes.maketrans(_ADDRESS_SEPARATORS, b" " * len(_ADDRESS_SEPARATORS))
_POUND_SPLIT = re.compile(r"(#)")


def _address(value: str, country: str, strict: bool) -> str | None:
    if strict:
        words = _STRICT_ADDRESS_MAPS.get(country)
        if words is None:
            return None
    else:
        words = _ADDRESS_MAPS.get(country) or _ADDRESS_MAPS[""]
    upper = value.upper()
    if "C/O" in upper:
        tokens = [token for token in _ADDRESS_DELIMITERS.split(upper) if token]
    else:  # "surrogatepass": lone surrogates (not valid UTF-8, but valid str) stay as they are
        spaced = upper.encode("utf-8", "surrogatepass").translate(_SPACED_ADDRESS_SEPARATORS)
        tokens = spaced.decode("utf-8", "surrogatepass").split()
    if "-" in upper or "#" in upper:
        tokens = _split_dash_and_pound(tokens)
    return "".join(map(words.get, tokens, tokens)).lower()


def _split_dash_and_pound(tokens: list[str]) -> list[str]:
    """The dash rule (`12-B` -> `12`, `B`), then the pound rule (`APT#5` -> `APT`, `#`, `5`)."""
    split: list[str] = []
    for token in tokens:
        dash = token.rfind("-")
        if 0 < dash < len(token) - 1:
            left, right = token[:dash], token[dash + 1 :]
            if left.isnumeric() and not right.isnumeric():
                split.append(left)
                token = right
        if "#" in token:
            split.extend(part for part in _POUND_SPLIT.split(token) if part)
        else:
            split.append(token)
    return split


Rule = Callable[[str, str, bool], str | None]
"""A field rule: (trimmed non-empty value, `rules_country` code, strict) -> normalized or None."""

RULES: dict[str, Rule] = {
    PiiKey.EMAIL.value: _email,
    PiiKey.PHONE.value: _phone,
    PiiKey.FIRSTNAME.value: _name,
    PiiKey.LASTNAME.value: _name,
    PiiKey.ADDRESS.value: _address,
    PiiKey.CITY.value: _city,
    PiiKey.STATE.value: _state,
    PiiKey.POSTAL.value: _postal,
}
FIELDS = frozenset(RULES)


def prehashed(value: str, *, strict_reference: bool = False) -> str | None:
    """The value as it is sent when it already is a SHA-256 hex (trimmed, lower-cased), else None;
    "" (omit it) when it is the hash of the empty string, everyone's (D1).

    The reference only recognises exactly 64 lower-case hex characters (D2 off).
    """
    if strict_reference:
        if len(value) == 64 and _LOWER_HEX64.fullmatch(value):
            return "" if value == EMPTY_SHA256 else value
        return None
    if len(value) < 64:
        return None  # trimming cannot make it longer
    stripped = value.strip()
    if len(stripped) == 64 and _HEX64.fullmatch(stripped):
        lowered = stripped.lower()
        return "" if lowered == EMPTY_SHA256 else lowered
    return None


def normalize(
    field: str, value: str, country: str | None, *, strict_reference: bool = False
) -> str | None:
    """The normalized value of one identifier, or None when it must be omitted.

    A value that already is a SHA-256 hex is returned trimmed and lower-cased, unchanged
    otherwise. Raises ValueError for a field that is not one of the eight PII keys.
    """
    rule = RULES.get(field)
    if rule is None:
        raise ValueError(f"unknown PII field {field!r}")
    hashed = prehashed(value, strict_reference=strict_reference)
    if hashed is not None:
        return hashed or None
    value = value.strip()
    if not value:
        return None
    return rule(value, rules_country(country), strict_reference) or None
