"""The transform stage: the same outcomes, in order, inline and in worker processes; records
encoded exactly as orjson would."""

from __future__ import annotations

import fcntl
import sys
from collections import Counter

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from syncd import synth
from syncd.amazon.api import EXTERNAL_USER_ID
from syncd.model import CONSENT_VALUES, PII_KEYS, Action, Consent, Destination, member_record
from syncd.pii.normalize import _ISO_ALPHA2
from syncd.routing import RouteCounts, encode_record
from syncd.transform import PIPE_BYTES, Spec, Transform, Transformer

DESTINATIONS = (
    Destination("vip", "conn-1", 413642381039213536, "US"),
    Destination("lapsed", "conn-1", 347891, "GB"),
)
SPEC = Spec(DESTINATIONS, "canonical", 1_000_000, strict_reference=False)


def values() -> list[bytes | None]:
    good = [raw for _, raw in synth.events(200, seed=3, audiences=("vip", "lapsed"))]
    bad: list[bytes | None] = [
        b"not json",
        None,
        orjson.dumps({"profile_id": "p1", "identifiers": {"email": "a@b.co"}, "audiences": {}}),
        orjson.dumps(
            {"profile_id": "p2", "identifiers": {"email": "a@b.co"}, "audiences": {"add": ["x"]}}
        ),
    ]
    return [*good[:100], *bad, *good[100:]]


def test_outcomes_are_reasons_or_encoded_records_per_destination() -> None:
    event = orjson.dumps(
        {
            "profile_id": "cdp-1",
            "identifiers": {"email": "Jane.Doe@Example.com", "phone": "not a phone"},
            "audiences": {"add": ["vip"], "remove": ["lapsed", "unknown"]},
        }
    )
    outcomes, counts = Transform(SPEC).run([event, b"{", None])
    first, not_json, empty = outcomes
    assert not_json == "not_json"
    assert isinstance(empty, str)
    assert isinstance(first, list)
    assert [(index, record.action) for index, record in first] == [
        (0, Action.ADD),
        (1, Action.REMOVE),
    ]
    countries = [orjson.loads(record.json)["countryCode"] for _, record in first]
    assert countries == ["US", "GB"]  # no event country: each destination's own
    assert counts.filtered == {"unknown_audience": 1}
    assert counts.default_country == {"vip": 1, "lapsed": 1}
    assert counts.dropped[("phone", "invalid")] == 2  # once per country it was hashed for


def test_take_counts_starts_counting_again() -> None:
    transform = Transform(SPEC)
    _, first = transform.run(values())
    _, second = transform.run([])
    assert first.filtered == {"unknown_audience": 1}
    assert second == RouteCounts()


@pytest.mark.parametrize("workers", [0, 1, 2])
async def test_worker_processes_give_the_inline_outcomes_in_submission_order(
    workers: int,
) -> None:
    batch = values()
    expected, expected_counts = Transform(SPEC).run(batch)
    transformer = Transformer(SPEC, workers=workers)
    try:
        futures = [transformer.submit(batch[i : i + 37]) for i in range(0, len(batch), 37)]
        results = [await f for f in futures]
    finally:
        transformer.close()
    outcomes = [o for chunk, _ in results for o in chunk]
    assert outcomes == expected
    for kind in ("filtered", "default_country", "dropped"):
        merged: Counter[object] = Counter()
        for _, counts in results:
            merged.update(getattr(counts, kind))
        assert merged == getattr(expected_counts, kind), kind


@pytest.mark.skipif(sys.platform != "linux", reason="pipe sizes are set on Linux only")
def test_the_worker_pipes_are_widened() -> None:
    transformer = Transformer(SPEC, workers=1)
    pool = transformer._pool
    try:
        readers = [pool._call_queue._reader, pool._result_queue._reader]
        sizes = [fcntl.fcntl(r.fileno(), fcntl.F_GETPIPE_SZ) for r in readers]
    finally:
        transformer.close()
    assert sizes == [PIPE_BYTES, PIPE_BYTES]


_HEX = st.text(alphabet="0123456789abcdef", min_size=64, max_size=64)
_CONSENT_SIGNAL = st.sampled_from([None, *sorted(CONSENT_VALUES)])


@settings(max_examples=300)
@given(
    external_user_id=st.one_of(
        st.from_regex(EXTERNAL_USER_ID.pattern, fullmatch=True), _HEX.map(str.upper), _HEX
    ),
    country=st.sampled_from(sorted(_ISO_ALPHA2)),
    action=st.sampled_from(Action),
    hashed_pii=st.lists(
        st.dictionaries(st.sampled_from(PII_KEYS), _HEX, max_size=len(PII_KEYS)), max_size=4
    ),
    consent=st.one_of(
        st.none(),
        st.builds(
            Consent,
            _CONSENT_SIGNAL,
            _CONSENT_SIGNAL,
            st.one_of(st.none(), st.text()),
            st.one_of(st.none(), st.text()),
        ),
    ),
)
def test_the_fast_record_encoder_equals_the_orjson_one(
    external_user_id: str,
    country: str,
    action: Action,
    hashed_pii: list[dict[str, str]],
    consent: Consent | None,
) -> None:
    """The router's encoder joins records from parts it knows need no escaping; byte for byte
    what `member_record` (orjson) makes, on every input the router can give it."""
    reference = member_record(external_user_id, country, action, hashed_pii, consent).json
    for _ in range(2):  # the second time with the consent's cached encoding
        assert encode_record(external_user_id, country, action, hashed_pii, consent) == reference
