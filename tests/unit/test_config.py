import dataclasses
import re
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from syncd import config
from syncd.errors import ConfigError

DEST = {"audience": "vip", "connection_id": "c-1", "audience_id": 413642381039213536}


def test_defaults_match_the_contract() -> None:
    cfg = config.from_mapping({})
    assert cfg.kafka.bootstrap_servers == "127.0.0.1:9092"
    assert cfg.kafka.topics == ("profile-changes",)
    assert cfg.batch.max_records == 6000
    assert cfg.budget.records_per_hour == 15_000_000
    assert cfg.store.url == "sqlite+aiosqlite:///syncd.db"
    assert cfg.http.listen == "0.0.0.0:9108"
    assert cfg.poll.retention_days == 7


def test_a_destination_sends_unless_paused() -> None:
    cfg = config.from_mapping(
        {"destinations": [DEST, {**DEST, "audience": "lapsed", "audience_id": 2, "paused": True}]}
    )
    assert [d.paused for d in cfg.destinations] == [False, True]
    env = {
        "SYNCD_DESTINATIONS__JSON": '[{"audience": "v", "connection_id": "c", '
        '"audience_id": 1, "paused": true}]'
    }
    assert config.from_mapping({}, env).destinations[0].paused


def test_destinations_of_one_audience_id_pause_together() -> None:
    """Members are kept per audience_id: one key paused and another sending is not possible."""
    with pytest.raises(ConfigError, match=r"destinations\[1\]\.paused.*'vip'"):
        config.from_mapping({"destinations": [DEST, {**DEST, "audience": "gold", "paused": True}]})


def test_destinations_of_one_audience_id_name_one_connection() -> None:
    """An audience belongs to one connection, and its members are claimed by audience_id: two
    connections naming it would each claim and send the other destination's members (under a
    connection Amazon does not tie the audience to, charged to its budget)."""
    other = {**DEST, "audience": "gold", "connection_id": "c-2", "country_code": "DE"}
    with pytest.raises(ConfigError, match=r"destinations\[1\]\.connection_id.*'vip'") as err:
        config.from_mapping({"destinations": [DEST, other]})
    assert "c-1" in str(err.value)
    shared = config.from_mapping({"destinations": [DEST, {**other, "connection_id": "c-1"}]})
    assert [d.country_code for d in shared.destinations] == ["US", "DE"]


def test_consent_policy_is_pass_unless_strict_is_asked_for() -> None:
    cfg = config.from_mapping(
        {"destinations": [DEST, {**DEST, "audience": "eu", "consent_policy": "strict"}]}
    )
    assert [d.consent_policy for d in cfg.destinations] == ["pass", "strict"]


def test_audience_id_keeps_all_18_digits() -> None:
    cfg = config.from_mapping({"destinations": [DEST]})
    assert cfg.destinations[0].audience_id == 413642381039213536


