"""Classes of Amazon's `invalidRecords[].error`, a free text.

The text is Amazon's (e.g. "INVALID_HASHED_PII: no hashed identifier could be resolved") and
may change or carry anything, so neither a metric label (`syncd_invalid_records_total{reason}`)
nor a store key (`jobs.invalid_reasons`) holds it: both hold one of the few classes below.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable

from syncd.amazon.api import InvalidRecord

INVALID_PII = "invalid_pii"
INVALID_COUNTRY = "invalid_country"
INVALID_ID = "invalid_id"
CONSENT = "consent"
OTHER = "other"
INVALID_REASONS = (INVALID_PII, INVALID_COUNTRY, INVALID_ID, CONSENT, OTHER)

_READ_CHARS = 300  # the class is in the first words; never scan an unbounded text
_NOT_ALNUM = re.compile(r"[^a-z0-9]+")
# First match wins, in this order; words are matched in the text with everything but letters
# and digits removed ("externalUserId", "external_user_id" and "external user id" all match).
_RULES: tuple[tuple[str, tuple[str, ...]], ...] = (
    (CONSENT, ("consent", "tcf", "gpp", "gdpr")),
    (INVALID_COUNTRY, ("country", "marketplace")),
    (INVALID_ID, ("externaluserid", "externalid", "userid", "duplicaterecord")),
    (
        INVALID_PII,
        ("pii", "hash", "sha256", "email", "phone", "identifier", "address", "postal", "zip"),
    ),
)


def classify_invalid_reason(text: str) -> str:
    """The class (one of INVALID_REASONS) of one `invalidRecords[].error` text."""
    squeezed = _NOT_ALNUM.sub("", text[:_READ_CHARS].casefold())
    for reason, words in _RULES:
        if any(word in squeezed for word in words):
            return reason
    return OTHER


def invalid_reason_counts(records: Iterable[InvalidRecord]) -> dict[str, int]:
    """{class: invalid records} of a job's invalidRecords."""
    return dict(Counter(classify_invalid_reason(r.error) for r in records))
