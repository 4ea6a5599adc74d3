"""The words syncd and the Advertiser audiences API share, each defined once: job states,
consent signals, regions, the hashedPII keys and caps, and a Kafka partition's name.

A sibling of `syncd/amazon/api.py` rather than part of it: api.py is the HTTP contract (paths,
media types, typed results), while these words are also spoken by layers that never call
Amazon (the model, routing, the store, the source, config) and include syncd's own (`EXPIRED`,
`Partition`). Pure data with no syncd imports, so anything may import it. The enums are `str`
enums: a member is its value in SQL, JSON and comparisons with the API's strings.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Final, NamedTuple


class JobState(StrEnum):
    """A records job's state: Amazon's five, plus syncd's own EXPIRED (it gave up polling)."""

    PENDING = "PENDING"  # the only state that is not terminal
    SUCCEEDED = "SUCCEEDED"
    PARTIALLYSUCCEEDED = "PARTIALLYSUCCEEDED"
    FAILED = "FAILED"
    COMPLETED = "COMPLETED"
    EXPIRED = "EXPIRED"  # syncd's: still PENDING after poll.max_job_age_s; Amazon never says it


AMAZON_JOB_STATES = frozenset(JobState) - {JobState.EXPIRED}
"""The states Amazon answers a job status with."""
TERMINAL_JOB_STATES = frozenset(JobState) - {JobState.PENDING}
"""Every state but PENDING: the job is done, one way or another."""
CONFIRMING_JOB_STATES = frozenset(
    {JobState.SUCCEEDED, JobState.PARTIALLYSUCCEEDED, JobState.COMPLETED}
)
"""The job's records were applied (PARTIALLYSUCCEEDED: all but its invalid records)."""


class ConsentSignal(StrEnum):
    """The values of `userConsent.consent.amzn.amznUserData` / `amznAdStorage`."""

    GRANTED = "GRANTED"
    DENIED = "DENIED"
    NOT_APPLICABLE = "NOT_APPLICABLE"
    UNKNOWN = "UNKNOWN"


CONSENT_VALUES: frozenset[str] = frozenset(signal.value for signal in ConsentSignal)
CONSENT_ANSWERS: frozenset[str] = frozenset(
    {ConsentSignal.GRANTED.value, ConsentSignal.DENIED.value}
)
"""The signals that answer the question (what Amazon accepts where consent is required)."""


class Region(StrEnum):
    """An Amazon Ads API region (`amazon.region`)."""

    NA = "NA"
    EU = "EU"
    FE = "FE"


class PiiKey(StrEnum):
    """The eight keys of a `hashedPII` object, in the API's order."""

    EMAIL = "email"
    PHONE = "phone"
    FIRSTNAME = "firstname"
    LASTNAME = "lastname"
    ADDRESS = "address"
    CITY = "city"
    STATE = "state"
    POSTAL = "postal"


PII_KEYS: tuple[str, ...] = tuple(key.value for key in PiiKey)
MAX_HASHED_PII_OBJECTS: Final = 100  # hashedPII objects per record
MAX_HASHED_VALUES_PER_MEMBER: Final = 100  # hashed values per record, over all its objects


class Partition(NamedTuple):
    """One partition of one Kafka topic. A tuple: equal to `(topic, partition)` and to aiokafka's
    `TopicPartition`, so either can look it up."""

    topic: str
    partition: int
