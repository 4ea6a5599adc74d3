"""SHA-256 of normalized identifiers, and the `hashedPII` objects of one member record."""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from syncd.pii.normalize import RULES, Rule, normalize, prehashed, rules_country
from syncd.vocabulary import MAX_HASHED_VALUES_PER_MEMBER, PII_KEYS

try:
    # CPython's own SHA-256, hashlib's fallback: same digests, and for values this short a call
    # is cheaper than OpenSSL's, whose per-call setup dominates (docs/benchmarks.md).
    # 3.11: _sha256, 3.12+: _sha2.
    from _sha256 import sha256 as _sha256  # type: ignore[import-not-found,unused-ignore]
except ImportError:  # other interpreters
    try:
        from _sha2 import sha256 as _sha256  # type: ignore[import-not-found,no-redef,unused-ignore]
    except ImportError:
        _sha256 = hashlib.sha256
_RULES_IN_ORDER = tuple((key, RULES[key]) for key in PII_KEYS)


def hash_field(
    field: str, value: str, country: str | None, *, strict_reference: bool = False
) -> tuple[str, str] | None:
    """(normalized, sha256 hex) of one identifier, or None when it must be omitted.

    A value that already is a SHA-256 hex yields (hex, hex): it is sent as given, lower-cased.
    """
    hashed = prehashed(value, strict_reference=strict_reference)
    if hashed is not None:
        return (hashed, hashed) if hashed else None
    normalized = normalize(field, value, country, strict_reference=strict_reference)
    if normalized is None:
        return None
    return normalized, _sha256(normalized.encode()).hexdigest()


def _empty_counter() -> Counter[tuple[str, str]]:
    """`Counter()` without `Counter.__init__`, a Python-level call that does nothing here but
    costs time on every record (docs/benchmarks.md). The result is a complete, empty Counter."""
    return Counter.__new__(Counter)


def _digest(rule: Rule, value: str, country: str, strict: bool) -> str | None:
    """`hash_field(...)[1]`, given the field's rule and the `rules_country` code (hot path)."""
    if len(value) >= 64:  # shorter, it cannot be a hash
        hashed = prehashed(value, strict_reference=strict)
        if hashed is not None:
            return hashed or None
    value = value.strip()
    normalized = rule(value, country, strict) if value else None
    return _sha256(normalized.encode()).hexdigest() if normalized else None


def _several(
    key: str,
    rule: Rule,
    values: Sequence[str],
    country: str,
    strict: bool,
    first: dict[str, str],
    more: dict[str, list[str]],
    dropped: Counter[tuple[str, str]],
) -> None:
    """Hash the values of a key that has none or several, into `first`, `more` and `dropped`."""
    digests: list[str] = []
    for value in values:
        digest = _digest(rule, value, country, strict)
        if digest is None:
            dropped[key, "invalid"] += 1
        else:
            digests.append(digest)
    if digests:
        first[key] = digests[0]
        distinct = list(dict.fromkeys(digests))
        if len(distinct) > 1:
            more[key] = distinct


@dataclass(frozen=True)
class HashedPII:
    """The record's `hashedPII` objects and the values left out, counted by (field, reason).

    Reasons: `invalid` (omitted by its rule, empty included) and `over_limit` (past the cap).
    """

    objects: list[dict[str, str]]
    dropped: Counter[tuple[str, str]]

    @property
    def empty(self) -> bool:
        return not self.objects


def build_hashed_pii(
    identifiers: Mapping[str, str | Sequence[str]],
    country: str | None,
    *,
    strict_reference: bool = False,
) -> HashedPII:
    """Hash every identifier of one member into `hashedPII` objects.

    Object i holds the i-th distinct valid value of each key, so each object has at most one
    value per key. Values that hash alike are sent once. Past `MAX_HASHED_VALUES_PER_MEMBER`
    values the rest is dropped: objects fill in order (keys in `PII_KEYS` order within one
    object), so the first values of every key are the ones kept. Keys outside `PII_KEYS` are
    ignored.
    """
    dropped = _empty_counter()
    rules = rules_country(country)
    first: dict[str, str] = {}  # object 0: each key's first valid digest, in PII_KEYS order
    more: dict[str, list[str]] = {}  # every distinct digest of the keys that have several
    for key, rule in _RULES_IN_ORDER:
        raw = identifiers.get(key)
        if raw is None:
            continue
        if not isinstance(raw, str):
            if len(raw) != 1:
                _several(key, rule, raw, rules, strict_reference, first, more, dropped)
                continue
            raw = raw[0]
        # One value, the common case: `_digest` inlined.
        if len(raw) < 64 or (digest := prehashed(raw, strict_reference=strict_reference)) is None:
            value = raw.strip()
            normalized = rule(value, rules, strict_reference) if value else None
            digest = _sha256(normalized.encode()).hexdigest() if normalized else ""
        if not digest:
            dropped[key, "invalid"] += 1
            continue
        first[key] = digest
    if not more:  # one object at most, within the cap: len(PII_KEYS) < MAX_HASHED_VALUES_PER_MEMBER
        return HashedPII([first] if first else [], dropped)

    columns = [(key, more.get(key) or [digest]) for key, digest in first.items()]
    objects: list[dict[str, str]] = []
    kept = 0
    for index in range(max(len(digests) for _, digests in columns)):
        obj: dict[str, str] = {}
        for key, digests in columns:
            if index >= len(digests):
                continue
            if kept < MAX_HASHED_VALUES_PER_MEMBER:
                obj[key] = digests[index]
                kept += 1
            else:
                dropped[key, "over_limit"] += 1
        if obj:
            objects.append(obj)
    return HashedPII(objects, dropped)