@pytest.mark.parametrize(
    ("raw", "key"),
    [
        ({"batch": {"max_recordz": 1}}, "batch.max_recordz"),
        ({"batch": {"max_records": 6001}}, "batch.max_records"),
        ({"batch": {"max_records": "10"}}, "batch.max_records"),
        ({"nope": {}}, "nope"),
        ({"amazon": {"region": "XX"}}, "amazon.region"),
        ({"store": {"url": "mysql://x"}}, "store.url"),
        ({"destinations": [{**DEST, "country_code": "USA"}]}, "destinations[0].country_code"),
        ({"destinations": [{**DEST, "country_code": "DE\n"}]}, "destinations[0].country_code"),
        ({"destinations": [{**DEST, "colour": "red"}]}, "destinations[0].colour"),
        (
            {"destinations": [{**DEST, "consent_policy": "STRICT"}]},
            "destinations[0].consent_policy",
        ),
        ({"destinations": [{**DEST, "consent_policy": True}]}, "destinations[0].consent_policy"),
        ({"destinations": [{**DEST, "audience_id": 2**64}]}, "destinations[0].audience_id"),
        ({"destinations": [{**DEST, "audience_id": 2**63}]}, "destinations[0].audience_id"),
        ({"destinations": [{**DEST, "audience_id": "\u00b2"}]}, "destinations[0].audience_id"),
        ({"destinations": [{**DEST, "audience_id": "\u0661"}]}, "destinations[0].audience_id"),
        ({"destinations": [DEST, DEST]}, "destinations[1].audience"),
        ({"destinations": [{**DEST, "paused": "yes"}]}, "destinations[0].paused"),
        ({"destinations": [{**DEST, "paused": 1}]}, "destinations[0].paused"),
        ({"poll": {"retention_days": 0}}, "poll.retention_days"),
        ({"poll": {"retention_days": float("nan")}}, "poll.retention_days"),
        ({"poll": {"retention_days": float("inf")}}, "poll.retention_days"),
        ({"http": {"listen": "0.0.0.0:\u00b2"}}, "http.listen"),
        ({"kafka": {"max_message_bytes": 0}}, "kafka.max_message_bytes"),
        ({"kafka": {"topics": ["a", ""]}}, "kafka.topics"),
        ({"kafka": {"topics": [" "]}}, "kafka.topics"),
        ({"kafka": {"group_id": ""}}, "kafka.group_id"),
        ({"destinations": [{**DEST, "audience": "a" * 257}]}, "destinations[0].audience"),
        ({"destinations": [{**DEST, "connection_id": "c" * 129}]}, "destinations[0].connection_id"),
        ({"kafka": {"bootstrap_servers": ""}}, "kafka.bootstrap_servers"),
        ({"kafka": {"bootstrap_servers": " "}}, "kafka.bootstrap_servers"),
        ({"kafka": {"bootstrap_servers": "a:9092,,b:9092"}}, "kafka.bootstrap_servers"),
    ],
)
def test_errors_name_the_key(raw: dict[str, object], key: str) -> None:
    with pytest.raises(ConfigError) as err:
        config.from_mapping(raw)
    assert err.value.key == key
    assert repr(key) in str(err.value)


@pytest.mark.parametrize(
    ("max_records", "records_per_hour", "effective"),
    [(6000, 100, 100), (6000, 6000, 6000), (50, 100, 50), (6000, 1, 1)],
)
def test_a_batch_never_holds_more_records_than_one_budget_window_allows(
    max_records: int, records_per_hour: int, effective: int
) -> None:
    raw = {
        "batch": {"max_records": max_records},
        "budget": {"records_per_hour": records_per_hour},
    }
    cfg = config.from_mapping(raw)
    assert cfg.batch.max_records == effective
    assert config.masked(cfg)["batch"]["max_records"] == effective  # what check-config prints
    assert cfg.budget.records_per_hour == records_per_hour


def test_env_overrides_convert_to_the_field_type() -> None:
    env = {
        "SYNCD_BATCH__MAX_RECORDS": "100",
        "SYNCD_KAFKA__TOPICS": "a,b",
        "SYNCD_PII__STRICT_REFERENCE": "true",
        "SYNCD_AMAZON__CLIENT_SECRET": "s3cret",
    }
    cfg = config.from_mapping({"batch": {"max_records": 10}}, env)
    assert cfg.batch.max_records == 100
    assert cfg.kafka.topics == ("a", "b")
    assert cfg.pii.strict_reference is True
    assert cfg.amazon.client_secret == "s3cret"


def test_env_override_with_bad_value_names_the_key() -> None:
    with pytest.raises(ConfigError, match=r"batch\.max_records"):
        config.from_mapping({}, {"SYNCD_BATCH__MAX_RECORDS": "many"})


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("SYNCD_KAFKA__TOPICS", "["),
        ("SYNCD_KAFKA__TOPICS", '["a", 1]'),
        ("SYNCD_KAFKA__TOPICS", '["a"'),
        ("SYNCD_AMAZON__TARGET_TYPES", "[DSP]"),
    ],
)
def test_env_override_with_a_bad_list_names_the_key(name: str, value: str) -> None:
    key = name.removeprefix("SYNCD_").lower().replace("__", ".")
    with pytest.raises(ConfigError, match=re.escape(key)):
        config.from_mapping({}, {name: value})


