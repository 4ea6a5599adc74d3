"""The `[members]` config and the AudienceWatcher (syncd/audiences.py): audience metadata read
periodically and tolerated when it fails, TTL refreshes marked in time, tombstones purged, and
the audience metrics. A fake Amazon client; the member table on SQLite with an injected clock;
the watcher driven one round at a time (`run_once`) on a fake monotonic clock."""

from __future__ import annotations

import asyncio
import itertools
import math
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from structlog.testing import capture_logs

from syncd import config as syncd_config
from syncd.amazon.api import Audience
from syncd.audiences import (
    DEFAULT_TTL_S,
    MIN_CHECK_S,
    REFRESH_EVERY_S,
    AudienceWatcher,
    WatchedAudience,
)
from syncd.config import MembersConfig
from syncd.errors import ConfigError, RejectedError, RetryableError
from syncd.members import ADD, MemberTable
from syncd.model import Destination
from syncd.observability.metrics import REGISTRY
from tests.fakes import T0, FakeClock
from tests.unit.test_members import A1, A2, change, send


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


# -- the watcher ----------------------------------------------------------------------------------
A3 = 413642381039213538
CONN = "5a523424-e8b3-4da5-9a32-24a861aea576"
_keys = itertools.count()


def key(name: str) -> str:
    """An audience key no other test uses: the metrics registry is process-wide."""
    return f"{name}-{next(_keys)}"


def dest(audience: str, audience_id: int = A1) -> Destination:
    return Destination(audience, CONN, audience_id, "US")


def sample(name: str, **labels: str) -> float | None:
    return REGISTRY.get_sample_value(name, labels)


class FakeAmazon:
    """get_audience answers from `answers[audience_id]`: a metadata object, or an exception."""

    def __init__(self, answers: dict[int, dict[str, Any] | Exception]) -> None:
        self.answers = answers
        self.calls: list[int] = []

    async def get_audience(self, audience_id: int) -> Audience:
        self.calls.append(audience_id)
        answer = self.answers[audience_id]
        if isinstance(answer, Exception):
            raise answer
        return Audience(audience_id, {"audienceId": audience_id, "metadata": answer})


def meta(ttl: Any = 60, received: int = 100, matched: int = 80, dsp: int = 70) -> dict[str, Any]:
    size = {"receivedRecordSize": received, "idResolutionCount": matched, "dspAudienceSize": dsp}
    return {"externalAudienceId": "x", "ttl": ttl, "audienceSize": size}


def not_found() -> RejectedError:
    return RejectedError("metadata_get failed: HTTP 404: not found", status=404)


def forbidden() -> RejectedError:
    return RejectedError("metadata_get failed: HTTP 403: terms", status=403)


async def confirmed_members(table: MemberTable, *ids: str, audience: int = A1) -> None:
    """`ids` become members Amazon confirmed: their CREATE accepted now (the TTL clock starts)."""
    job = f"job-{next(_keys)}"
    await table.record_changes([change(i, audience=audience) for i in ids])
    await send(table, audience, job)
    await table.apply_job_outcome(job, "SUCCEEDED")


def watcher(
    amazon: FakeAmazon,
    table: Any,
    clock: FakeClock,
    *destinations: Destination,
    refresh_at: float = 0.5,
    **options: Any,
) -> AudienceWatcher:
    cfg = MembersConfig(refresh_at=refresh_at, tombstone_days=30)
    return AudienceWatcher(amazon, table, destinations, cfg, clock=clock, **options)


async def test_ttl_60_refresh_at_half_re_sends_within_the_refresh_window(
    table: MemberTable, clock: FakeClock
) -> None:
    """A member accepted at T0 is due between 30 s and 60 s: the watcher marks it within a
    quarter of that window (7.5 s) after 30 s, leaving the senders most of the window."""
    vip = key("vip")
    await confirmed_members(table, "u1")
    w = watcher(FakeAmazon({A1: meta(ttl=60)}), table, clock, dest(vip))
    marked_at = None
    while marked_at is None and clock.now < T0 + 60:
        wait_s = await w.run_once()
        assert 0 < wait_s <= 7.5
        state = await table.member(A1, "u1")
        assert state is not None
        if state.due_since is not None:
            marked_at = clock.now
        clock.advance(wait_s)
    assert marked_at is not None
    assert T0 + 30 < marked_at <= T0 + 37.5
    assert w.refresh_period() == 7.5
    [claim] = await table.claim_due([A1], 10, 60, "sender")
    assert (claim.external_user_id, claim.refresh, claim.action) == ("u1", True, ADD)
    assert sample("syncd_members_refreshed_total", audience=vip) == 1


