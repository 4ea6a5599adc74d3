"""The shared vocabulary: its enums stay their API strings wherever they go."""

from __future__ import annotations

import json

import orjson
from aiokafka.structs import TopicPartition

from syncd.model import SourceRef
from syncd.vocabulary import ConsentSignal, JobState, Partition, PiiKey, Region


def test_enum_members_serialize_and_compare_as_their_api_strings() -> None:
    for member in (
        JobState.PARTIALLYSUCCEEDED,
        ConsentSignal.NOT_APPLICABLE,
        Region.EU,
        PiiKey.POSTAL,
    ):
        assert orjson.dumps(member) == orjson.dumps(member.value)
        assert json.dumps(member) == json.dumps(member.value)
        assert f"{member}" == str(member) == member.value
        assert {member.value: 1}[member] == 1


def test_a_partition_is_found_by_a_plain_tuple_and_by_aiokafkas_topic_partition() -> None:
    counts = {SourceRef("events", 3, 17).topic_partition: 1}
    assert counts[("events", 3)] == 1
    assert counts[TopicPartition("events", 3)] == 1
    assert Partition(*TopicPartition("events", 3)) == Partition("events", 3)