def test_secret_file_and_masking(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_text("top-secret-value\n")
    cfg = config.from_mapping(
        {
            "amazon": {"client_secret_file": str(secret)},
            "store": {"url": "postgresql+asyncpg://u:hunter2@db/syncd"},
        }
    )
    assert cfg.amazon.client_secret == "top-secret-value"
    dump = repr(config.masked(cfg))
    assert "top-secret-value" not in dump
    assert "hunter2" not in dump
    assert config.masked(cfg)["amazon"]["client_secret"] == "***"


def test_unreadable_secret_file_names_the_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"amazon\.refresh_token_file"):
        config.from_mapping({"amazon": {"refresh_token_file": str(tmp_path / "missing")}})


def test_example_config_documents_every_key_and_loads() -> None:
    import dataclasses
    import tomllib

    path = Path(__file__).parents[2] / "config.example.toml"
    raw = tomllib.loads(path.read_text())
    cfg = config.load(path, environ={})
    for f in dataclasses.fields(cfg):
        if f.name == "destinations":
            assert raw["destinations"]
            continue
        section = getattr(cfg, f.name)
        documented = set(raw.get(f.name, {}))
        assert documented == {k.name for k in dataclasses.fields(section)}, f.name


def test_postgresql_tls_is_set_in_the_store_url() -> None:
    """TLS to PostgreSQL: asyncpg's `ssl` mode travels in `store.url` (`?ssl=verify-full`)."""
    from sqlalchemy.ext.asyncio import create_async_engine

    cfg = config.from_mapping({"store": {"url": "postgresql+asyncpg://u:p@db/syncd?ssl=require"}})
    engine = create_async_engine(cfg.store.url)
    _, kwargs = engine.dialect.create_connect_args(engine.url)
    assert kwargs["ssl"] == "require"


# -- secrets in URLs --------------------------------------------------------------------------
URL_CHARS = "abcAB09:/?&=@%#+[]._-~;' "
SECRET_PARAMS = ("password", "sslpassword", "PASSWORD", "pass%77ord", "ssl+password", "pwd")
url_part = st.text(alphabet=URL_CHARS, max_size=12)
query_name = st.one_of(st.sampled_from(SECRET_PARAMS), st.text(alphabet="abc_%+", max_size=6))


def secret_param(name: str) -> bool:
    """The rule, in its own words: a parameter whose (decoded) name holds 'pass', 'pwd',
    'secret' or 'token', in any case."""
    low = name.lower()
    return any(word in low for word in ("pass", "pwd", "secret", "token"))