async def test_every_stale_member_is_marked_in_one_round(
    table: MemberTable, clock: FakeClock
) -> None:
    vip = key("vip")
    await confirmed_members(table, *(f"u{i}" for i in range(7)))
    w = watcher(FakeAmazon({A1: meta(ttl=60)}), table, clock, dest(vip), refresh_limit=3)
    await w.run_once()
    clock.advance(31)
    await w.run_once()
    assert len(await table.claim_due([A1], 100, 60, "s")) == 7
    assert sample("syncd_members_refreshed_total", audience=vip) == 7


async def test_members_past_the_middle_of_their_window_and_unsent_are_at_risk(
    table: MemberTable, clock: FakeClock
) -> None:
    """ttl 60, refresh_at 0.5: due after 30 s, at risk after 45 s while no job carries them."""
    vip = key("vip")
    await confirmed_members(table, "old1", "old2")
    clock.advance(20)
    await confirmed_members(table, "young")
    w = watcher(FakeAmazon({A1: meta(ttl=60)}), table, clock, dest(vip))
    await w.run_once()
    assert sample("syncd_members_at_risk", audience=vip) == 0
    clock.advance(26)  # old ones at 46 s (due, waiting), young at 26 s
    await w.run_once()
    assert sample("syncd_members_at_risk", audience=vip) == 2
    claims = await table.claim_due([A1], 1, 60, "s")
    await table.mark_sent(claims, "refresh-job")  # one re-sent: its job carries it now
    clock.advance(w.refresh_period())
    await w.run_once()
    assert sample("syncd_members_at_risk", audience=vip) == 1


async def test_ttl_0_is_reported_and_nothing_is_refreshed(
    table: MemberTable, clock: FakeClock
) -> None:
    vip = key("vip")
    await confirmed_members(table, "u1")
    w = watcher(FakeAmazon({A1: meta(ttl=0)}), table, clock, dest(vip))
    with capture_logs() as logs:
        await w.run_once()
        clock.advance(10 * 86400)
        await w.run_once()
    assert sample("syncd_audience_ttl_seconds", audience=vip) == 0
    assert sample("syncd_members_at_risk", audience=vip) == 0
    assert sample("syncd_members_refreshed_total", audience=vip) == 0
    assert await table.claim_due([A1], 10, 60, "s") == []
    [warning] = [e for e in logs if "ttl is 0" in e["event"]]
    assert warning["audience"] == vip
    assert warning["log_level"] == "warning"


async def test_refresh_at_0_never_refreshes(table: MemberTable, clock: FakeClock) -> None:
    await confirmed_members(table, "u1")
    w = watcher(FakeAmazon({A1: meta(ttl=60)}), table, clock, dest(key("vip")), refresh_at=0)
    for _ in range(5):
        await w.run_once()
        clock.advance(3600)
    assert await table.claim_due([A1], 10, 60, "s") == []


async def test_metadata_failures_are_logged_retried_and_stop_nothing(
    table: MemberTable, clock: FakeClock
) -> None:
    """A 404, a 403 and an outage on three audiences: each is logged once (setup problems as
    such), retried after metadata_retry_s, refreshed meanwhile by the default ttl; the loop goes
    on and the ttl is used once Amazon answers."""
    gone, denied, down = key("gone"), key("denied"), key("down")
    amazon = FakeAmazon(
        {A1: not_found(), A2: forbidden(), A3: RetryableError("metadata_get: no answer")}
    )
    await confirmed_members(table, "u1", audience=A1)
    w = watcher(
        amazon,
        table,
        clock,
        dest(gone, A1),
        dest(denied, A2),
        dest(down, A3),
        metadata_every_s=600,
        metadata_retry_s=60,
    )
    with capture_logs() as logs:
        for _ in range(3):
            await w.run_once()
            clock.advance(60)
    assert amazon.calls.count(A1) == 3  # retried every 60 s, not every 600 s
    assert sample("syncd_audience_metadata_reads_total", audience=gone, outcome="not_found") == 3
    assert sample("syncd_audience_metadata_reads_total", audience=denied, outcome="forbidden") == 3
    assert sample("syncd_audience_metadata_reads_total", audience=down, outcome="failed") == 3
    assert sample("syncd_audience_ttl_seconds", audience=gone) == DEFAULT_TTL_S
    warnings = [e for e in logs if e["event"].startswith("audience metadata")]
    assert [(e["audience"], e["outcome"]) for e in warnings] == [
        (gone, "not_found"),
        (denied, "forbidden"),
        (down, "failed"),
    ]
    assert warnings[0]["event"] == "audience metadata cannot be read: setup problem"
    assert "audience_id" in warnings[0]["do"]
    assert warnings[2]["event"] == "audience metadata read failed; retrying"
    assert sample("syncd_members", audience=gone, state="member") == 1  # counts still read

    amazon.answers[A1] = meta(ttl=60)  # fixed: the ttl applies from the next read on
    clock.advance(60)
    await w.run_once()
    assert sample("syncd_audience_ttl_seconds", audience=gone) == 60
    clock.advance(w.refresh_period())
    await w.run_once()
    assert len(await table.claim_due([A1], 10, 60, "s")) == 1


