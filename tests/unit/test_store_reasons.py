"""Amazon's free-text invalidRecords[].error is bounded to a few reason classes before it
becomes a metric label or a store key."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from syncd.amazon.api import InvalidRecord
from syncd.store.reasons import INVALID_REASONS, classify_invalid_reason, invalid_reason_counts


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("INVALID_HASHED_PII: no hashed identifier could be resolved", "invalid_pii"),
        ("hashedPII.email is not a valid SHA-256 hash", "invalid_pii"),
        ("Invalid phone number", "invalid_pii"),
        ("MISSING_COUNTRY", "invalid_country"),
        ("countryCode XX is not supported", "invalid_country"),
        ("externalUserId must not be empty", "invalid_id"),
        ("Duplicate external_user_id in request", "invalid_id"),
        ("userConsent.amzn.amznAdStorage is required for EEA members", "consent"),
        ("TCF string could not be parsed", "consent"),
        ("", "other"),
        ("Internal error, please retry", "other"),
    ],
)
def test_amazon_messages_fall_into_their_class(text: str, reason: str) -> None:
    assert classify_invalid_reason(text) == reason


@given(st.lists(st.text(max_size=400), max_size=30))
def test_any_text_falls_into_one_of_the_few_classes(texts: list[str]) -> None:
    counts = invalid_reason_counts(InvalidRecord("x", t) for t in texts)
    assert set(counts) <= set(INVALID_REASONS)
    assert sum(counts.values()) == len(texts)
