"""Claims -> request bodies: exact bodies within both limits, every claim in exactly one body or
refused as too large, and bisect halves that are exact bodies of their halves."""

import itertools

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from syncd.amazon.api import records_body
from syncd.batching import EncodedBatch, build_batches, envelope_size
from syncd.members import ADD, REMOVE, Claim
from syncd.model import Action, Destination, member_record, record_digest

DEST = Destination("vip", "conn-1", 413642381039213536, "US")
HEX = "a" * 64


def claim(
    member: str, action: str = ADD, objects: int = 1, at: float = 10.0, refresh: bool = False
) -> Claim:
    api = Action.ADD if action == ADD else Action.REMOVE
    record = member_record(member, "US", api, [{"email": HEX}] * objects).json
    return Claim(
        DEST.audience_id, member, action, record, record_digest(record), "tok", refresh, at
    )


def build(
    claims: list[Claim], max_records: int = 6000, max_bytes: int = 4_000_000
) -> tuple[list[EncodedBatch], list[Claim]]:
    return build_batches(DEST, claims, max_records=max_records, max_bytes=max_bytes)


def test_a_batch_keeps_members_claims_and_each_record_as_json() -> None:
    claims = [claim("m1"), claim("m2", REMOVE)]
    [out], too_large = build(claims)
    assert too_large == []
    assert [(m.external_user_id, m.action) for m in out.batch.records] == [
        ("m1", Action.ADD),
        ("m2", Action.REMOVE),
    ]
    assert out.records == [c.record for c in claims]
    assert out.claims == claims


def test_body_is_the_api_document_with_integer_audience_id() -> None:
    [out], _ = build([claim("m1")])
    doc = orjson.loads(out.body)
    assert doc["audienceId"] == 413642381039213536
    assert doc["targetResource"] == {"connectionId": "conn-1"}
    assert doc["records"] == [
        {
            "externalUserId": "m1",
            "countryCode": "US",
            "action": "CREATE",
            "hashedPII": [{"email": HEX}],
        }
    ]
    assert out.batch.size_bytes == len(out.body)
    assert envelope_size(DEST, ()) == len(
        orjson.dumps(records_body(DEST.audience_id, "conn-1", []))
    )


def test_batches_close_at_max_records() -> None:
    outs, _ = build([claim(f"m{i}") for i in range(7)], max_records=3)
    assert [len(o.batch.records) for o in outs] == [3, 3, 1]


def test_a_record_larger_than_a_batch_is_refused_and_the_rest_sent() -> None:
    big = claim("big", objects=200)
    outs, too_large = build([claim("m1"), big, claim("m2")], max_bytes=10_000)
    assert too_large == [big]
    assert [m.external_user_id for o in outs for m in o.batch.records] == ["m1", "m2"]


def test_the_latency_clock_starts_at_the_oldest_live_change_not_a_refresh() -> None:
    [out], _ = build(
        [claim("m1", at=30.0), claim("m2", at=20.0), claim("m3", at=1.0, refresh=True)]
    )
    assert out.batch.first_event_at == 20.0
    [refresh_only], _ = build([claim("m3", at=1.0, refresh=True)])
    assert refresh_only.batch.first_event_at is None


@settings(max_examples=200)
@given(
    sizes=st.lists(st.integers(1, 60), max_size=120),  # hashedPII objects: ~90 to ~5000 bytes
    max_records=st.integers(1, 12),
    max_bytes=st.integers(1_000, 12_000),
)
def test_every_body_respects_both_limits_and_is_the_json_of_its_records(
    sizes: list[int], max_records: int, max_bytes: int
) -> None:
    claims = [claim(f"m{i}", ADD if i % 2 else REMOVE, n) for i, n in enumerate(sizes)]
    outs, too_large = build(claims, max_records=max_records, max_bytes=max_bytes)
    # every claim is in exactly one body, in order, or refused as too large
    assert [c for o in outs for c in o.claims] == [c for c in claims if c not in too_large]
    for c in too_large:
        assert envelope_size(DEST, ()) + len(c.record) > max_bytes
    for o in outs:
        assert 1 <= len(o.batch.records) <= max_records
        assert len(o.body) <= max_bytes
        assert o.batch.size_bytes == len(o.body)
        records = [orjson.loads(r) for r in o.records]
        assert orjson.loads(o.body) == records_body(DEST.audience_id, DEST.connection_id, records)
        assert [r["externalUserId"] for r in records] == [
            m.external_user_id for m in o.batch.records
        ]
        # a refused batch is bisected: the halves are exact batches of the two halves
        if (halves := o.halves()) is not None:
            assert [r for half in halves for r in half.records] == o.records
            assert [m for half in halves for m in half.batch.records] == o.batch.records
            assert [c for half in halves for c in half.claims] == o.claims
            for half in halves:
                assert half.batch.size_bytes == len(half.body) < len(o.body)
                assert orjson.loads(half.body) == records_body(
                    DEST.audience_id, DEST.connection_id, [orjson.loads(r) for r in half.records]
                )
    # a body is not closed while the next record still fits
    for a, b in itertools.pairwise(outs):
        assert (
            len(a.batch.records) == max_records or len(a.body) + 1 + len(b.records[0]) > max_bytes
        )