@settings(max_examples=400)
@given(
    scheme=st.sampled_from(["postgresql+asyncpg", "sqlite+aiosqlite", "x"]),
    user=url_part,
    password=st.none() | url_part,
    host=url_part,
    database=url_part,
    query=st.lists(st.tuples(query_name, url_part), max_size=4),
)
def test_mask_urls_leaves_no_secret_sqlalchemy_would_read(
    scheme: str,
    user: str,
    password: str | None,
    host: str,
    database: str,
    query: list[tuple[str, str]],
) -> None:
    """SQLAlchemy parses the store URL: whatever it would take for the password or a
    password-like parameter reads '***' after masking; everything else parses unchanged."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    userinfo = user + (f":{password}" if password is not None else "") + "@"
    url = f"{scheme}://{userinfo}{host}/{database}"
    if query:
        url += "?" + "&".join(f"{k}={v}" for k, v in query)
    try:
        before = make_url(url)
    except (ArgumentError, ValueError):  # not a URL SQLAlchemy (hence syncd) could use
        return
    after = make_url(config.mask_urls(url))
    assert after.password == ("***" if before.password else before.password)
    assert (after.password is None) == (before.password is None)
    for name, value in after.query.items():
        if secret_param(name):
            assert set(value if isinstance(value, tuple) else [value]) == {"***"}, name
    visible = {k: v for k, v in after.query.items() if not secret_param(k)}
    assert visible == {k: v for k, v in before.query.items() if not secret_param(k)}
    assert set(after.query) == set(before.query)
    for part in ("drivername", "username", "host", "port", "database"):
        value = getattr(before, part)
        if not (isinstance(value, str) and "://" in value):  # a nested URL is masked too
            assert getattr(after, part) == value, part


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        (
            "postgresql+asyncpg://u:pw@h/db?password=secret",
            "postgresql+asyncpg://u:***@h/db?password=***",
        ),
        (
            "postgresql+asyncpg://u@h/db?ssl=verify-full&sslpassword=secret&x=1",
            "postgresql+asyncpg://u@h/db?ssl=verify-full&sslpassword=***&x=1",
        ),
        ("sqlite+aiosqlite:///syncd.db", "sqlite+aiosqlite:///syncd.db"),
        (
            "error=OSError('postgresql+asyncpg://u:p@ss@h/db') and x://v:secret@w",
            "error=OSError('postgresql+asyncpg://u:***@ss@h/db') and x://v:***@w",
        ),
        (  # a URL inside the query of another one
            "a://h/db?next=b://u:secret@h",
            "a://h/db?next=b://u:***@h",
        ),
    ],
)
def test_mask_urls_examples(text: str, shown: str) -> None:
    assert config.mask_urls(text) == shown


def test_check_config_masks_query_passwords() -> None:
    cfg = config.from_mapping(
        {"store": {"url": "postgresql+asyncpg://u:hunter2@h/db?password=s3kr1t&ssl=require"}}
    )
    dump = repr(config.masked(cfg))
    for secret in ("hunter2", "s3kr1t"):
        assert secret not in dump
    assert config.masked(cfg)["store"]["url"] == (
        "postgresql+asyncpg://u:***@h/db?password=***&ssl=require"
    )


@pytest.mark.parametrize("key", ["api_url", "token_url"])
def test_check_config_masks_secrets_in_amazon_urls(key: str) -> None:
    """A proxy's password or a token in Amazon's URLs is a secret like the store's."""
    cfg = config.from_mapping(
        {}, {f"SYNCD_AMAZON__{key.upper()}": "https://user:hunter2@proxy.example/x?token=abc"}
    )
    shown = config.masked(cfg)["amazon"][key]
    assert shown == "https://user:***@proxy.example/x?token=***"
    assert getattr(cfg.amazon, key) == "https://user:hunter2@proxy.example/x?token=abc"


def test_config_errors_do_not_echo_a_url_secret() -> None:
    """A store URL of the wrong type is named in the error, its secrets masked."""
    url = "postgresql+asyncpg://u:hunter2@h/db?sslpassword=s3kr1t"
    with pytest.raises(ConfigError, match=r"store\.url") as err:
        config.from_mapping({"store": {"url": [url]}})
    assert "hunter2" not in str(err.value)
    assert "s3kr1t" not in str(err.value)
    assert "u:***@h" in str(err.value)


def test_logs_mask_url_secrets(capsys: pytest.CaptureFixture[str]) -> None:
    """Whatever a log line carries (an exception's text, say), URL secrets come out masked."""
    import structlog

    from syncd.observability import logging as syncd_logging

    before = structlog.get_config()
    syncd_logging.configure("info")  # prints to the captured stdout: restored below
    try:
        log = syncd_logging.get_logger("test")
        url = "postgresql+asyncpg://u:hunter2@h/db?password=s3kr1t"
        log.warning("store failed", error=repr(OSError(url)), detail={"url": url})
        try:
            raise RuntimeError(url)
        except RuntimeError:
            log.exception("crashed")
    finally:
        structlog.configure(**before)
    out = capsys.readouterr().out
    assert "store failed" in out
    assert "crashed" in out
    assert "hunter2" not in out
    assert "s3kr1t" not in out
    assert "u:***@h/db?password=***" in out


def test_kafka_reads_committed_messages_by_default() -> None:
    """Aborted transactional writes are never synced unless read_uncommitted is chosen."""
    assert config.from_mapping({}).kafka.isolation_level == "read_committed"
    chosen = config.from_mapping({"kafka": {"isolation_level": "read_uncommitted"}})
    assert chosen.kafka.isolation_level == "read_uncommitted"
    from_env = config.from_mapping({}, {"SYNCD_KAFKA__ISOLATION_LEVEL": "read_uncommitted"})
    assert from_env.kafka.isolation_level == "read_uncommitted"
    for bad in ("READ_COMMITTED", "committed", ""):
        with pytest.raises(ConfigError, match=r"kafka\.isolation_level.*read_committed"):
            config.from_mapping({"kafka": {"isolation_level": bad}})


