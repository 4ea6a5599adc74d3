"""Fetched record batches as the consumer reads them: aiokafka's, except that a record header
key that is not UTF-8 does not fail the fetch.

aiokafka decodes every header key as strict UTF-8 while it parses a fetched batch, and the
error escapes `getmany` (UnicodeDecodeError) for every partition; the batch is fetched again
from the same position, and fails again. Kafka takes such keys (its Java clients decode them
leniently), so one record a producer wrote with one would stop syncd, and again after each
restart. syncd reads no header: a batch the compiled parser fails on is parsed again here, its
header keys decoded with `surrogateescape`, and the records the first parse had not returned
yet come from the second.

`install()` puts `TolerantRecords` where aiokafka's fetcher builds the records of a fetch
response (the module global `MemoryRecords` of `aiokafka.consumer.fetcher`: aiokafka has no
option for it). Every batch is still parsed by aiokafka's compiled parser first.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from aiokafka.consumer import fetcher
from aiokafka.errors import CorruptRecordException
from aiokafka.record.default_records import (
    DefaultRecordBatch,
    _DefaultRecordBatchPy,
    _DefaultRecordPy,
)
from aiokafka.record.memory_records import _MemoryRecordsPy
from aiokafka.record.util import decode_varint


class TolerantRecords:
    """The batches of one fetch response (aiokafka's `MemoryRecords` interface); a message
    format v2 batch comes as a `_TolerantBatch`."""

    def __init__(self, data: bytes) -> None:
        self._data = data
        self._records = _MemoryRecordsPy(data)

    def size_in_bytes(self) -> int:
        return len(self._data)

    def has_next(self) -> bool:
        return self._records._next_slice is not None

    def next_batch(self) -> Any:
        raw = self._records._next_slice  # the bytes of the batch next_batch() parses
        batch = self._records.next_batch()
        if raw is not None and isinstance(batch, DefaultRecordBatch):
            return _TolerantBatch(batch, raw)
        return batch


class _TolerantBatch:
    """A v2 batch: aiokafka's, until its parse fails on a header key; then `_LenientBatch`'s
    records past the last one returned."""

    def __init__(self, batch: Any, raw: memoryview) -> None:
        self._batch = batch
        self._raw = raw
        self._lenient: Iterator[Any] | None = None
        self._returned = -1  # offset of the last record returned

    def __getattr__(self, name: str) -> Any:
        return getattr(self._batch, name)

    def __iter__(self) -> _TolerantBatch:
        self._batch = iter(self._batch)  # as aiokafka iterates a batch (after its CRC check)
        return self

    def __next__(self) -> Any:
        if self._lenient is None:
            try:
                record = next(self._batch)
            except (UnicodeDecodeError, CorruptRecordException) as exc:
                # the pure-Python parser (AIOKAFKA_NO_EXTENSIONS) wraps the decoding error
                if not isinstance(exc, UnicodeDecodeError) and not isinstance(
                    exc.__cause__, UnicodeDecodeError
                ):
                    raise
                self._lenient = iter(_LenientBatch(self._raw))
            else:
                self._returned = record.offset
                return record
        while True:
            record = next(self._lenient)
            if record.offset > self._returned:
                self._returned = record.offset
                return record


class _LenientBatch(_DefaultRecordBatchPy):  # type: ignore[misc]  # final in aiokafka's stubs
    """aiokafka's pure-Python v2 batch, its header keys decoded with `surrogateescape`."""

    _buffer: bytearray
    _pos: int

    def _read_msg(self, decode_varint: Any = decode_varint) -> _DefaultRecordPy:
        # aiokafka 0.14's _DefaultRecordBatchPy._read_msg, but for the header keys' decoding
        buffer = self._buffer
        pos = self._pos
        length, pos = decode_varint(buffer, pos)
        start_pos = pos
        _, pos = decode_varint(buffer, pos)  # attributes: unused
        ts_delta, pos = decode_varint(buffer, pos)
        if self.timestamp_type == self.LOG_APPEND_TIME:
            timestamp = self.max_timestamp
        else:
            timestamp = self.first_timestamp + ts_delta
        offset_delta, pos = decode_varint(buffer, pos)
        key, pos = _nullable_bytes(buffer, pos, decode_varint)
        value, pos = _nullable_bytes(buffer, pos, decode_varint)
        header_count, pos = decode_varint(buffer, pos)
        if header_count < 0:
            raise CorruptRecordException(f"Found invalid number of record headers {header_count}")
        headers: list[tuple[str, bytes | None]] = []
        for _ in range(header_count):
            h_key_len, pos = decode_varint(buffer, pos)
            if h_key_len < 0:
                raise CorruptRecordException(f"Invalid negative header key size {h_key_len}")
            h_key = buffer[pos : pos + h_key_len].decode("utf-8", "surrogateescape")
            pos += h_key_len
            h_value, pos = _nullable_bytes(buffer, pos, decode_varint)
            headers.append((h_key, h_value))
        if pos - start_pos != length:
            raise CorruptRecordException(
                f"Invalid record size: expected to read {length} bytes in record "
                f"payload, but instead read {pos - start_pos}"
            )
        self._pos = pos
        return _DefaultRecordPy(
            self.base_offset + offset_delta,
            timestamp,
            self.timestamp_type,
            key,
            value,
            headers,
        )


def _nullable_bytes(buffer: bytearray, pos: int, decode_varint: Any) -> tuple[bytes | None, int]:
    size, pos = decode_varint(buffer, pos)
    if size < 0:
        return None, pos
    return bytes(buffer[pos : pos + size]), pos + size


def install() -> None:
    """Have aiokafka's fetcher build fetch responses' records as `TolerantRecords`."""
    fetcher.MemoryRecords = TolerantRecords
