"""syncd: an always-on bridge from CDP profile changes (Kafka) to Amazon Ads audiences."""

__version__ = "0.1.0"
