"""TokenProvider: caching, refresh ahead of expiry, single flight, fatal LwA refusals."""

from __future__ import annotations

import asyncio

import orjson
import pytest

from syncd.amazon.auth import MAX_TOKEN_LIFETIME_S, TokenProvider
from syncd.amazon.retry import Retrier, RetryPolicy
from syncd.errors import AuthError, RetryableError
from tests.fakes import FakeTime


class FakeLwa:
    """Answers token requests from a script of (status, body); then issues tokens t1, t2, ..."""

    def __init__(self, *script: tuple[int, dict[str, object]], expires_in: int = 3600) -> None:
        self.script = list(script)
        self.expires_in = expires_in
        self.calls = 0
        self.gate: asyncio.Event | None = None  # when set, requests wait for it
        self.entered = asyncio.Event()

    async def __call__(self) -> tuple[int, bytes, str | None]:
        self.calls += 1
        self.entered.set()
        if self.gate is not None:
            await asyncio.wait_for(self.gate.wait(), timeout=5)
        if self.script:
            status, body = self.script.pop(0)
            return status, orjson.dumps(body), None
        token = {"access_token": f"t{self.calls}", "token_type": "bearer"}
        return 200, orjson.dumps({**token, "expires_in": self.expires_in}), None


def provider(lwa: FakeLwa, fake: FakeTime, attempts: int = 5) -> TokenProvider:
    retrier = Retrier(
        RetryPolicy(max_attempts=attempts, base_s=1, max_s=1),
        clock=fake.clock,
        sleep=fake.sleep,
        rng=lambda: 1.0,
    )
    return TokenProvider(lwa, retrier=retrier, clock=fake.clock)


async def test_token_is_cached() -> None:
    fake, lwa = FakeTime(), FakeLwa()
    auth = provider(lwa, fake)
    assert not auth.held
    assert await auth.token() == "t1"
    assert await auth.token() == "t1"
    assert lwa.calls == 1
    assert auth.held


async def test_twenty_concurrent_callers_share_one_token_request() -> None:
    fake, lwa = FakeTime(), FakeLwa()
    lwa.gate = asyncio.Event()
    auth = provider(lwa, fake)
    callers = [asyncio.ensure_future(auth.token()) for _ in range(20)]
    # One caller is inside the (blocked) request; the other 19 ran before this test resumed.
    await asyncio.wait_for(lwa.entered.wait(), timeout=5)
    lwa.gate.set()
    tokens = await asyncio.wait_for(asyncio.gather(*callers), timeout=5)
    assert tokens == ["t1"] * 20
    assert lwa.calls == 1


async def test_refreshes_ahead_of_expiry() -> None:
    fake, lwa = FakeTime(), FakeLwa(expires_in=3600)
    auth = provider(lwa, fake)
    assert await auth.token() == "t1"
    fake.now += 3600 - 61  # more than a minute left: keep it
    assert await auth.token() == "t1"
    fake.now += 2  # less than a minute left, still valid: refresh now
    assert auth.held
    assert await auth.token() == "t2"
    assert lwa.calls == 2


async def test_short_lived_tokens_refresh_at_ninety_percent() -> None:
    fake, lwa = FakeTime(), FakeLwa(expires_in=10)
    auth = provider(lwa, fake)
    await auth.token()
    fake.now += 8.9
    assert await auth.token() == "t1"
    fake.now += 0.2
    assert await auth.token() == "t2"


async def test_failed_early_refresh_keeps_the_still_valid_token() -> None:
    fake, lwa = FakeTime(), FakeLwa()
    auth = provider(lwa, fake, attempts=1)
    assert await auth.token() == "t1"
    fake.now += 3590
    lwa.script = [(503, {"error": "server_error"})]
    assert await auth.token() == "t1"
    fake.now += 20  # expired now: the next failure must surface
    lwa.script = [(503, {"error": "server_error"})]
    with pytest.raises(RetryableError):
        await auth.token()
    assert not auth.held