FLOAT_KEYS = [
    (section.name, key.name)
    for section in dataclasses.fields(config.Config)
    if section.name != "destinations"
    for key in dataclasses.fields(getattr(config.Config(), section.name))
    if key.type == "float"
]


@pytest.mark.parametrize(("section", "key"), FLOAT_KEYS, ids=[f"{s}.{k}" for s, k in FLOAT_KEYS])
@pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan")])
def test_every_float_key_refuses_a_non_finite_value(section: str, key: str, value: float) -> None:
    """inf or nan in any float key (TOML or env) is refused naming the key: an infinite
    max_retry_time_s, say, kept an unanswered POST's budget reservation for ever."""
    env = {f"SYNCD_{section}__{key}".upper(): str(value)}
    for raw, environ in (({section: {key: value}}, {}), ({}, env)):
        with pytest.raises(ConfigError) as err:
            config.from_mapping(raw, environ)
        assert err.value.key == f"{section}.{key}"


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("request_timeout_s", 0),
        ("request_timeout_s", 86401),
        ("max_retry_time_s", 0),
        ("max_retry_time_s", -1),
        ("max_retry_time_s", 86401),
        ("backoff_base_s", -0.5),
        ("backoff_base_s", 0),  # a blocked connection would be probed in a tight loop
        ("backoff_max_s", -1),
        ("backoff_max_s", 0.1),  # below the base (0.5)
    ],
)
def test_amazon_timing_keys_are_bounded(key: str, value: float) -> None:
    """Negative backoff passed check-config and crashed later in RetryPolicy; a zero one
    made a blocked connection's probes and a failing POST's resends a tight loop."""
    with pytest.raises(ConfigError) as err:
        config.from_mapping({"amazon": {key: value}})
    assert err.value.key == f"amazon.{key}"


@pytest.mark.parametrize("value", [0, -1, 86401])
def test_store_statement_timeout_is_bounded(value: float) -> None:
    with pytest.raises(ConfigError) as err:
        config.from_mapping({"store": {"statement_timeout_s": value}})
    assert err.value.key == "store.statement_timeout_s"


@pytest.mark.parametrize(
    "url",
    [
        "postgresql+asyncpg://u:hunter2@db:notaport/syncd",  # SQLAlchemy: a ValueError
        "postgresql+asyncpg://u:hunter2@db:/syncd",
        "postgresql+asyncpg://u:hunter2@db:99999/syncd",  # the socket: an OverflowError
        "postgresql+asyncpg://u:hunter2@db:5432,db2:5432/syncd",  # hosts go in ?host=...
    ],
)
def test_a_store_url_that_cannot_be_opened_is_refused_by_name(url: str) -> None:
    """A store URL SQLAlchemy cannot parse, or whose port no socket takes, is a config error
    naming store.url (its secrets masked), not a traceback at the store's first use."""
    with pytest.raises(ConfigError) as err:
        config.from_mapping({"store": {"url": url}})
    assert err.value.key == "store.url"
    assert "hunter2" not in str(err.value)


@pytest.mark.parametrize(
    "url",
    [
        "sqlite+aiosqlite://",
        "sqlite+aiosqlite:///",
        "sqlite+aiosqlite:///:memory:",
        "sqlite+aiosqlite:///file::memory:?uri=true",
        "sqlite+aiosqlite:///file:x.db?mode=memory&uri=true",
    ],
)
def test_an_in_memory_sqlite_store_is_refused(url: str) -> None:
    """A store that lives only as long as its connection (SQLite in memory, or a temporary
    file) keeps no member, job or budget reservation across a restart: the offsets committed
    for its events would lose their changes, and the budget would start again from zero."""
    with pytest.raises(ConfigError, match="memory") as err:
        config.from_mapping({"store": {"url": url}})
    assert err.value.key == "store.url"


