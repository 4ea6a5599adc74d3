from collections import Counter

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from syncd.amazon.api import records_body
from syncd.batching import Batcher, RecordTooLargeError
from syncd.model import Action, Destination, MemberRecord, SourceRef, member_record

DEST = Destination("vip", "conn-1", 413642381039213536, "US")
OTHER = Destination("lapsed", "conn-1", 7, "US")
HEX = "a" * 64


def rec(member: str, action: Action = Action.ADD, at: float | None = None) -> MemberRecord:
    return member_record(member, "US", action, [{"email": HEX}], occurred_at=at)


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def make(
    max_records: int = 6000, max_bytes: int = 4_000_000, clock: Clock | None = None
) -> Batcher:
    return Batcher(
        max_records=max_records, max_bytes=max_bytes, linger_s=2.0, clock=clock or Clock()
    )


def test_a_sent_batch_keeps_members_and_gives_back_each_record_as_json() -> None:
    b = make()
    records = [rec("m1"), rec("m2", Action.REMOVE)]
    for offset, record in enumerate(records):
        b.add(DEST, record, SourceRef("t", 0, offset))
    [out] = b.flush_all()
    assert [(m.external_user_id, m.action) for m in out.batch.records] == [
        ("m1", Action.ADD),
        ("m2", Action.REMOVE),
    ]
    assert out.records == [r.json for r in records]


def test_body_is_the_api_document_with_integer_audience_id() -> None:
    b = make()
    b.add(DEST, rec("m1"), SourceRef("t", 0, 0))
    [out] = b.flush_all()
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


def test_latest_change_of_a_member_wins_and_keeps_every_ref() -> None:
    b = make()
    b.add(DEST, rec("m1", Action.ADD), SourceRef("t", 0, 0))
    b.add(DEST, rec("m1", Action.REMOVE), SourceRef("t", 0, 1))
    [out] = b.flush_all()
    assert [r.action for r in out.batch.records] == [Action.REMOVE]
    assert out.batch.refs == [SourceRef("t", 0, 0), SourceRef("t", 0, 1)]


def test_an_older_change_does_not_replace_a_newer_one() -> None:
    b = make()
    b.add(DEST, rec("m1", Action.REMOVE, at=20.0), SourceRef("t", 0, 0))
    b.add(DEST, rec("m1", Action.ADD, at=10.0), SourceRef("t", 0, 1))
    [out] = b.flush_all()
    assert [r.action for r in out.batch.records] == [Action.REMOVE]
    assert len(out.batch.refs) == 2


def test_full_batch_is_returned_at_max_records() -> None:
    b = make(max_records=3)
    outs = [o for i in range(7) for o in b.add(DEST, rec(f"m{i}"), SourceRef("t", 0, i))]
    assert [len(o.batch.records) for o in outs] == [3, 3]
    assert b.open_records() == 1


def test_linger_flushes_only_old_batches() -> None:
    clock = Clock()
    b = make(clock=clock)
    b.add(DEST, rec("m1"), SourceRef("t", 0, 0))
    clock.now = 1.5
    b.add(OTHER, rec("m2"), SourceRef("t", 0, 1))
    assert b.next_due_in() == pytest.approx(0.5)
    clock.now = 2.0
    assert [o.batch.destination for o in b.due()] == [DEST]
    assert b.next_due_in() == pytest.approx(1.5)


def test_a_record_larger_than_a_batch_is_refused() -> None:
    b = make(max_bytes=10_000)
    big = member_record("m", "US", Action.ADD, [{"email": HEX}] * 200)
    with pytest.raises(RecordTooLargeError):
        b.add(DEST, big, SourceRef("t", 0, 0))
    assert b.flush_all() == []


