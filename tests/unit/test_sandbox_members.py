"""The sandbox's membership model over real HTTP: members added by CREATE live for the audience's
ttl after their last add (a logical removal: ttl 0 hides them, a larger ttl brings them back),
DELETE removes them, FAILED jobs and invalid records change nothing; audienceSize, implicit
and strict audiences, the members control route, `userConsent.geo` and required consent.

Time comes from an injected clock, so no test sleeps or depends on the machine's speed."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from hypothesis import given
from hypothesis import strategies as st

from syncd.amazon import api
from syncd.cli import build_parser
from syncd.sandbox.server import running_sandbox, settings_from_args
from syncd.sandbox.state import SandboxSettings, SandboxState
from tests.fakes import FakeClock
from tests.unit.test_sandbox_validation import (
    AUDIENCE,
    CONNECTION,
    REMOVE,
    Client,
    audience_body,
    body,
    expect_400,
    record,
    until_terminal,
)

START = 1_700_000_000.0
DAY = 86400


@contextlib.asynccontextmanager
async def sandbox_client(clock: FakeClock | None = None, **settings: Any) -> AsyncIterator[Client]:
    """A logged-in client of a dedicated sandbox with immediate jobs and no throttling."""
    defaults: dict[str, Any] = {"job_delay_s": 0, "rate_per_s": 1000, "burst": 1000}
    config = SandboxSettings(**{**defaults, **settings})
    async with (
        running_sandbox(config, clock=clock or FakeClock(START)) as sb,
        aiohttp.ClientSession() as http,
    ):
        client = Client(http, sb)
        await client.login()
        yield client


async def post(client: Client, *records: dict[str, Any], audience_id: int = AUDIENCE) -> Any:
    """POST the records; the job's final status."""
    status, data, _ = await client.post_records(body(list(records), audienceId=audience_id))
    assert status == 202, data
    return await until_terminal(client, data["jobRequestId"])


async def members(client: Client, audience_id: int = AUDIENCE) -> dict[str, Any]:
    url = f"{client.sandbox.url}/_sandbox/audiences/{audience_id}/members"
    async with client.http.get(url) as r:
        assert r.status == 200, await r.text()
        data: dict[str, Any] = await r.json()
    return data


async def live(client: Client, audience_id: int = AUDIENCE) -> dict[str, float]:
    """Live members as externalUserId -> expiresAt."""
    view = await members(client, audience_id)
    return {m["externalUserId"]: m["expiresAt"] for m in view["members"]}


async def metadata(client: Client, audience_id: int = AUDIENCE) -> dict[str, Any]:
    status, data, _ = await client.call("GET", f"{api.METADATA_PATH}/{audience_id}")
    assert status == 200, data
    result: dict[str, Any] = data["metadata"]
    return result


async def new_audience(client: Client, ttl: int) -> int:
    payload = audience_body(metadata={"ttl": ttl})
    status, data, _ = await client.call("POST", api.METADATA_PATH, payload)
    assert status == 201, data
    audience_id: int = data["audienceId"]
    return audience_id


async def set_ttl(client: Client, audience_id: int, ttl: int) -> None:
    path = f"{api.METADATA_PATH}/{audience_id}"
    status, data, _ = await client.call("PUT", path, {"metadata": {"ttl": ttl}})
    assert status == 200, data


# -- membership and ttl -----------------------------------------------------------------------


