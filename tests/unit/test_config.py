from pathlib import Path

import pytest

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
        ({"destinations": [DEST, DEST]}, "destinations[1].audience"),
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