@pytest.mark.parametrize(
    "url",
    [
        "sqlite+aiosqlite:///syncd.db",
        "sqlite+aiosqlite:////var/lib/syncd/syncd.db",
        "sqlite+aiosqlite:///syncd.db?timeout=5",
        "postgresql+asyncpg://u:p@db/syncd",
        "postgresql+asyncpg://u:p@db:5432/syncd?ssl=verify-full",
        "postgresql+asyncpg://u:p@[::1]:5432/syncd",
        "postgresql+asyncpg://u:p@/syncd?host=/var/run/postgresql",
    ],
)
def test_store_urls_that_open_a_lasting_store_are_taken(url: str) -> None:
    assert config.from_mapping({"store": {"url": url}}).store.url == url


@pytest.mark.parametrize(
    ("query", "named"),
    [
        ("sslmode=require", "'sslmode'"),  # libpq's spelling: asyncpg's is ssl
        ("ssl=require&application_name=syncd&sslpassword=k3y", "'application_name', 'sslpassword'"),
    ],
)
def test_a_postgresql_store_url_parameter_asyncpg_does_not_take_is_refused_by_name(
    query: str, named: str
) -> None:
    """SQLAlchemy hands the URL's query to asyncpg.connect as keyword arguments: one it does not
    take passed check-config, then every store command (and `syncd run`) ended in a traceback
    (TypeError: connect() got an unexpected keyword argument 'sslmode')."""
    with pytest.raises(ConfigError) as err:
        config.from_mapping({"store": {"url": f"postgresql+asyncpg://u:hunter2@db/syncd?{query}"}})
    assert err.value.key == "store.url"
    assert named in str(err.value)
    assert "ssl=require" in str(err.value)  # what to write for TLS
    assert "hunter2" not in str(err.value)
    assert "k3y" not in str(err.value)


def test_postgresql_store_url_parameters_asyncpg_takes_are_taken() -> None:
    url = (
        "postgresql+asyncpg://u:p@/syncd?host=/var/run/postgresql&ssl=verify-full"
        "&command_timeout=30&prepared_statement_cache_size=100&target_session_attrs=read-write"
    )
    assert config.from_mapping({"store": {"url": url}}).store.url == url


@pytest.mark.parametrize("age", [1, 60, 3599])
def test_jobs_are_not_given_up_before_amazon_can_end_them(age: float) -> None:
    """poll.max_job_age_s = 1 was taken: every job expired before Amazon ended it, and its
    members were sent again (an expiry is no failed send), job after job, for good."""
    with pytest.raises(ConfigError) as err:
        config.from_mapping({"poll": {"max_job_age_s": age}})
    assert err.value.key == "poll.max_job_age_s"
    assert config.from_mapping({"poll": {"max_job_age_s": 3600}}).poll.max_job_age_s == 3600


@pytest.mark.parametrize("poll", [{"first_delay_s": 0}, {"first_delay_s": 0, "max_interval_s": 0}])
def test_job_polling_never_goes_without_a_pause(poll: dict[str, float]) -> None:
    """The GETs' interval doubles from poll.first_delay_s: from 0 it stays 0, whatever
    poll.max_interval_s, and each pending job would be polled again at once, round after round,
    until it ends."""
    from syncd.jobs import poll_interval

    with pytest.raises(ConfigError, match="doubles") as err:
        config.from_mapping({"poll": poll})
    assert err.value.key == "poll.first_delay_s"
    cfg = config.from_mapping({"poll": {"first_delay_s": 0.001, "max_interval_s": 0.001}})
    assert poll_interval(3, cfg.poll) == 0.001


def test_amazon_timing_keys_accept_their_bounds() -> None:
    from syncd.amazon.retry import RetryPolicy

    amazon = {"request_timeout_s": 86400, "max_retry_time_s": 86400, "backoff_base_s": 0.001}
    cfg = config.from_mapping({"amazon": {**amazon, "backoff_max_s": 0.001}})
    RetryPolicy.from_config(cfg.amazon)  # what every Amazon-talking command builds
    assert cfg.amazon.post_flight_s == 2 * 86400


