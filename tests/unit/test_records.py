"""syncd.source.records: fetched batches parse as aiokafka's do, and a record header key that
is not UTF-8 fails nothing (the broker-level proof is in
tests/integration/test_source_kafka.py)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from aiokafka.consumer.fetcher import READ_COMMITTED, PartitionRecords
from aiokafka.errors import CorruptRecordException
from aiokafka.record.default_records import _DefaultRecordBatchBuilderPy
from aiokafka.record.memory_records import MemoryRecords
from aiokafka.structs import TopicPartition

from syncd.source.records import TolerantRecords


class _NotUtf8(str):
    def encode(self, encoding: str = "utf-8", errors: str = "strict") -> bytes:
        return b"\xff\xfe"


def batch(compression: int, headers: list[list[tuple[str, bytes]]]) -> bytearray:
    builder = _DefaultRecordBatchBuilderPy(
        magic=2,
        compression_type=compression,
        is_transactional=False,
        producer_id=-1,
        producer_epoch=-1,
        base_sequence=-1,
        batch_size=1 << 20,
    )
    for offset, record_headers in enumerate(headers):
        builder.append(
            offset, timestamp=1000 + offset, key=None, value=b"v%d" % offset, headers=record_headers
        )
    return builder.build()


def read(
    data: bytes, records_of: Callable[[bytes], Any] = TolerantRecords
) -> list[tuple[int, bytes | None, tuple[tuple[str, bytes | None], ...]]]:
    records = PartitionRecords(
        TopicPartition("t", 0), records_of(data), [], 0, None, None, True, READ_COMMITTED
    )
    return [(r.offset, r.value, r.headers) for r in records]


@pytest.mark.parametrize("compression", [0, 1], ids=["none", "gzip"])
def test_a_header_key_not_in_utf8_fails_nothing_and_the_batch_mates_come_through(
    compression: int,
) -> None:
    data = bytes(batch(compression, [[("a", b"1")], [(_NotUtf8("k"), b"2")], []]))
    assert read(data) == [
        (0, b"v0", (("a", b"1"),)),
        (1, b"v1", (("\udcff\udcfe", b"2"),)),
        (2, b"v2", ()),
    ]


@pytest.mark.parametrize("compression", [0, 1], ids=["none", "gzip"])
def test_batches_without_such_keys_parse_as_aiokafka_parses_them(compression: int) -> None:
    data = bytes(batch(compression, [[("a", b"1")], [], [("b", b""), ("c", b"3")]]))
    assert read(data) == read(data, MemoryRecords)
    assert [offset for offset, _, _ in read(data)] == [0, 1, 2]


def test_a_corrupt_batch_still_fails() -> None:
    data = bytearray(batch(0, [[(_NotUtf8("k"), b"2")]]))
    data[-1] ^= 0xFF  # the CRC no longer matches
    with pytest.raises(CorruptRecordException):
        read(bytes(data))