class BrokenMembers:
    """A member table whose every call fails (the store is down)."""

    calls = 0

    async def _fail(self, *_args: Any) -> Any:
        BrokenMembers.calls += 1
        raise OSError("store down")

    due_for_refresh = count_at_risk = counts = purge_tombstones = _fail


async def test_store_failures_in_every_step_do_not_raise(clock: FakeClock) -> None:
    w = watcher(FakeAmazon({A1: meta(ttl=60)}), BrokenMembers(), clock, dest(key("vip")))
    before = BrokenMembers.calls
    with capture_logs() as logs:
        wait_s = await w.run_once()
    assert BrokenMembers.calls - before == 3  # counts, refresh, purge: each tried
    assert 0 < wait_s <= w.refresh_period()
    events = {e["event"] for e in logs}
    assert {"member counts failed; retrying", "tombstone purge failed; retrying later"} <= events
    assert "ttl refresh failed; retrying next round" in events


async def test_run_survives_failures_and_ends_when_stopped(clock: FakeClock) -> None:
    """`run` goes on through failing rounds (Amazon and the store down) until told to stop."""
    stop = asyncio.Event()

    class StopAfterThree(FakeAmazon):
        async def get_audience(self, audience_id: int) -> Audience:
            if len(self.calls) == 2:
                stop.set()
            return await super().get_audience(audience_id)

    amazon = StopAfterThree({A1: RetryableError("metadata_get: 503")})
    w = watcher(
        amazon, BrokenMembers(), clock, dest(key("vip")), metadata_retry_s=0, metadata_every_s=0
    )
    await asyncio.wait_for(w.run(stop), timeout=30)
    assert len(amazon.calls) == 3


async def test_metrics_from_metadata_and_store(table: MemberTable, clock: FakeClock) -> None:
    vip, twin = key("vip"), key("twin")
    await confirmed_members(table, "m1", "m2")
    await table.record_changes([change("p1")])
    amazon = FakeAmazon({A1: meta(ttl=3600, received=1000, matched=640, dsp=600)})
    w = watcher(amazon, table, clock, dest(vip), dest(twin))  # two keys, one audience_id
    await w.run_once()
    assert amazon.calls == [A1]
    assert sample("syncd_audience_ttl_seconds", audience=vip) == 3600
    assert sample("syncd_audience_size", audience=vip, kind="received") == 1000
    assert sample("syncd_audience_size", audience=vip, kind="matched") == 640
    assert sample("syncd_audience_size", audience=vip, kind="dsp") == 600
    assert sample("syncd_members", audience=vip, state="member") == 2
    assert sample("syncd_members", audience=vip, state="pending") == 1
    assert sample("syncd_members", audience=vip, state="removed") == 0
    assert sample("syncd_members", audience=vip, state="invalid") == 0
    assert sample("syncd_audience_metadata_reads_total", audience=vip, outcome="ok") == 1
    assert sample("syncd_audience_ttl_seconds", audience=twin) is None

    await table.record_changes([change("p2")])  # counts follow the metadata schedule
    clock.advance(w.refresh_period())
    await w.run_once()
    assert sample("syncd_members", audience=vip, state="pending") == 1
    clock.advance(600)
    await w.run_once()
    assert sample("syncd_members", audience=vip, state="pending") == 2
    assert amazon.calls == [A1, A1]


@pytest.mark.parametrize(
    "odd",
    [
        {"ttl": "60"},
        {"ttl": -1},
        {"ttl": True},
        {"ttl": DEFAULT_TTL_S + 1},
        {"ttl": None, "audienceSize": "big"},
        {"audienceSize": {"receivedRecordSize": -5, "idResolutionCount": 1.5}},
    ],
)
async def test_odd_metadata_falls_back_to_the_default_ttl(
    odd: dict[str, Any], clock: FakeClock
) -> None:
    vip = key("vip")
    calls: list[float] = []

    class Members(BrokenMembers):
        async def due_for_refresh(self, audience_id: int, older_than_s: float, limit: int) -> int:
            calls.append(older_than_s)
            return 0

    w = watcher(FakeAmazon({A1: odd}), Members(), clock, dest(vip))
    await w.run_once()
    assert sample("syncd_audience_ttl_seconds", audience=vip) == DEFAULT_TTL_S
    assert calls == [0.5 * DEFAULT_TTL_S]
    assert sample("syncd_audience_size", audience=vip, kind="received") is None
    assert sample("syncd_audience_size", audience=vip, kind="matched") is None