async def test_create_adds_members_for_the_ttl_after_their_last_add() -> None:
    clock = FakeClock(START)
    async with sandbox_client(clock) as c:
        audience = await new_audience(c, ttl=100)
        await post(c, record(0), record(1), audience_id=audience)
        assert await live(c, audience) == {"cdp-user-0": START + 100, "cdp-user-1": START + 100}
        clock.now = START + 60
        await post(c, record(0), audience_id=audience)  # renews cdp-user-0 only
        assert await live(c, audience) == {"cdp-user-1": START + 100, "cdp-user-0": START + 160}
        clock.now = START + 100  # cdp-user-1 was last added exactly ttl seconds ago
        view = await members(c, audience)
        assert view == {
            "audienceId": audience,
            "members": [{"externalUserId": "cdp-user-0", "expiresAt": START + 160}],
            "size": 1,
        }
        assert (await metadata(c, audience))["audienceSize"]["dspAudienceSize"] == 1
        clock.now = START + 160
        assert await members(c, audience) == {"audienceId": audience, "members": [], "size": 0}


async def test_delete_removes_a_member_and_order_within_a_job_counts() -> None:
    async with sandbox_client() as c:
        await post(c, record(0), record(1), record(2))
        final = await post(
            c,
            record(1, action="DELETE"),
            record(2, action="DELETE"),
            record(2),  # deleted, then added again in the same job
            record(9, action="DELETE"),  # never a member: harmless
        )
        assert final["jobState"] == "SUCCEEDED"
        assert set(await live(c)) == {"cdp-user-0", "cdp-user-2"}
        assert final["audienceSize"]["dspAudienceSize"] == 2


async def test_ttl_zero_hides_members_and_a_larger_ttl_brings_them_back() -> None:
    """Amazon's guide: ttl is a logical removal; reverting it from 0 lets members re-enter by
    the date they were added."""
    clock = FakeClock(START)
    async with sandbox_client(clock) as c:
        audience = await new_audience(c, ttl=100)
        await post(c, record(0), audience_id=audience)
        clock.now = START + 50
        await post(c, record(1), audience_id=audience)
        await set_ttl(c, audience, 0)
        assert await members(c, audience) == {"audienceId": audience, "members": [], "size": 0}
        await post(c, record(2), audience_id=audience)  # added while ttl is 0: not live either
        assert (await metadata(c, audience))["audienceSize"]["dspAudienceSize"] == 0
        clock.now = START + 120
        await set_ttl(c, audience, 100)
        assert await live(c, audience) == {"cdp-user-1": START + 150, "cdp-user-2": START + 150}
        await set_ttl(c, audience, 1000)  # every member again, by its last add
        assert await live(c, audience) == {
            "cdp-user-0": START + 1000,
            "cdp-user-1": START + 1050,
            "cdp-user-2": START + 1050,
        }
        await post(c, record(3), audience_id=audience)  # a later CREATE uses the new ttl
        assert (await live(c, audience))["cdp-user-3"] == START + 120 + 1000


async def test_failed_jobs_and_invalid_records_change_no_membership() -> None:
    async with sandbox_client(failed_rate=1.0) as c:
        final = await post(c, record(0))
        assert final["jobState"] == "FAILED"
        assert final["audienceSize"] == {
            "receivedRecordSize": 1,
            "idResolutionCount": 0,
            "dspAudienceSize": 0,
        }
        assert await members(c) == {"audienceId": AUDIENCE, "members": [], "size": 0}
        assert (await metadata(c))["audienceSize"] == {
            "receivedRecordSize": 0,
            "idResolutionCount": 0,
            "dspAudienceSize": 0,
        }
    async with sandbox_client(invalid_record_rate=0.5, seed=4) as c:
        final = await post(c, *(record(i) for i in range(40)))
        invalid = {r["externalId"] for r in final["invalidRecords"]}
        assert 0 < len(invalid) < 40
        assert set(await live(c)) == {f"cdp-user-{i}" for i in range(40)} - invalid


async def test_reset_clears_membership_but_keeps_audiences() -> None:
    async with sandbox_client() as c:
        audience = await new_audience(c, ttl=100)
        await post(c, record(0), audience_id=audience)
        async with c.http.post(f"{c.sandbox.url}/_sandbox/reset") as r:
            assert r.status == 204
        assert await members(c, audience) == {"audienceId": audience, "members": [], "size": 0}
        size = (await metadata(c, audience))["audienceSize"]
        assert size == {"receivedRecordSize": 0, "idResolutionCount": 0, "dspAudienceSize": 0}