def test_secret_file_precedence_is_inline_then_file_then_env(tmp_path: Path) -> None:
    """Inline TOML value < `<key>_file` < environment, whatever the order of the keys."""
    secret = tmp_path / "secret"
    secret.write_text("from-file\n")
    path = str(secret)
    env = {"SYNCD_AMAZON__CLIENT_SECRET": "from-env"}
    for amazon in ({"client_secret_file": path}, {"client_secret": "", "client_secret_file": path}):
        for ordered in (amazon, dict(reversed(amazon.items()))):
            assert config.from_mapping({"amazon": ordered}).amazon.client_secret == "from-file"
            assert config.from_mapping({"amazon": ordered}, env).amazon.client_secret == "from-env"
    env_file = {"SYNCD_AMAZON__CLIENT_SECRET_FILE": path}
    inline = {"amazon": {"client_secret": "inline"}}
    assert config.from_mapping(inline, env_file).amazon.client_secret == "from-file"


def test_a_secret_given_inline_and_by_file_is_refused(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_text("from-file")
    both = {"client_secret": "inline", "client_secret_file": str(secret)}
    for amazon in (both, dict(reversed(both.items()))):
        with pytest.raises(ConfigError) as err:
            config.from_mapping({"amazon": amazon})
        assert err.value.key == "amazon.client_secret"


@pytest.mark.parametrize(
    ("section", "key"),
    [
        ("batch", "max_records"),
        ("kafka", "topics"),
        ("store", "auto_upgrade"),
        ("poll", "first_delay_s"),
    ],
)
def test_only_string_keys_are_read_from_a_file(tmp_path: Path, section: str, key: str) -> None:
    """`<key>_file` is for secrets: a number, list or boolean read from one was never
    converted (max_records a str, topics subscribed char by char, "false" truthy)."""
    text = tmp_path / "value"
    text.write_text("5")
    with pytest.raises(ConfigError) as err:
        config.from_mapping({section: {f"{key}_file": str(text)}})
    assert err.value.key == f"{section}.{key}_file"
    assert config.from_mapping({"kafka": {"group_id_file": str(text)}}).kafka.group_id == "5"


def test_an_unreadable_config_file_names_the_flag(tmp_path: Path) -> None:
    """Not UTF-8, or a directory: a ConfigError naming --config, never a traceback."""
    latin1 = tmp_path / "latin1.toml"
    latin1.write_bytes('[kafka]\ngroup_id = "caf\u00e9"\n'.encode("latin-1"))
    for path in (latin1, tmp_path):
        with pytest.raises(ConfigError) as err:
            config.load(path, environ={})
        assert err.value.key == "--config"


def test_a_config_file_may_start_with_a_utf8_bom(tmp_path: Path) -> None:
    path = tmp_path / "bom.toml"
    path.write_bytes(b"\xef\xbb\xbf" + '[kafka]\ngroup_id = "caf\u00e9"\n'.encode())
    assert config.load(path, environ={}).kafka.group_id == "caf\u00e9"


def test_a_secret_file_that_is_not_utf8_names_the_key(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_bytes("s\u00e9cret".encode("latin-1"))
    with pytest.raises(ConfigError) as err:
        config.from_mapping({"amazon": {"client_secret_file": str(secret)}})
    assert err.value.key == "amazon.client_secret_file"


@pytest.mark.parametrize("key", ["ssl_cafile", "ssl_certfile", "ssl_keyfile"])
def test_a_tls_file_kafka_cannot_read_names_the_key(tmp_path: Path, key: str) -> None:
    """A missing ssl_cafile passed check-config; `syncd run` then crashed (FileNotFoundError)."""
    pem = tmp_path / "x.pem"
    pem.write_text("-----BEGIN CERTIFICATE-----\n")
    for protocol in ("SSL", "SASL_SSL"):
        kafka = {"security_protocol": protocol, key: str(pem)}
        assert getattr(config.from_mapping({"kafka": kafka}).kafka, key) == str(pem)
        for bad in (tmp_path / "missing.pem", tmp_path):
            with pytest.raises(ConfigError) as err:
                config.from_mapping({"kafka": {**kafka, key: str(bad)}})
            assert err.value.key == f"kafka.{key}"
    unused = {"security_protocol": "PLAINTEXT", key: str(tmp_path / "missing.pem")}
    config.from_mapping({"kafka": unused})  # plaintext never opens it


def test_logs_hide_the_row_values_postgresql_puts_in_an_error(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """PostgreSQL's DETAIL line of an error repeats the row's values (a record's hashes, a
    consent IP): logged errors keep the message and hide that line, as text or as a repr."""
    import structlog

    from syncd.observability import logging as syncd_logging

    text = (
        'new row for relation "members" violates check constraint "x"\n'
        "DETAIL:  Failing row contains (7, u1, 203.0.113.9).\n"
        "[SQL: INSERT INTO members ...]"
    )
    before = structlog.get_config()
    syncd_logging.configure("info")
    try:
        log = syncd_logging.get_logger("test")
        log.warning("store write failed", error=repr(RuntimeError(text)))
        log.warning("store write failed", error=text)
    finally:
        structlog.configure(**before)
    out = capsys.readouterr().out
    assert "203.0.113.9" not in out
    assert out.count("violates check constraint") == 2
    assert out.count("[SQL: INSERT INTO members") == 2


@pytest.mark.parametrize(
    "kafka",
    [
        {"topics": ["profile-changes"], "dead_letter_topic": "profile-changes"},
        {"topics": ["a", "b"], "dead_letter_topic": "b"},
    ],
)
def test_a_dead_letter_topic_that_is_an_input_topic_is_refused(kafka: dict[str, object]) -> None:
    """syncd would read its own dead letters back: each is unusable again (an event's original
    bytes, or a member dead letter, which has no profile_id) and dead-lettered again, for ever,
    the topic growing with each round."""
    with pytest.raises(ConfigError) as err:
        config.from_mapping({"kafka": kafka})
    assert err.value.key == "kafka.dead_letter_topic"
    assert "kafka.topics" in str(err.value)


@pytest.mark.parametrize(
    ("kafka", "key"),
    [
        ({"topics": ["profile changes"]}, "kafka.topics"),
        ({"topics": ["a", " b"]}, "kafka.topics"),
        ({"topics": ["profile/changes"]}, "kafka.topics"),
        ({"topics": ["t" * 250]}, "kafka.topics"),
        ({"topics": [".."]}, "kafka.topics"),
        ({"topics": ["caf\u00e9"]}, "kafka.topics"),
        ({"dead_letter_topic": "bad topic!"}, "kafka.dead_letter_topic"),
        ({"dead_letter_topic": "."}, "kafka.dead_letter_topic"),
    ],
)
def test_a_topic_name_kafka_cannot_hold_is_refused(kafka: dict[str, object], key: str) -> None:
    """Kafka's topic names are 1..249 of [a-zA-Z0-9._-], not "." or "..". Another name was
    taken: an input topic that can never exist left syncd idle and ready, and a dead-letter
    topic of that kind held the first unusable event's offset (and so every commit of its
    partition) for ever, while /readyz said 200."""
    with pytest.raises(ConfigError) as err:
        config.from_mapping({"kafka": kafka})
    assert err.value.key == key


def test_every_legal_topic_name_is_taken() -> None:
    names = ("a", "A.b_c-9", "t" * 249, "...", "_internal")
    cfg = config.from_mapping({"kafka": {"topics": list(names), "dead_letter_topic": "dlq.v1"}})
    assert cfg.kafka.topics == names


def test_destination_keys_as_long_as_the_store_holds_are_taken() -> None:
    """The store's columns hold an audience key of 256 characters and a connection id of 128
    (PostgreSQL refuses more: the job of an accepted POST could not be stored, and syncd
    exited 1 at every start)."""
    dest = {**DEST, "audience": "\u00e9" * 256, "connection_id": "c" * 128}
    (got,) = config.from_mapping({"destinations": [dest]}).destinations
    assert (len(got.audience), len(got.connection_id)) == (256, 128)
