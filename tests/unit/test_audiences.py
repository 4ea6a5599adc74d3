"""The `[members]` config and the AudienceWatcher (syncd/audiences.py): audience metadata read
periodically and tolerated when it fails, TTL refreshes marked in time, tombstones purged, and
the audience metrics. A fake Amazon client; the member table on SQLite with an injected clock;
the watcher driven one round at a time (`run_once`) on a fake monotonic clock."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from syncd import config as syncd_config
from syncd.errors import ConfigError


# -- [members] config -----------------------------------------------------------------------------
def test_members_defaults_match_the_contract() -> None:
    cfg = syncd_config.from_mapping({})
    assert cfg.members.refresh_at == 0.8
    assert cfg.members.tombstone_days == 30


@pytest.mark.parametrize("refresh_at", [0, 0.0, 0.01, 0.5, 0.999])
def test_refresh_at_zero_or_a_fraction_below_one_is_accepted(refresh_at: float) -> None:
    cfg = syncd_config.from_mapping({"members": {"refresh_at": refresh_at}})
    assert cfg.members.refresh_at == refresh_at


@pytest.mark.parametrize(
    ("raw", "key"),
    [
        ({"refresh_at": 1}, "members.refresh_at"),
        ({"refresh_at": 1.5}, "members.refresh_at"),
        ({"refresh_at": -0.1}, "members.refresh_at"),
        ({"refresh_at": "0.8"}, "members.refresh_at"),
        ({"refresh_at": math.nan}, "members.refresh_at"),
        ({"tombstone_days": 0}, "members.tombstone_days"),
        ({"tombstone_days": -1}, "members.tombstone_days"),
        ({"tombstone_days": math.inf}, "members.tombstone_days"),
        ({"tombstone_day": 3}, "members.tombstone_day"),
    ],
)
def test_bad_members_values_name_the_key(raw: dict[str, object], key: str) -> None:
    with pytest.raises(ConfigError) as err:
        syncd_config.from_mapping({"members": raw})
    assert err.value.key == key


def test_members_env_overrides() -> None:
    cfg = syncd_config.from_mapping(
        {}, {"SYNCD_MEMBERS__REFRESH_AT": "0", "SYNCD_MEMBERS__TOMBSTONE_DAYS": "0.5"}
    )
    assert (cfg.members.refresh_at, cfg.members.tombstone_days) == (0.0, 0.5)
    with pytest.raises(ConfigError, match=r"members\.refresh_at"):
        syncd_config.from_mapping({}, {"SYNCD_MEMBERS__REFRESH_AT": "nan"})


@given(st.floats(allow_nan=True, allow_infinity=True))
def test_refresh_at_is_accepted_exactly_when_zero_or_strictly_between_0_and_1(x: float) -> None:
    raw = {"members": {"refresh_at": x}}
    if x == 0 or 0 < x < 1:
        assert syncd_config.from_mapping(raw).members.refresh_at == x
    else:
        with pytest.raises(ConfigError) as err:
            syncd_config.from_mapping(raw)
        assert err.value.key == "members.refresh_at"