async def test_members_route_errors() -> None:
    async with sandbox_client() as c:
        async with c.http.get(f"{c.sandbox.url}/_sandbox/audiences/123/members") as r:
            assert r.status == 404
            assert "audience 123 not found" in (await r.json())["message"]
        async with c.http.get(f"{c.sandbox.url}/_sandbox/audiences/abc/members") as r:
            assert r.status == 400
            assert "audienceId in the path must be an integer" in (await r.json())["message"]


class _Model:
    """The rule, stated plainly: a member is live while now < last CREATE + current ttl."""

    def __init__(self) -> None:
        self.added: dict[str, float] = {}

    def live(self, now: float, ttl: int) -> dict[str, float]:
        return {m: t + ttl for m, t in self.added.items() if now < t + ttl}


_STEP = st.one_of(
    st.tuples(st.just("wait"), st.integers(0, 3 * api.TTL_MAX_SECONDS // 2)),
    st.tuples(st.just("ttl"), st.sampled_from([0, 1, 60, DAY, api.TTL_MAX_SECONDS])),
    st.tuples(st.sampled_from(["CREATE", "DELETE"]), st.integers(0, 5)),
)


@given(st.lists(_STEP, max_size=40))
def test_membership_follows_the_ttl_rule(steps: list[tuple[str, int]]) -> None:
    clock = FakeClock(START)
    state = SandboxState(SandboxSettings(), clock=clock)
    model, ttl = _Model(), api.TTL_MAX_SECONDS
    state.accept_records(body([record(0, action="DELETE")]))  # creates the audience
    for kind, value in steps:
        if kind == "wait":
            clock.now += value
        elif kind == "ttl":
            ttl = value
            state.update_audience(AUDIENCE, {"metadata": {"ttl": ttl}})
        else:
            state.accept_records(body([record(value, action=kind)]))
            if kind == "CREATE":
                model.added[f"cdp-user-{value}"] = clock.now
            else:
                model.added.pop(f"cdp-user-{value}", None)
        view = state.members_view(AUDIENCE)
        assert view is not None
        expected = model.live(clock.now, ttl)
        assert {m["externalUserId"]: m["expiresAt"] for m in view["members"]} == expected
        assert view["size"] == len(expected)
        audience = state.audience_view(AUDIENCE)
        assert audience is not None
        assert audience["metadata"]["audienceSize"]["dspAudienceSize"] == len(expected)


# -- audienceSize and the match rate ----------------------------------------------------------


async def test_audience_size_counts_received_resolved_and_live_members() -> None:
    async with sandbox_client() as c:
        first = await post(c, record(0), record(1), record(2, countryCode="ZZ"))
        assert first["audienceSize"] == {
            "receivedRecordSize": 3,
            "idResolutionCount": 2,  # ZZ is not a matching country
            "dspAudienceSize": 3,
        }
        second = await post(c, record(0, action="DELETE"))
        assert second["audienceSize"] == {
            "receivedRecordSize": 1,
            "idResolutionCount": 1,
            "dspAudienceSize": 2,
        }
        assert (await metadata(c))["audienceSize"] == {
            "receivedRecordSize": 4,
            "idResolutionCount": 3,
            "dspAudienceSize": 2,
        }


async def test_match_rate_resolves_a_fixed_share_of_members() -> None:
    async def resolved(seed: int, rate: float) -> tuple[int, int]:
        async with sandbox_client(seed=seed, match_rate=rate) as c:
            records = [record(i) for i in range(400)]
            first = (await post(c, *records))["audienceSize"]["idResolutionCount"]
            again = (await post(c, *records))["audienceSize"]["idResolutionCount"]
            return first, again

    first, again = await resolved(seed=8, rate=0.5)
    assert 140 < first < 260
    assert again == first  # a member resolves or not, every time it is sent
    assert await resolved(seed=8, rate=0.5) == (first, first)  # the seed replays it
    assert await resolved(seed=8, rate=0.0) == (0, 0)
    assert await resolved(seed=8, rate=1.0) == (400, 400)


# -- implicit and strict audiences --------------------------------------------------------------


async def test_unknown_audience_is_created_by_its_first_records() -> None:
    async with sandbox_client() as c:
        status, _, _ = await c.call("GET", f"{api.METADATA_PATH}/{AUDIENCE}")
        assert status == 404
        await post(c, record(0))
        status, audience, _ = await c.call("GET", f"{api.METADATA_PATH}/{AUDIENCE}")
        assert status == 200, audience
        assert audience["audienceId"] == AUDIENCE
        assert audience["targetResource"] == {"connectionId": CONNECTION}
        assert audience["metadata"]["ttl"] == api.TTL_MAX_SECONDS
        assert audience["metadata"]["audienceSize"]["dspAudienceSize"] == 1
        assert (await live(c))["cdp-user-0"] == START + api.TTL_MAX_SECONDS


async def test_strict_audiences_refuse_an_unknown_audience() -> None:
    async with sandbox_client(strict_audiences=True) as c:
        status, data, _ = await c.post_records(body())
        assert status == 404
        assert f"audience {AUDIENCE} not found" in data["message"]
        assert c.sandbox.state.ledger(CONNECTION) == []
        status, _, _ = await c.call("GET", f"{api.METADATA_PATH}/{AUDIENCE}")
        assert status == 404
        audience = await new_audience(c, ttl=100)
        assert (await post(c, record(0), audience_id=audience))["jobState"] == "SUCCEEDED"


# -- consent ----------------------------------------------------------------------------------


def consent(amzn_user_data: Any = REMOVE, **geo: Any) -> dict[str, Any]:
    amzn = {} if amzn_user_data is REMOVE else {"amznUserData": amzn_user_data}
    value: dict[str, Any] = {"consent": {"amzn": amzn}}
    if geo:
        value["geo"] = geo
    return value


@pytest.mark.parametrize(
    ("user_consent", "fragment"),
    [
        ({"geo": {"countryCode": "DE"}}, "userConsent must be an object with a consent key"),
        ({**consent(), "gdpr": {}}, ".userConsent has unknown key(s) gdpr"),
        ({**consent(), "geo": "DE"}, ".userConsent.geo must be an object"),
        ({**consent(), "geo": {"country": "DE"}}, ".userConsent.geo has unknown key(s) country"),
        (consent(countryCode="de"), ".userConsent.geo.countryCode must be an ISO 3166-1 alpha-2"),
        (consent(countryCode="DEU"), ".userConsent.geo.countryCode must be an ISO 3166-1 alpha-2"),
        (consent(ipAddress="256.1.1.1"), ".userConsent.geo.ipAddress must be an IPv4 or IPv6"),
        (consent(ipAddress="203.0.113.7 "), ".userConsent.geo.ipAddress must be an IPv4 or IPv6"),
        (consent(ipAddress="fe80::1%eth0"), ".userConsent.geo.ipAddress must be an IPv4 or IPv6"),
        (consent(ipAddress=3405803783), ".userConsent.geo.ipAddress must be an IPv4 or IPv6"),
        (consent(ipAddress=""), ".userConsent.geo.ipAddress must be an IPv4 or IPv6"),
    ],
)
async def test_user_consent_geo_shape(user_consent: Any, fragment: str) -> None:
    async with sandbox_client() as c:
        message = await expect_400(c, body([record(userConsent=user_consent)]), fragment)
    assert "203.0.113" not in message  # a message names the field, never the value


@pytest.mark.parametrize(
    "geo",
    [
        {},
        {"countryCode": "DE"},
        {"ipAddress": "203.0.113.7"},
        {"countryCode": "GB", "ipAddress": "2001:db8::7"},
    ],
)
async def test_user_consent_geo_is_accepted(geo: dict[str, Any]) -> None:
    async with sandbox_client() as c:
        user_consent = {"consent": {"amzn": {"amznUserData": "GRANTED"}}, "geo": geo}
        status, data, _ = await c.post_records(body([record(userConsent=user_consent)]))
        assert status == 202, data


async def test_required_consent_refuses_uk_eea_creates_without_a_signal() -> None:
    async with sandbox_client(require_consent_in=True) as c:
        await post(c, record(7, countryCode="FR", userConsent=consent("GRANTED")))
        final = await post(
            c,
            record(0, countryCode="DE"),  # no consent at all: refused
            record(1, countryCode="NO", userConsent=consent("UNKNOWN")),  # refused
            record(2, countryCode="US", userConsent=consent(countryCode="CH")),  # geo: refused
            record(3, countryCode="GB", userConsent=consent("GRANTED")),
            record(4, countryCode="IS", userConsent=consent("DENIED")),
            record(5, countryCode="US"),  # outside the UK/EEA/CH
            record(6, countryCode="DE", userConsent=consent(countryCode="US")),  # geo wins
            record(7, countryCode="FR", action="DELETE"),  # removals need no consent
        )
        assert final["jobState"] == "PARTIALLYSUCCEEDED"
        refused = {r["externalId"]: r["error"] for r in final["invalidRecords"]}
        assert set(refused) == {"cdp-user-0", "cdp-user-1", "cdp-user-2"}
        assert all("consent" in error for error in refused.values())
        assert final["successful"]["recordsProcessedRate"] == pytest.approx(100.0 * 5 / 8)
        assert set(await live(c)) == {"cdp-user-3", "cdp-user-4", "cdp-user-5", "cdp-user-6"}


async def test_required_consent_uses_the_audience_country_and_tcf_or_gpp() -> None:
    async with sandbox_client(require_consent_in=True) as c:
        payload = audience_body(countryCode="IT", metadata={"ttl": 100})
        _, created, _ = await c.call("POST", api.METADATA_PATH, payload)
        audience = created["audienceId"]
        tcf = {"consent": {"tcf": "CPXxRfAPXxRfAAfKABENB-CgAAAAAAAAAAYgAAAAAAAA"}}
        gpp = {"consent": {"gpp": "DBABMA~CPXxRfAPXxRfAAfKABENB-CgAAAAAAAAAAYgAAAAAAAA"}}
        final = await post(
            c,
            record(0, countryCode=REMOVE),  # the audience's IT: refused
            record(1, countryCode=REMOVE, userConsent=tcf),
            record(2, countryCode=REMOVE, userConsent=gpp),
            audience_id=audience,
        )
        assert [r["externalId"] for r in final["invalidRecords"]] == ["cdp-user-0"]
        assert set(await live(c, audience)) == {"cdp-user-1", "cdp-user-2"}


async def test_consent_is_not_required_by_default() -> None:
    async with sandbox_client() as c:
        final = await post(c, record(0, countryCode="DE"))
        assert final["jobState"] == "SUCCEEDED"
        assert set(await live(c)) == {"cdp-user-0"}


# -- flags ------------------------------------------------------------------------------------


def test_new_settings_are_flags() -> None:
    args = build_parser().parse_args(
        ["sandbox", "--match-rate", "0.25", "--strict-audiences", "--require-consent"]
    )
    assert settings_from_args(args) == SandboxSettings(
        match_rate=0.25, strict_audiences=True, require_consent_in=True
    )
    defaults = settings_from_args(build_parser().parse_args(["sandbox"]))
    assert (defaults.match_rate, defaults.strict_audiences, defaults.require_consent_in) == (
        1.0,
        False,
        False,
    )