@pytest.mark.parametrize("code", ["invalid_grant", "invalid_client", "unauthorized_client"])
async def test_refused_credentials_are_fatal_and_not_retried(code: str) -> None:
    fake, lwa = FakeTime(), FakeLwa((400, {"error": code, "error_description": "nope"}))
    auth = provider(lwa, fake)
    with pytest.raises(AuthError, match=code) as info:
        await auth.token()
    assert info.value.status == 400
    assert auth.fatal_error is info.value
    assert lwa.calls == 1
    assert fake.sleeps == []
    with pytest.raises(AuthError) as again:  # remembered: no second request
        await auth.refresh(stale="t0")
    assert again.value is info.value
    assert lwa.calls == 1


async def test_server_errors_of_the_token_endpoint_are_retried() -> None:
    fake = FakeTime()
    lwa = FakeLwa((500, {"error": "server_error"}), (503, {}))
    auth = provider(lwa, fake)
    assert await auth.token() == "t3"
    assert fake.sleeps == [1.0, 1.0]
    assert auth.fatal_error is None


async def test_concurrent_401s_cause_one_refresh() -> None:
    fake, lwa = FakeTime(), FakeLwa()
    auth = provider(lwa, fake)
    stale = await auth.token()
    fresh = await asyncio.gather(*[auth.refresh(stale=stale) for _ in range(10)])
    assert fresh == ["t2"] * 10
    assert lwa.calls == 2


async def test_mark_fatal_keeps_the_first_error() -> None:
    auth = provider(FakeLwa(), FakeTime())
    first = AuthError("first", status=401)
    auth.mark_fatal(first)
    auth.mark_fatal(AuthError("second", status=401))
    assert auth.fatal_error is first
    with pytest.raises(AuthError, match="first"):
        await auth.token()


async def test_a_body_without_access_token_is_retried_as_a_passing_fault() -> None:
    """A proxy or a gateway answering 200 with something else: retried, not fatal (syncd
    must resume by itself once the token endpoint answers again)."""
    fake, lwa = FakeTime(), FakeLwa((200, {"token_type": "bearer"}), (200, {"html": "<p>"}))
    auth = provider(lwa, fake)
    assert await auth.token() == "t3"
    assert fake.sleeps == [1.0, 1.0]
    assert auth.fatal_error is None
    lwa.script = [(200, {"token_type": "bearer"})] * 5
    with pytest.raises(RetryableError, match="access_token"):
        await provider(lwa, fake).token()


@pytest.mark.parametrize(
    ("status", "body"),
    [(404, {}), (403, {"message": "Forbidden"}), (400, {}), (429, {"error": "slow_down"})],
)
async def test_a_token_answer_that_refuses_no_credential_is_retried(
    status: int, body: dict[str, object]
) -> None:
    """Only LwA's OAuth refusals (invalid_grant, invalid_client, ...) are fatal: a 404 from a
    proxy, a 403 page or a 400 without an OAuth error code is a passing fault."""
    fake, lwa = FakeTime(), FakeLwa((status, body))
    auth = provider(lwa, fake)
    assert await auth.token() == "t2"
    assert auth.fatal_error is None


@pytest.mark.parametrize("odd", ["NaN", "nan", "-inf"])
async def test_a_token_whose_lifetime_is_no_number_is_retried_not_used(odd: str) -> None:
    """An expires_in that float() reads as NaN (or -inf): a token that would be refreshed on
    every call (or never be held) is an invalid answer, retried like any passing fault."""
    fake, lwa = FakeTime(), FakeLwa((200, {"access_token": "odd", "expires_in": odd}))
    auth = provider(lwa, fake)
    assert await auth.token() == "t2"
    assert await auth.token() == "t2"
    assert lwa.calls == 2
    assert auth.held


@pytest.mark.parametrize("odd", [1e30, "inf", "Infinity"])
async def test_a_token_said_to_live_for_ever_is_refreshed_within_a_day(odd: object) -> None:
    fake, lwa = FakeTime(), FakeLwa((200, {"access_token": "odd", "expires_in": odd}))
    auth = provider(lwa, fake)
    assert await auth.token() == "odd"
    fake.now += MAX_TOKEN_LIFETIME_S
    assert not auth.held
    assert await auth.token() == "t2"