async def test_old_tombstones_are_purged_hourly(table: MemberTable, clock: FakeClock) -> None:
    """Tombstones older than tombstone_days go at start and then once an hour (the watcher's
    schedule runs on its own clock here, the store's time on `clock`). Each erase is recorded
    as it happens."""
    clock.advance(-31 * 86400)
    await table.erase(["old"], [A1], occurred_at=T0 - 31 * 86400, position=0)
    clock.advance(2 * 86400)
    await table.erase(["recent"], [A1], occurred_at=T0 - 29 * 86400, position=0)
    clock.advance(29 * 86400)  # T0
    schedule = FakeClock()
    w = watcher(FakeAmazon({A1: meta()}), table, schedule, dest(key("vip")))
    before = sample("syncd_tombstones_purged_total") or 0
    await w.run_once()
    assert await table.tombstone(A1, "old") is None
    assert await table.tombstone(A1, "recent") is not None
    clock.advance(1.5 * 86400)  # "recent" is 30.5 days old now
    schedule.advance(600)
    await w.run_once()  # within the hour: not purged yet
    assert await table.tombstone(A1, "recent") is not None
    schedule.advance(3000)
    await w.run_once()
    assert await table.tombstone(A1, "recent") is None
    assert sample("syncd_tombstones_purged_total") == before + 2


@given(
    ttl=st.integers(min_value=1, max_value=DEFAULT_TTL_S),
    refresh_at=st.floats(min_value=0.01, max_value=0.99),
)
def test_refresh_period_checks_four_times_per_window(ttl: int, refresh_at: float) -> None:
    w = AudienceWatcher(FakeAmazon({}), BrokenMembers(), [], MembersConfig(refresh_at=refresh_at))
    w.audiences[A1] = WatchedAudience(A1, "a", ttl_s=ttl)
    w.audiences[A2] = WatchedAudience(A2, "b", ttl_s=0)  # not refreshed: no bound
    window = (1 - refresh_at) * ttl
    period = w.refresh_period()
    assert MIN_CHECK_S <= period <= REFRESH_EVERY_S
    assert period <= window / 4 or period == MIN_CHECK_S


async def test_a_hanging_metadata_read_does_not_hold_the_refreshes_back(
    table: MemberTable, clock: FakeClock
) -> None:
    """Amazon never answers for one audience: its read is given up (a failed read, retried
    later) and the other audience's members are still refreshed in the same round."""
    stuck = key("stuck")

    class Hanging(FakeAmazon):
        async def get_audience(self, audience_id: int) -> Audience:
            if audience_id == A2:
                await asyncio.Event().wait()
            return await super().get_audience(audience_id)

    await confirmed_members(table, "u1")
    w = watcher(
        Hanging({A1: meta(ttl=60)}),
        table,
        clock,
        dest(key("vip"), A1),
        dest(stuck, A2),
        metadata_timeout_s=0.01,
    )
    clock.advance(31)
    await asyncio.wait_for(w.run_once(), timeout=30)
    assert len(await table.claim_due([A1], 10, 60, "s")) == 1
    assert sample("syncd_audience_metadata_reads_total", audience=stuck, outcome="failed") == 1


@pytest.mark.parametrize("odd", ["60", -1, True, DEFAULT_TTL_S + 1, 1e30, [60]])
async def test_an_unusable_ttl_keeps_the_ttl_read_before(
    odd: Any, table: MemberTable, clock: FakeClock
) -> None:
    """Amazon answered ttl 60, then a ttl syncd cannot use: the 60 s it read holds (as through
    a failed read), so the members are still refreshed within their window instead of waiting
    for the default ttl (397 days) while Amazon drops them after 60 s."""
    vip = key("vip")
    amazon = FakeAmazon({A1: meta(ttl=60)})
    await confirmed_members(table, "u1")
    w = watcher(amazon, table, clock, dest(vip), metadata_every_s=10)
    await w.run_once()
    amazon.answers[A1] = meta(ttl=odd)
    clock.advance(10)
    with capture_logs() as logs:
        await w.run_once()
    assert amazon.calls == [A1, A1]
    assert sample("syncd_audience_ttl_seconds", audience=vip) == 60
    clock.advance(30)
    await w.run_once()
    assert len(await table.claim_due([A1], 10, 60, "s")) == 1
    [warning] = [e for e in logs if e["event"].startswith("audience metadata holds an unusable")]
    assert warning["ttl_s"] == 60  # says which ttl it keeps