@settings(max_examples=60)
@given(
    ops=st.lists(
        st.tuples(st.integers(0, 30), st.sampled_from(list(Action)), st.booleans()),
        max_size=300,
    ),
    max_records=st.integers(1, 20),
    max_bytes=st.integers(400, 3000),
)
def test_batches_respect_limits_and_answer_for_every_event(
    ops: list[tuple[int, Action, bool]], max_records: int, max_bytes: int
) -> None:
    b = make(max_records=max_records, max_bytes=max_bytes)
    outs = []
    last: dict[tuple[str, str], Action] = {}
    for offset, (member, action, other) in enumerate(ops):
        dest = OTHER if other else DEST
        outs += b.add(dest, rec(f"m{member}", action), SourceRef("t", 0, offset))
        last[(dest.audience, f"m{member}")] = action
    outs += b.flush_all()
    refs = Counter(r.offset for o in outs for r in o.batch.refs)
    assert refs == Counter(range(len(ops)))
    for o in outs:
        assert 1 <= len(o.batch.records) <= max_records
        assert len(o.body) <= max_bytes
        assert len({r.external_user_id for r in o.batch.records}) == len(o.batch.records)
    # the final state of each member is the action of its last change
    final: dict[tuple[str, str], Action] = {}
    for o in outs:
        for r in o.batch.records:
            final[(o.batch.destination.audience, r.external_user_id)] = r.action
    assert final == last


def test_a_larger_replacement_that_no_longer_fits_goes_into_the_next_batch() -> None:
    b = make(max_bytes=10_000)
    small, large = [{"email": HEX}], [{"email": HEX}] * 40  # 151 and 3154 bytes
    for offset in range(60):  # ~9,200 bytes: room for one more small record, not a large one
        record = member_record(f"m{offset}", "US", Action.ADD, small)
        assert b.add(DEST, record, SourceRef("t", 0, offset)) == []
    offset = 60
    replaced = member_record("m0", "US", Action.REMOVE, large)
    [full] = b.add(DEST, replaced, SourceRef("t", 0, offset))
    [rest] = b.flush_all()
    assert len(full.body) <= 10_000
    assert "m0" not in {m.external_user_id for m in full.batch.records}  # superseded
    assert [(m.external_user_id, m.action) for m in rest.batch.records] == [("m0", Action.REMOVE)]
    assert rest.batch.refs == [SourceRef("t", 0, 0), SourceRef("t", 0, offset)]
    assert rest.records == [replaced.json]


@settings(max_examples=200)
@given(
    ops=st.lists(
        st.tuples(
            st.integers(0, 12),  # member
            st.integers(1, 60),  # hashedPII objects: records of ~90 to ~5000 bytes
            st.booleans(),  # the other destination
            st.one_of(st.none(), st.integers(0, 5)),  # occurred_at
        ),
        max_size=200,
    ),
    max_records=st.integers(1, 12),
    max_bytes=st.integers(1_000, 12_000),
)
def test_every_body_respects_both_limits_and_is_the_json_of_its_records(
    ops: list[tuple[int, int, bool, int | None]], max_records: int, max_bytes: int
) -> None:
    """With replacements by larger or smaller changes, older and newer ones."""
    b = make(max_records=max_records, max_bytes=max_bytes)
    outs = []
    refused = set()
    for offset, (member, objects, other, at) in enumerate(ops):
        dest = OTHER if other else DEST
        action = Action.ADD if offset % 2 else Action.REMOVE
        record = member_record(
            f"m{member}", "US", action, [{"email": HEX}] * objects, occurred_at=at
        )
        try:
            outs += b.add(dest, record, SourceRef("t", 0, offset))
        except RecordTooLargeError:
            refused.add(offset)
    outs += b.flush_all()
    for o in outs:
        assert 1 <= len(o.batch.records) <= max_records
        assert len(o.body) <= max_bytes
        assert o.batch.size_bytes == len(o.body)
        records = [orjson.loads(r) for r in o.records]
        dest = o.batch.destination
        assert orjson.loads(o.body) == records_body(dest.audience_id, dest.connection_id, records)
        assert [r["externalUserId"] for r in records] == [
            m.external_user_id for m in o.batch.records
        ]
        # a refused batch is bisected: the halves are exact batches of the two halves
        if (halves := o.halves()) is not None:
            assert [r for half in halves for r in half.records] == o.records
            assert [m for half in halves for m in half.batch.records] == o.batch.records
            assert [s for half in halves for s in half.batch.sources] == o.batch.sources
            for half in halves:
                assert half.batch.size_bytes == len(half.body) < len(o.body)
                assert orjson.loads(half.body) == records_body(
                    dest.audience_id, dest.connection_id, [orjson.loads(r) for r in half.records]
                )
    refs = Counter(r.offset for o in outs for r in o.batch.refs)
    assert refs == Counter(set(range(len(ops))) - refused)
