"""KafkaSource's health probe, against a fake consumer (the broker's side: tests/integration)."""

from __future__ import annotations

from typing import cast

from aiokafka import AIOKafkaConsumer
from structlog.testing import capture_logs

from syncd.config import KafkaConfig
from syncd.source import KafkaSource, OffsetTracker


class ClusterTopics:
    """A consumer whose cluster has `topics`."""

    def __init__(self, *topics: str) -> None:
        self.topics_held = set(topics)

    async def topics(self) -> set[str]:
        return set(self.topics_held)


async def test_a_topic_of_kafka_topics_the_cluster_lacks_makes_kafka_unready_naming_it() -> None:
    """A typo in `kafka.topics` (or a topic not created yet on a cluster that creates none):
    syncd joined the group with nothing to read and said ready, consuming nothing, with no
    word of why. Now /readyz's `kafka` is false while a topic is missing, and an error log
    names the key and the topic, once (not at every probe)."""
    source = KafkaSource(
        KafkaConfig(topics=("profile-changes", "profile-changez")), OffsetTracker()
    )
    cluster = ClusterTopics("profile-changes", "other")
    source._consumer = cast(AIOKafkaConsumer, cluster)
    with capture_logs() as logs:
        assert not await source.reachable()
        assert not await source.reachable()
    [error] = [e for e in logs if e["log_level"] == "error"]
    assert "kafka.topics" in error["event"]
    assert error["topics"] == ["profile-changez"]
    cluster.topics_held.add("profile-changez")  # created
    with capture_logs() as logs:
        assert await source.reachable()
    assert not [e for e in logs if e["log_level"] == "error"]
