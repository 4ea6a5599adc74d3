"""The Kafka edge, one job per module: the consumer (consumer.py), the offset tracker that
decides what may be committed (offsets.py), the dead-letter producer (dead_letters.py), the
connection settings they share (connection.py) and the parse of fetched records that a header
key not in UTF-8 does not fail (records.py). Import from here; the names stay where they
were when this was one module."""

from syncd.source.connection import client_options
from syncd.source.consumer import (
    COMMIT_TIMEOUT_S,
    FETCH_MAX_BYTES,
    LAG_REFRESH_S,
    LAG_REFRESH_TIMEOUT_S,
    MAX_PARTITION_FETCH_BYTES,
    STOP_TIMEOUT_S,
    KafkaSource,
    Message,
)
from syncd.source.dead_letters import (
    DETAIL_HEADER,
    DLQ_MAX_REQUEST_BYTES,
    DLQ_RETRY_BACKOFF_S,
    KIND_HEADER,
    REASON_HEADER,
    SOURCE_HEADER,
    VALUE_DROPPED_HEADER,
    DeadLetterProducer,
)
from syncd.source.offsets import OffsetTracker
from syncd.vocabulary import Partition

__all__ = [
    "COMMIT_TIMEOUT_S",
    "DETAIL_HEADER",
    "DLQ_MAX_REQUEST_BYTES",
    "DLQ_RETRY_BACKOFF_S",
    "FETCH_MAX_BYTES",
    "KIND_HEADER",
    "LAG_REFRESH_S",
    "LAG_REFRESH_TIMEOUT_S",
    "MAX_PARTITION_FETCH_BYTES",
    "REASON_HEADER",
    "SOURCE_HEADER",
    "STOP_TIMEOUT_S",
    "VALUE_DROPPED_HEADER",
    "DeadLetterProducer",
    "KafkaSource",
    "Message",
    "OffsetTracker",
    "Partition",
    "client_options",
]
