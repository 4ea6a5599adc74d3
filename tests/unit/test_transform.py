"""The transform stage: the same outcomes, in order, inline and in worker processes."""

from __future__ import annotations

import fcntl
import sys
from collections import Counter

import orjson
import pytest

from syncd import synth
from syncd.model import Action, Destination
from syncd.routing import RouteCounts
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
