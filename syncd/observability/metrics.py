"""Every metric syncd exports, on one registry. Names: syncd_<noun>_<unit>[_total].

Labels are bounded: connection, audience, action, outcome, reason, state, endpoint, status,
topic, partition, audience_id (as many as audiences ever configured). Never a profile id, never
an identifier or its hash.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

REGISTRY = CollectorRegistry(auto_describe=True)

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_SLOW_BUCKETS = (1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 7200, 21600, 86400)

# --- source / decode ---------------------------------------------------------------------------
EVENTS_CONSUMED = Counter(
    "syncd_events_consumed_total", "Kafka messages read", ["topic"], registry=REGISTRY
)
EVENTS_DEAD_LETTERED = Counter(
    "syncd_events_dead_lettered_total",
    "Events or records that could not be used, by reason",
    ["reason"],
    registry=REGISTRY,
)
EVENTS_FILTERED = Counter(
    "syncd_events_filtered_total",
    "Events with nothing to do (e.g. no audience routed to a destination)",
    ["reason"],
    registry=REGISTRY,
)
PENDING_EVENTS = Gauge(
    "syncd_pending_events",
    "Events read and not yet recorded in the member table (or dead-lettered)",
    registry=REGISTRY,
)
CONSUMER_LAG = Gauge(
    "syncd_consumer_lag_records",
    "High watermark minus the next offset to read, per partition",
    ["topic", "partition"],
    registry=REGISTRY,
)
OFFSETS_COMMITTED = Counter(
    "syncd_offset_commits_total", "Offset commits to Kafka", ["outcome"], registry=REGISTRY
)

# --- hash --------------------------------------------------------------------------------------
PII_VALUES_DROPPED = Counter(
    "syncd_pii_values_dropped_total",
    "Identifier values not sent: invalid/empty after normalization, or over the 100 cap",
    ["field", "reason"],
    registry=REGISTRY,
)
RECORDS_DEFAULT_COUNTRY = Counter(
    "syncd_records_default_country_total",
    "Records whose countryCode came from the destination, not the event",
    ["audience"],
    registry=REGISTRY,
)

# --- batch / deliver ---------------------------------------------------------------------------
RECORDS_SENT = Counter(
    "syncd_records_sent_total",
    "Records accepted by Amazon (202), by action",
    ["connection", "audience", "action"],
    registry=REGISTRY,
)
BATCHES_SENT = Counter(
    "syncd_batches_sent_total",
    "Record POSTs by outcome (accepted, rejected, failed)",
    ["connection", "audience", "outcome"],
    registry=REGISTRY,
)
BATCH_RECORDS = Histogram(
    "syncd_batch_records",
    "Records per POST",
    buckets=(1, 10, 100, 500, 1000, 2000, 3000, 4000, 5000, 6000),
    registry=REGISTRY,
)
BATCH_BYTES = Histogram(
    "syncd_batch_bytes",
    "Body size per POST",
    buckets=(1e3, 1e4, 1e5, 5e5, 1e6, 2e6, 3e6, 4e6, 5e6),
    registry=REGISTRY,
)
REQUEST_DURATION = Histogram(
    "syncd_request_duration_seconds",
    "Amazon API / LwA request duration by endpoint and status ('error' when none arrived)",
    ["endpoint", "status"],
    buckets=_LATENCY_BUCKETS,
    registry=REGISTRY,
)
REQUESTS_THROTTLED = Counter(
    "syncd_requests_throttled_total", "HTTP 429 answers", ["endpoint"], registry=REGISTRY
)
REQUEST_RETRIES = Counter(
    "syncd_request_retries_total",
    "Retried requests by endpoint and reason (throttled, server_error, timeout, connection)",
    ["endpoint", "reason"],
    registry=REGISTRY,
)
INFLIGHT_REQUESTS = Gauge(
    "syncd_inflight_requests", "Record POSTs in flight", ["connection"], registry=REGISTRY
)
CONNECTION_CONCURRENCY = Gauge(
    "syncd_connection_concurrency_limit",
    "Adaptive limit of concurrent record POSTs per connection",
    ["connection"],
    registry=REGISTRY,
)
TOKEN_REFRESHES = Counter(
    "syncd_token_refreshes_total", "LwA token refreshes", ["outcome"], registry=REGISTRY
)
END_TO_END_LATENCY = Histogram(
    "syncd_end_to_end_latency_seconds",
    "Event timestamp (occurred_at) to 202 from Amazon",
    buckets=_SLOW_BUCKETS,
    registry=REGISTRY,
)

# --- member state: ingest and senders ----------------------------------------------------------
MEMBER_CHANGES = Counter(
    "syncd_member_changes_total",
    "Member changes recorded by ingest, by outcome: recorded (due to be sent), noop (Amazon "
    "holds it already), superseded (not newer than the member's), erased (not newer than its "
    "erase), not_member (an identifiers-only update of a profile not in the audience)",
    ["outcome"],
    registry=REGISTRY,
)
MEMBER_CHANGES_WAITING = Gauge(
    "syncd_member_changes_waiting",
    "Members of the connection's audiences due to be sent (one per member, however many changes)",
    ["connection"],
    registry=REGISTRY,
)
RECONCILE_WAITING = Gauge(
    "syncd_reconcile_waiting_records",
    "Records of `syncd reconcile` work due on the connection (sent after live changes and TTL "
    "refreshes)",
    ["connection"],
    registry=REGISTRY,
)

# --- budget ------------------------------------------------------------------------------------
BUDGET_LIMIT = Gauge(
    "syncd_budget_limit_records",
    "Records allowed per rolling window",
    ["connection"],
    registry=REGISTRY,
)
BUDGET_USED = Gauge(
    "syncd_budget_used_records",
    "Records reserved in the current rolling window",
    ["connection"],
    registry=REGISTRY,
)
BUDGET_REMAINING = Gauge(
    "syncd_budget_remaining_records",
    "Records still allowed in the current rolling window",
    ["connection"],
    registry=REGISTRY,
)
BUDGET_PAUSED = Gauge(
    "syncd_budget_paused",
    "1 while a connection waits for budget",
    ["connection"],
    registry=REGISTRY,
)
BUDGET_PAUSED_SECONDS = Counter(
    "syncd_budget_paused_seconds_total",
    "Time a connection spent waiting for budget",
    ["connection"],
    registry=REGISTRY,
)
BUDGET_RESUME_AT = Gauge(
    "syncd_budget_resume_timestamp_seconds",
    "When a paused connection expects budget again (unix time)",
    ["connection"],
    registry=REGISTRY,
)

CONNECTION_BLOCKED = Gauge(
    "syncd_connection_blocked",
    "1 while a connection's sending is stopped (cause: unauthorized, forbidden, not_found, "
    "bad_request, throttled, failing); its records and offsets wait, nothing is dropped",
    ["connection", "cause"],
    registry=REGISTRY,
)

# --- jobs --------------------------------------------------------------------------------------
JOBS = Gauge(
    "syncd_jobs",
    "Jobs in the store by state (terminal ones for poll.retention_days)",
    ["state"],
    registry=REGISTRY,
)
JOBS_FINISHED = Counter(
    "syncd_jobs_finished_total",
    "Jobs that reached a terminal state (incl. EXPIRED)",
    ["state"],
    registry=REGISTRY,
)
JOB_POLLS = Counter(
    "syncd_job_polls_total", "Job status GETs by outcome", ["outcome"], registry=REGISTRY
)
JOB_COMPLETION = Histogram(
    "syncd_job_completion_seconds",
    "Job created to terminal state",
    buckets=_SLOW_BUCKETS,
    registry=REGISTRY,
)
JOB_PROCESSED_RATE = Histogram(
    "syncd_job_processed_rate_percent",
    "recordsProcessedRate of terminal jobs",
    buckets=(10, 25, 50, 75, 90, 95, 99, 99.9, 100),
    registry=REGISTRY,
)
INVALID_RECORDS = Counter(
    "syncd_invalid_records_total",
    "invalidRecords reported by Amazon, by reason class (syncd.store.reasons)",
    ["reason"],
    registry=REGISTRY,
)

# --- audiences -------------------------------------------------------------------------------
# Per destination's audience key (syncd/audiences.py); never a member id.
AUDIENCE_TTL = Gauge(
    "syncd_audience_ttl_seconds",
    "The ttl members are refreshed by: Amazon's metadata.ttl, or 34300800 while it cannot be "
    "read; 0 = Amazon soft-removes the members, nothing is refreshed",
    ["audience"],
    registry=REGISTRY,
)
AUDIENCE_SIZE = Gauge(
    "syncd_audience_size",
    "Amazon's audienceSize from the audience's metadata (kind: received = receivedRecordSize, "
    "matched = idResolutionCount, dsp = dspAudienceSize)",
    ["audience", "kind"],
    registry=REGISTRY,
)
AUDIENCE_METADATA_READS = Counter(
    "syncd_audience_metadata_reads_total",
    "Reads of an audience's metadata by outcome (ok, unauthorized, forbidden, not_found, "
    "refused, failed)",
    ["audience", "outcome"],
    registry=REGISTRY,
)
MEMBERS = Gauge(
    "syncd_members",
    "Members of an audience in the store by state (member, pending, removed, invalid), "
    "counted with each metadata read",
    ["audience", "state"],
    registry=REGISTRY,
)
MEMBERS_REFRESHED = Counter(
    "syncd_members_refreshed_total",
    "Members marked due to be sent again before their audience's ttl runs out",
    ["audience"],
    registry=REGISTRY,
)
MEMBERS_AT_RISK = Gauge(
    "syncd_members_at_risk",
    "Members past the middle of their refresh window (between refresh_at x ttl and the ttl) "
    "whose re-send has not been sent: they leave the audience at the ttl unless sent soon",
    ["audience"],
    registry=REGISTRY,
)
AUDIENCE_JOB_RECORDS = Counter(
    "syncd_audience_job_records_total",
    "Records of the audience's finished jobs, from Amazon's job status (kind: received = "
    "receivedRecordSize, matched = idResolutionCount): their rates give the recent match ratio",
    ["audience", "kind"],
    registry=REGISTRY,
)
AUDIENCE_FAILED_JOBS = Gauge(
    "syncd_audience_failed_jobs_in_row",
    "The audience's latest jobs that ended FAILED, in a row (as this replica polled them; 0 "
    "once one ends otherwise)",
    ["audience"],
    registry=REGISTRY,
)
MEMBER_DEAD_LETTERS_QUEUED = Gauge(
    "syncd_member_dead_letters_queued",
    "Member dead letters (members a job refused) queued in the store, waiting for the broker",
    registry=REGISTRY,
)

TOMBSTONES_PURGED = Counter(
    "syncd_tombstones_purged_total",
    "Erase tombstones deleted after members.tombstone_days",
    registry=REGISTRY,
)

# --- operating the member table ----------------------------------------------------------------
DESTINATION_PAUSED = Gauge(
    "syncd_destination_paused",
    "1 while a destination is paused ([[destinations]] paused = true): its changes are recorded "
    'and wait in the member table (syncd_members{state="pending"}); nothing is sent',
    ["audience"],
    registry=REGISTRY,
)
ORPHANED_MEMBERS = Gauge(
    "syncd_orphaned_members",
    "Member rows of an audience_id no destination names any more, as found at start-up "
    "(`syncd members purge` drops them); one series per audience ever removed from the config",
    ["audience_id"],
    registry=REGISTRY,
)
STORE_BYTES = Gauge(
    "syncd_store_bytes",
    "The store's size on disk: pg_database_size on PostgreSQL, the database file on SQLite",
    registry=REGISTRY,
)

# --- process -----------------------------------------------------------------------------------
READY = Gauge("syncd_ready", "1 when /readyz answers 200", registry=REGISTRY)
