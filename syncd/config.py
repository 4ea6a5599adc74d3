"""Typed, frozen configuration, one dataclass per TOML section.

Loading order: built-in defaults <- TOML file <- `<key>_file` secrets (string keys only) <-
environment `SYNCD_<SECTION>__<KEY>`, whatever the order of the keys. Unknown sections or keys are
errors, and every error names the key.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import os
import re
import tomllib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote_plus

import orjson

from syncd.errors import ConfigError
from syncd.model import Destination
from syncd.vocabulary import Region

SECRET_KEYS = frozenset({"client_secret", "refresh_token", "sasl_password", "password"})
MAX_RECORDS_PER_POST = 6000
DAY_S = 86400.0
# the store's columns (syncd/store/schema.py); PostgreSQL refuses longer values
MAX_AUDIENCE_KEY = 256
MAX_CONNECTION_ID = 128
MAX_AUDIENCE_ID = 2**63 - 1  # a signed 64-bit integer: the store's BIGINT and every JSON encoder
_COUNTRY = re.compile(r"^[A-Z]{2}$")
_TOPIC = re.compile(r"[a-zA-Z0-9._-]{1,249}")  # Kafka's legal topic names (but "." and "..")


@dataclass(frozen=True)
class KafkaConfig:
    bootstrap_servers: str = "127.0.0.1:9092"
    topics: tuple[str, ...] = ("profile-changes",)
    group_id: str = "syncd"
    auto_offset_reset: str = "earliest"
    isolation_level: str = "read_committed"  # aborted transactional writes are never synced
    input_format: str = "canonical"
    dead_letter_topic: str = ""
    client_id: str = "syncd"
    security_protocol: str = "PLAINTEXT"
    sasl_mechanism: str = ""
    sasl_username: str = ""
    sasl_password: str = ""
    ssl_cafile: str = ""
    ssl_certfile: str = ""
    ssl_keyfile: str = ""
    max_pending_events: int = 20000  # backpressure: stop reading at this many open events
    commit_interval_ms: int = 1000
    max_message_bytes: int = 1_000_000  # larger messages are dead-lettered unread


@dataclass(frozen=True)
class AmazonConfig:
    region: str = Region.NA.value
    client_id: str = ""
    client_secret: str = ""
    refresh_token: str = ""
    api_url: str = ""
    token_url: str = ""
    request_timeout_s: float = 30.0
    max_attempts: int = 8
    max_retry_time_s: float = 300.0
    backoff_base_s: float = 0.5
    backoff_max_s: float = 60.0
    # record POSTs in flight per connection. Two keep a connection at its budget (15M records
    # per hour: ~4,200/s) while a POST of ~3,000 records takes up to ~1.4 s; each POST in
    # flight holds ~10 MB (its claims and its body)
    max_concurrency: int = 2
    target_types: tuple[str, ...] = ()  # e.g. ["DSP"]; AMC is always included

    @property
    def post_flight_s(self) -> float:
        """The longest a records POST stays in flight: its retries and the last attempt's own
        timeout. Its budget reservation, until answered, counts this long (the budget's hold)."""
        return self.max_retry_time_s + self.request_timeout_s


@dataclass(frozen=True)
class StoreConfig:
    url: str = "sqlite+aiosqlite:///syncd.db"
    auto_upgrade: bool = False  # `syncd run` applies migrations itself instead of refusing
    # PostgreSQL: a statement unanswered this long fails (retried on a new connection), so a
    # connection that went silent (a failover, a NAT that forgot it) is given up
    statement_timeout_s: float = 60.0


@dataclass(frozen=True)
class BatchConfig:
    max_records: int = MAX_RECORDS_PER_POST
    max_bytes: int = 4_000_000
    linger_ms: int = 2000


@dataclass(frozen=True)
class BudgetConfig:
    records_per_hour: int = 15_000_000
    window_seconds: int = 3600


@dataclass(frozen=True)
class PollConfig:
    first_delay_s: float = 30.0
    max_interval_s: float = 600.0
    max_job_age_s: float = 7 * 86400.0
    concurrency: int = 4
    claim_batch: int = 50
    retention_days: float = 7.0  # terminal jobs are deleted from the store this long after


@dataclass(frozen=True)
class MembersConfig:
    """[members]: the member table's upkeep (syncd/audiences.py)."""

    refresh_at: float = 0.8  # re-send a member after this fraction of its audience's ttl; 0 = never
    tombstone_days: float = 30.0  # how long an erased member's tombstone is kept once recorded


@dataclass(frozen=True)
class HttpConfig:
    listen: str = "0.0.0.0:9108"

    @property
    def address(self) -> tuple[str, int]:
        """`listen` as (host, port); an IPv6 host loses its brackets."""
        host, _, port = self.listen.rpartition(":")
        return host.strip("[]"), int(port)


@dataclass(frozen=True)
class PiiConfig:
    strict_reference: bool = False  # AWS reference parity: deviations D2..D8 off


@dataclass(frozen=True)
class TransformConfig:
    workers: int = 1  # processes that decode and hash; 0 = on the event loop


@dataclass(frozen=True)
class ShutdownConfig:
    drain_seconds: float = 25.0


@dataclass(frozen=True)
class LogConfig:
    level: str = "info"


@dataclass(frozen=True)
class Config:
    kafka: KafkaConfig = field(default_factory=KafkaConfig)
    amazon: AmazonConfig = field(default_factory=AmazonConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    batch: BatchConfig = field(default_factory=BatchConfig)
    budget: BudgetConfig = field(default_factory=BudgetConfig)
    poll: PollConfig = field(default_factory=PollConfig)
    members: MembersConfig = field(default_factory=MembersConfig)
    http: HttpConfig = field(default_factory=HttpConfig)
    pii: PiiConfig = field(default_factory=PiiConfig)
    transform: TransformConfig = field(default_factory=TransformConfig)
    shutdown: ShutdownConfig = field(default_factory=ShutdownConfig)
    log: LogConfig = field(default_factory=LogConfig)
    destinations: tuple[Destination, ...] = ()


_SECTIONS: dict[str, type[Any]] = {
    f.name: typing.get_type_hints(Config)[f.name]
    for f in dataclasses.fields(Config)
    if f.name != "destinations"
}


# ---------------------------------------------------------------------------------------------
# loading


def load(path: str | Path | None, environ: Mapping[str, str] | None = None) -> Config:
    """Load and validate a config file (None = defaults only), then apply env overrides."""
    raw: dict[str, Any] = {}
    if path is not None:
        try:
            raw = tomllib.loads(_read_text("--config", path))
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError("--config", f"not valid TOML: {exc}") from None
    return from_mapping(raw, os.environ if environ is None else environ)


def from_mapping(raw: Mapping[str, Any], environ: Mapping[str, str] | None = None) -> Config:
    raw = {k: (dict(v) if isinstance(v, Mapping) else v) for k, v in raw.items()}
    _apply_env(raw, environ or {})
    for key in raw:
        if key not in _SECTIONS and key != "destinations":
            raise ConfigError(
                key, f"unknown section (known: {', '.join([*_SECTIONS, 'destinations'])})"
            )
    sections: dict[str, Any] = {}
    for name, cls in _SECTIONS.items():
        value = raw.get(name, {})
        if not isinstance(value, Mapping):
            raise ConfigError(name, "must be a table")
        sections[name] = _build_section(name, cls, value)
    cfg = Config(**sections, destinations=_build_destinations(raw.get("destinations", [])))
    _validate(cfg)
    return _effective(cfg)


def _apply_env(raw: dict[str, Any], environ: Mapping[str, str]) -> None:
    for var, text in environ.items():
        if not var.startswith("SYNCD_") or "__" not in var:
            continue
        section, _, key = var[len("SYNCD_") :].lower().partition("__")
        if section == "destinations":
            try:
                raw["destinations"] = orjson.loads(text) if key == "json" else None
            except orjson.JSONDecodeError as exc:
                raise ConfigError(var, f"not valid JSON: {exc}") from None
            if raw["destinations"] is None:
                raise ConfigError(var, "use SYNCD_DESTINATIONS__JSON='[{...}]'")
            continue
        if section not in _SECTIONS:
            raise ConfigError(var, f"unknown section {section!r}")
        raw.setdefault(section, {})
        if not isinstance(raw[section], dict):
            raise ConfigError(section, "must be a table")
        raw[section][key] = _EnvText(text)


class _EnvText(str):
    """A value that came from the environment: converted to the field's type when built."""


def _build_section(name: str, cls: type[Any], values: Mapping[str, Any]) -> Any:
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    files: dict[str, Any] = {}
    for key, value in values.items():
        target = key.removesuffix("_file")
        if target != key and target in hints:
            files[target] = value
        elif key in hints:
            kwargs[key] = _coerce(f"{name}.{key}", hints[key], value)
        else:
            raise ConfigError(f"{name}.{key}", f"unknown key (known: {', '.join(sorted(hints))})")
    for key, path in files.items():
        kwargs[key] = _from_file(name, key, hints[key], values.get(key, ""), path)
    return cls(**kwargs)


def _from_file(section: str, key: str, hint: Any, value: Any, path: Any) -> Any:
    """`<key>_file`, given beside `value` (the key's own, "" if unset). Precedence: an inline
    TOML value < the file < an environment override; an empty value is a placeholder."""
    if hint is not str:
        raise ConfigError(f"{section}.{key}_file", "only a string key can be read from a file")
    if value and isinstance(value, _EnvText) == isinstance(path, _EnvText):
        raise ConfigError(f"{section}.{key}", f"is given both inline and by {key}_file")
    if value and isinstance(value, _EnvText):
        return str(value)
    return _read_secret_file(f"{section}.{key}_file", path)


def _read_secret_file(key: str, value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise ConfigError(key, "must be a file path")
    return _read_text(key, value).strip()


def _read_bytes(key: str, path: str | Path) -> bytes:
    """The file named by `key`; a ConfigError naming `key` if it cannot be read."""
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(key, f"cannot read {path}: {exc.strerror}") from None


def _read_text(key: str, path: str | Path) -> str:
    """A UTF-8 text file (a byte order mark is dropped); a ConfigError naming `key` if not."""
    try:
        return _read_bytes(key, path).decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ConfigError(
            key, f"{path} is not UTF-8 text ({exc.reason} at byte {exc.start})"
        ) from None


def _coerce(key: str, hint: Any, value: Any) -> Any:
    from_env = isinstance(value, _EnvText)
    if hint is bool:
        if from_env:
            low = value.strip().lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
        if isinstance(value, bool):
            return value
        raise ConfigError(key, f"must be true or false, got {_show(key, value)}")
    if hint is int:
        if from_env:
            try:
                return int(value.strip())
            except ValueError:
                pass
        elif isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(key, f"must be an integer, got {_show(key, value)}")
    if hint is float:  # never inf or nan: a duration or a fraction is finite
        number: float | None = None
        if from_env:
            with contextlib.suppress(ValueError):
                number = float(value.strip())
        elif isinstance(value, int | float) and not isinstance(value, bool):
            number = float(value)
        if number is not None and math.isfinite(number):
            return number
        raise ConfigError(key, f"must be a finite number, got {_show(key, value)}")
    if hint is str:
        if isinstance(value, str):
            return str(value)
        raise ConfigError(key, f"must be a string, got {_show(key, value)}")
    if typing.get_origin(hint) is tuple:
        if from_env:
            text = value.strip()
            try:
                items: Any = orjson.loads(text) if text.startswith("[") else text.split(",")
            except orjson.JSONDecodeError:
                raise ConfigError(
                    key,
                    "must be a JSON list of strings or a comma-separated list, "
                    f"got {_show(key, value)}",
                ) from None
            if isinstance(items, list):
                value = [i.strip() if isinstance(i, str) else i for i in items if i != ""]
        if isinstance(value, list) and all(isinstance(i, str) for i in value):
            return tuple(value)
        raise ConfigError(key, f"must be a list of strings, got {_show(key, value)}")
    if isinstance(hint, types.UnionType):  # pragma: no cover - no optional fields today
        return value
    raise ConfigError(key, f"unsupported type {hint!r}")  # pragma: no cover


def _as_id(value: Any) -> int | None:
    """`value` (an integer, or a string of ASCII digits) as an Amazon id, 1..MAX_AUDIENCE_ID;
    None if it is not one."""
    if isinstance(value, str) and value.isascii() and value.isdigit():
        value = int(value)
    if isinstance(value, int) and not isinstance(value, bool) and 0 < value <= MAX_AUDIENCE_ID:
        return value
    return None


def amazon_id(text: str) -> int:
    """An audience or advertiser id given on the command line (an argparse type): the range
    `destinations[].audience_id` allows."""
    if (value := _as_id(text)) is None:
        raise argparse.ArgumentTypeError(
            f"must be a positive integer up to {MAX_AUDIENCE_ID}, got {text!r}"
        )
    return value


def _show(key: str, value: Any) -> str:
    if key.rsplit(".", 1)[-1] in SECRET_KEYS:
        return f"a {type(value).__name__}"
    return mask_urls(repr(value) if not isinstance(value, _EnvText) else repr(str(value)))


CONSENT_POLICIES = ("pass", "strict")


def _build_destinations(items: Any) -> tuple[Destination, ...]:
    if not isinstance(items, list):
        raise ConfigError("destinations", "must be an array of tables ([[destinations]])")
    out: list[Destination] = []
    seen: set[str] = set()
    for i, item in enumerate(items):
        where = f"destinations[{i}]"
        if not isinstance(item, Mapping):
            raise ConfigError(where, "must be a table")
        unknown = set(item) - {
            "audience",
            "connection_id",
            "audience_id",
            "country_code",
            "paused",
            "consent_policy",
        }
        if unknown:
            raise ConfigError(f"{where}.{sorted(unknown)[0]}", "unknown key")
        for req in ("audience", "connection_id", "audience_id"):
            if req not in item:
                raise ConfigError(f"{where}.{req}", "is required")
        audience, conn = item["audience"], item["connection_id"]
        if not isinstance(audience, str) or not audience:
            raise ConfigError(f"{where}.audience", "must be a non-empty string")
        if len(audience) > MAX_AUDIENCE_KEY:  # the store's column (jobs.audience)
            raise ConfigError(f"{where}.audience", f"must be at most {MAX_AUDIENCE_KEY} characters")
        if audience in seen:
            raise ConfigError(f"{where}.audience", f"duplicate audience key {audience!r}")
        seen.add(audience)
        if not isinstance(conn, str) or not conn:
            raise ConfigError(f"{where}.connection_id", "must be a non-empty string")
        if len(conn) > MAX_CONNECTION_ID:  # the store's columns (jobs, budget, blocked)
            raise ConfigError(
                f"{where}.connection_id", f"must be at most {MAX_CONNECTION_ID} characters"
            )
        audience_id = _as_id(item["audience_id"])
        if audience_id is None:
            raise ConfigError(
                f"{where}.audience_id", f"must be a positive integer up to {MAX_AUDIENCE_ID}"
            )
        country = item.get("country_code", "US")
        if not isinstance(country, str) or not _COUNTRY.fullmatch(country.upper()):
            raise ConfigError(f"{where}.country_code", "must be an ISO 3166-1 alpha-2 code")
        country = country.upper()
        paused = _coerce(f"{where}.paused", bool, item.get("paused", False))
        consent_policy = item.get("consent_policy", "pass")
        if consent_policy not in CONSENT_POLICIES:
            raise ConfigError(f"{where}.consent_policy", 'must be "pass" or "strict"')
        out.append(
            Destination(
                audience=audience,
                connection_id=conn,
                audience_id=audience_id,
                country_code="GB" if country == "UK" else country,
                paused=paused,
                consent_policy=consent_policy,
            )
        )
    _same_pause_per_audience(out)
    return tuple(out)


def _same_pause_per_audience(destinations: list[Destination]) -> None:
    """Members are kept per audience_id: destinations naming one audience_id pause together,
    and name one connection (an audience belongs to one; each connection's feed claims the
    members of every audience_id it names)."""
    paused: dict[int, Destination] = {}
    for i, dest in enumerate(destinations):
        first = paused.setdefault(dest.audience_id, dest)
        if first.connection_id != dest.connection_id:
            raise ConfigError(
                f"destinations[{i}].connection_id",
                f"must equal destination {first.audience!r}'s ({first.connection_id}): both "
                f"name audience_id {dest.audience_id}, which belongs to one connection",
            )
        if first.paused != dest.paused:
            raise ConfigError(
                f"destinations[{i}].paused",
                f"must equal destination {first.audience!r}'s: both name audience_id "
                f"{dest.audience_id}, whose members are paused or sent together",
            )


def _topic_name(name: str) -> bool:
    """A name Kafka takes for a topic: any other is never found (a consumer subscribed to it
    idles, a producer waits for it in vain)."""
    return _TOPIC.fullmatch(name) is not None and name not in (".", "..")


# poll.max_job_age_s's least: a job is expired (its members sent again) only after this
MIN_JOB_AGE_S = 3600.0


def _validate(cfg: Config) -> None:
    def need(ok: bool, key: str, problem: str) -> None:
        if not ok:
            raise ConfigError(key, problem)

    k, a, b = cfg.kafka, cfg.amazon, cfg.batch
    need(
        all(s.strip() for s in k.bootstrap_servers.split(",")),
        "kafka.bootstrap_servers",
        "must be HOST:PORT[,HOST:PORT...], none blank",
    )
    need(
        bool(k.topics) and all(t.strip() for t in k.topics),
        "kafka.topics",
        "must name at least one topic, none blank",
    )
    bad_topic = next((t for t in k.topics if not _topic_name(t)), None)
    need(
        bad_topic is None,
        "kafka.topics",
        f"{bad_topic!r} is not a Kafka topic name: 1 to 249 of a-z A-Z 0-9 . _ -, not '.' or '..'",
    )
    need(
        not k.dead_letter_topic or _topic_name(k.dead_letter_topic),
        "kafka.dead_letter_topic",
        "must be a Kafka topic name (1 to 249 of a-z A-Z 0-9 . _ -, not '.' or '..') or empty",
    )
    need(
        k.dead_letter_topic not in k.topics,
        "kafka.dead_letter_topic",
        "must not be one of kafka.topics: syncd would read its own dead letters back and "
        "dead-letter them again, for ever",
    )
    need(
        bool(k.group_id),
        "kafka.group_id",
        "must not be empty: Kafka refuses an empty group id (since 2.2, KIP-289)",
    )
    need(
        k.auto_offset_reset in ("earliest", "latest"),
        "kafka.auto_offset_reset",
        "must be 'earliest' or 'latest'",
    )
    need(
        k.isolation_level in ("read_committed", "read_uncommitted"),
        "kafka.isolation_level",
        "must be 'read_committed' or 'read_uncommitted'",
    )
    need(
        k.input_format in ("canonical", "segment"),
        "kafka.input_format",
        "must be 'canonical' or 'segment'",
    )
    need(
        k.security_protocol in ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"),
        "kafka.security_protocol",
        "must be PLAINTEXT, SSL, SASL_PLAINTEXT or SASL_SSL",
    )
    need(
        k.sasl_mechanism in ("", "PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"),
        "kafka.sasl_mechanism",
        "must be PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512",
    )
    need(k.max_pending_events >= 1, "kafka.max_pending_events", "must be >= 1")
    need(k.commit_interval_ms >= 1, "kafka.commit_interval_ms", "must be >= 1")
    need(k.max_message_bytes >= 1, "kafka.max_message_bytes", "must be >= 1")
    if k.security_protocol in ("SSL", "SASL_SSL"):  # the files syncd/source/connection.py opens
        for key in ("ssl_cafile", "ssl_certfile", "ssl_keyfile"):
            if getattr(k, key):
                _read_bytes(f"kafka.{key}", getattr(k, key))
    need(a.region in tuple(Region), "amazon.region", f"must be one of {', '.join(Region)}")
    for key in ("request_timeout_s", "max_retry_time_s"):
        need(0 < getattr(a, key) <= DAY_S, f"amazon.{key}", f"must be > 0 and at most {DAY_S:g}")
    need(a.backoff_base_s > 0, "amazon.backoff_base_s", "must be > 0")
    need(
        a.backoff_max_s >= a.backoff_base_s,
        "amazon.backoff_max_s",
        "must be >= amazon.backoff_base_s",
    )
    need(a.max_attempts >= 1, "amazon.max_attempts", "must be >= 1")
    need(a.max_concurrency >= 1, "amazon.max_concurrency", "must be >= 1")
    need(
        all(t in ("DSP",) for t in a.target_types),
        "amazon.target_types",
        "may only contain 'DSP' (AMC is always included)",
    )
    need(
        cfg.store.url.startswith(("sqlite+aiosqlite://", "postgresql+asyncpg://")),
        "store.url",
        "must start with sqlite+aiosqlite:// or postgresql+asyncpg://",
    )
    problem = _store_url_problem(cfg.store.url)
    need(problem is None, "store.url", problem or "")
    need(
        0 < cfg.store.statement_timeout_s <= DAY_S,
        "store.statement_timeout_s",
        f"must be > 0 and at most {DAY_S:g}",
    )
    need(
        1 <= b.max_records <= MAX_RECORDS_PER_POST,
        "batch.max_records",
        f"must be between 1 and {MAX_RECORDS_PER_POST}",
    )
    need(b.max_bytes >= 10_000, "batch.max_bytes", "must be >= 10000")
    need(b.linger_ms >= 0, "batch.linger_ms", "must be >= 0")
    need(cfg.budget.records_per_hour >= 1, "budget.records_per_hour", "must be >= 1")
    need(cfg.budget.window_seconds >= 1, "budget.window_seconds", "must be >= 1")
    need(
        cfg.poll.first_delay_s > 0,
        "poll.first_delay_s",
        "must be > 0: the interval between a job's GETs doubles from it, and from 0 it would "
        "stay 0 (each pending job polled again at once, for as long as it runs)",
    )
    need(
        cfg.poll.max_interval_s >= cfg.poll.first_delay_s,
        "poll.max_interval_s",
        "must be >= poll.first_delay_s",
    )
    need(
        cfg.poll.max_job_age_s >= MIN_JOB_AGE_S,
        "poll.max_job_age_s",
        f"must be >= {MIN_JOB_AGE_S:.0f}: Amazon may take an hour on a job, and one given up "
        "sooner has its members sent again, each time",
    )
    need(cfg.poll.concurrency >= 1, "poll.concurrency", "must be >= 1")
    need(cfg.poll.claim_batch >= 1, "poll.claim_batch", "must be >= 1")
    need(cfg.poll.retention_days > 0, "poll.retention_days", "must be a number of days > 0")
    need(
        cfg.members.refresh_at == 0 or 0 < cfg.members.refresh_at < 1,
        "members.refresh_at",
        "must be 0 (never refresh) or a fraction of the ttl between 0 and 1 (exclusive)",
    )
    need(cfg.members.tombstone_days > 0, "members.tombstone_days", "must be a number of days > 0")
    host, sep, port = cfg.http.listen.rpartition(":")
    need(
        bool(sep) and bool(host) and port.isascii() and port.isdigit() and int(port) < 65536,
        "http.listen",
        "must be HOST:PORT",
    )
    need(0 <= cfg.transform.workers <= 64, "transform.workers", "must be between 0 and 64")
    need(cfg.shutdown.drain_seconds >= 0, "shutdown.drain_seconds", "must be >= 0")
    need(
        cfg.log.level in ("debug", "info", "warning", "error"),
        "log.level",
        "must be debug, info, warning or error",
    )


def _store_url_problem(url: str) -> str | None:
    """Why `url` (of a known scheme) opens no store syncd can keep its state in; None if it
    does. SQLAlchemy parses it only when the store is first used: a port that is no number
    would be a traceback then, one out of range an OverflowError of the socket; an SQLite
    database in memory (or a temporary file: no name) is gone with its connection, and with it
    the members, jobs and budget reservations of every event whose offset was committed."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        parsed = make_url(url)
        port = parsed.port
    except (ArgumentError, ValueError) as exc:
        return mask_urls(f"is not a URL SQLAlchemy can read ({exc})")
    if port is not None and not 0 < port < 65536:
        return f"port {port} is not between 1 and 65535"
    postgresql = parsed.drivername.startswith("postgresql")
    if postgresql and (unknown := sorted(set(parsed.query) - _asyncpg_parameters())):
        return (
            f"query parameters {', '.join(map(repr, unknown))} are not ones asyncpg takes "
            "(SQLAlchemy passes each to asyncpg.connect); TLS is ?ssl=require or "
            "?ssl=verify-full (not libpq's sslmode)"
        )
    if parsed.drivername.startswith("sqlite"):
        database = parsed.database or ""
        if not database or ":memory:" in database or parsed.query.get("mode") == "memory":
            return (
                "names an SQLite database in memory (or a temporary one): its members, jobs and "
                "budget would be lost at each restart; name a file, e.g. "
                "sqlite+aiosqlite:///syncd.db"
            )
    return None


def _asyncpg_parameters() -> set[str]:
    """Names a PostgreSQL store URL's query may hold: asyncpg.connect's keyword arguments that a
    text can carry, and the statement cache size SQLAlchemy's dialect takes for itself."""
    import inspect

    import asyncpg

    taken = set(inspect.signature(asyncpg.connect).parameters)
    taken -= {"dsn", "loop", "connection_class", "record_class", "server_settings"}
    return taken | {"prepared_statement_cache_size"}


def _effective(cfg: Config) -> Config:
    """The settings as they work together: a POST never holds more records than one budget
    window allows (such a batch could never be sent), so a budget below `batch.max_records`
    lowers it. `check-config` prints the result."""
    if cfg.batch.max_records <= cfg.budget.records_per_hour:
        return cfg
    batch = dataclasses.replace(cfg.batch, max_records=cfg.budget.records_per_hour)
    return dataclasses.replace(cfg, batch=batch)


def require_credentials(cfg: Config) -> None:
    """For commands that talk to Amazon: the three LwA credentials must be set."""
    for key in ("client_id", "client_secret", "refresh_token"):
        if not getattr(cfg.amazon, key):
            raise ConfigError(
                f"amazon.{key}",
                f"is required (or set it via SYNCD_AMAZON__{key.upper()} or {key}_file)",
            )


def require_destinations(cfg: Config) -> None:
    if not cfg.destinations:
        raise ConfigError("destinations", "at least one [[destinations]] entry is required")


def masked(cfg: Config) -> dict[str, Any]:
    """The effective config as plain data, every secret replaced by '***' (or '' if unset)."""

    def conv(obj: Any) -> Any:
        if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
            return {
                f.name: ("***" if getattr(obj, f.name) else "")
                if f.name in SECRET_KEYS
                else conv(getattr(obj, f.name))
                for f in dataclasses.fields(obj)
            }
        if isinstance(obj, tuple):
            return [conv(i) for i in obj]
        return obj

    out: dict[str, Any] = conv(cfg)
    out["store"]["url"] = mask_urls(cfg.store.url)
    for key in ("api_url", "token_url"):  # a proxy's password, say
        out["amazon"][key] = mask_urls(getattr(cfg.amazon, key))
    return out


# A URL as SQLAlchemy parses a store URL (sqlalchemy.engine.url._parse_url), so that whatever it
# would hand the driver as a password is found; re.S: a secret never hides behind a newline.
_URL = re.compile(
    r"""[\w+]+://
    (?:[^:/]*(?::(?P<password>[^@]*))?@)?
    (?:(?:\[[^/?]+\]|[^/:?]+)?(?::[^/?]*)?)?
    (?:/[^?]*)?
    (?:\?(?P<query>.*))?""",
    re.X | re.S,
)
_URL_START = re.compile(r"[\w+]+://")
_SECRET_PARAM = re.compile(r"pass|pwd|secret|token", re.I)  # password, sslpassword, passwd...


def mask_urls(text: str) -> str:
    """`text` (a URL, a log line, an error message) with every URL secret replaced by '***':
    userinfo passwords and the values of password-like query parameters (`?password=`,
    `?sslpassword=`...). Each URL runs to the end of the text, so a URL nested in another's
    password or query is masked too; too much text masked is better than a secret shown."""
    pos = 0
    while start := _URL_START.search(text, pos):
        text = text[: start.start()] + _mask_url(text[start.start() :])
        pos = start.end()
    return text


def _mask_url(url: str) -> str:
    match = _URL.match(url)
    assert match is not None  # every group is optional after the scheme, which matched
    if match["query"] is not None:
        params = url[match.start("query") :].split("&")  # parse_qsl's separator
        url = url[: match.start("query")] + "&".join(map(_mask_param, params))
    if match["password"]:  # an empty password hides nothing
        url = url[: match.start("password")] + "***" + url[match.end("password") :]
    return url


def _mask_param(param: str) -> str:
    name, _, value = param.partition("=")
    return f"{name}=***" if value and _SECRET_PARAM.search(unquote_plus(name)) else param
