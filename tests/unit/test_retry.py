"""RetryPolicy / Retrier: status taxonomy, full-jitter bounds, Retry-After, attempt/time limits."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from syncd.amazon.retry import (
    MAX_RETRY_AFTER_S,
    Retrier,
    RetryPolicy,
    classify,
    nothing_accepted,
    parse_retry_after,
    retry_reason,
)
from syncd.errors import (
    AmazonError,
    NotSentError,
    RejectedError,
    RetryableError,
    ThrottledError,
)
from tests.fakes import FakeTime


class Failing:
    """An attempt function that raises the given errors in turn, then returns 'ok'."""

    def __init__(self, *errors: AmazonError) -> None:
        self.errors = list(errors)
        self.calls = 0

    async def __call__(self) -> str:
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)
        return "ok"


def retrier(fake: FakeTime, rng: float = 1.0, **policy: Any) -> Retrier:
    return Retrier(
        RetryPolicy(**policy),
        clock=fake.clock,
        sleep=fake.sleep,
        rng=lambda: rng,
    )


@pytest.mark.parametrize(
    ("status", "kind"),
    [
        (429, ThrottledError),
        (500, RetryableError),
        (502, RetryableError),
        (503, RetryableError),
        (504, RetryableError),
        (408, RetryableError),
        (501, RejectedError),
        (400, RejectedError),
        (403, RejectedError),
        (404, RejectedError),
        (413, RejectedError),
    ],
)
def test_classify(status: int, kind: type[AmazonError]) -> None:
    assert classify(status) is kind


@given(
    attempt=st.integers(min_value=1, max_value=200),
    base=st.floats(min_value=0.001, max_value=10),
    cap=st.floats(min_value=0, max_value=120),
    r=st.floats(min_value=0, max_value=1, exclude_max=True),
)
def test_backoff_is_full_jitter_within_the_capped_exponential(
    attempt: int, base: float, cap: float, r: float
) -> None:
    policy = RetryPolicy(base_s=base, max_s=cap)
    ceiling = min(cap, base * 2.0 ** (attempt - 1))
    wait = policy.backoff(attempt, lambda: r)
    assert 0 <= wait <= ceiling
    assert wait == pytest.approx(r * ceiling)


def test_backoff_doubles_until_the_cap() -> None:
    policy = RetryPolicy(base_s=0.5, max_s=3.0)
    assert [policy.backoff(a, lambda: 1.0) for a in range(1, 6)] == [0.5, 1.0, 2.0, 3.0, 3.0]
    assert policy.backoff(3, lambda: 0.0) == 0.0


@given(
    retry_after=st.floats(min_value=0, max_value=1000),
    r=st.floats(min_value=0, max_value=1, exclude_max=True),
)
def test_delay_never_shorter_than_retry_after(retry_after: float, r: float) -> None:
    policy = RetryPolicy(base_s=1, max_s=30)
    wait = policy.delay(1, ThrottledError("x", retry_after=retry_after), lambda: r)
    assert wait >= retry_after
    assert wait == max(retry_after, r * 1.0)


def test_invalid_policy_is_refused() -> None:
    with pytest.raises(ValueError, match="max_attempts"):
        RetryPolicy(max_attempts=0)


async def test_retries_until_success_with_recorded_delays() -> None:
    fake = FakeTime()
    fn = Failing(RetryableError("boom", status=503), ThrottledError("slow", retry_after=7.0))
    result = await retrier(fake, rng=0.5, base_s=2, max_s=60).call(fn, endpoint="t")
    assert result == "ok"
    assert fn.calls == 3
    # attempt 1: 0.5 * 2; attempt 2: Retry-After 7 beats 0.5 * 4
    assert fake.sleeps == [1.0, 7.0]


async def test_gives_up_after_max_attempts_raising_the_last_error() -> None:
    fake = FakeTime()
    errors = [RetryableError(f"e{i}", status=500) for i in range(5)]
    fn = Failing(*errors)
    with pytest.raises(RetryableError) as info:
        await retrier(fake, max_attempts=3, base_s=1, max_s=1).call(fn, endpoint="t")
    assert info.value is errors[2]
    assert fn.calls == 3
    assert fake.sleeps == [1.0, 1.0]


async def test_gives_up_when_the_next_wait_would_exceed_max_time() -> None:
    fake = FakeTime()
    fn = Failing(*[RetryableError("e", status=500) for _ in range(10)])
    with pytest.raises(RetryableError):
        await retrier(fake, max_attempts=10, max_time_s=10, base_s=4, max_s=60).call(
            fn, endpoint="t"
        )
    assert fake.sleeps == [4.0]  # the next wait (8 s) would end at 12 s > 10 s
    assert fn.calls == 2


async def test_retry_after_beyond_the_time_budget_is_not_waited_for() -> None:
    fake = FakeTime()
    fn = Failing(ThrottledError("slow", retry_after=3600))
    with pytest.raises(ThrottledError):
        await retrier(fake, max_time_s=300).call(fn, endpoint="t")
    assert fake.sleeps == []


async def test_fatal_errors_are_not_retried() -> None:
    fake = FakeTime()
    fn = Failing(RejectedError("bad", status=400))
    with pytest.raises(RejectedError):
        await retrier(fake).call(fn, endpoint="t")
    assert fn.calls == 1
    assert fake.sleeps == []


async def test_retry_if_can_veto_a_retry() -> None:
    fake = FakeTime()
    fn = Failing(RetryableError("timeout"))
    with pytest.raises(RetryableError):
        await retrier(fake).call(fn, endpoint="t", retry_if=lambda e: e.status is not None)
    assert fn.calls == 1


def test_parse_retry_after() -> None:
    assert parse_retry_after("5") == 5.0
    assert parse_retry_after(" 1.5 ") == 1.5
    assert parse_retry_after("-3") == 0.0
    assert parse_retry_after(None) is None
    assert parse_retry_after("") is None
    assert parse_retry_after("soon") is None
    assert parse_retry_after("nan") is None
    future = format_datetime(datetime.now(UTC) + timedelta(seconds=120), usegmt=True)
    assert 100 < (parse_retry_after(future) or 0) <= 120
    past = format_datetime(datetime.now(UTC) - timedelta(seconds=120), usegmt=True)
    assert parse_retry_after(past) == 0.0
    # a wait past reason (inf, a huge number, a far date) is capped: a connection is never
    # blocked for good by one header; it probes again after MAX_RETRY_AFTER_S
    far = format_datetime(datetime.now(UTC) + timedelta(days=400), usegmt=True)
    for value in ("inf", "1e300", far, str(MAX_RETRY_AFTER_S + 1)):
        assert parse_retry_after(value) == MAX_RETRY_AFTER_S


def test_retry_reason_labels() -> None:
    assert retry_reason(ThrottledError("x")) == "throttled"
    assert retry_reason(RetryableError("x", status=502)) == "server_error"
    timeout = RetryableError("x")
    timeout.__cause__ = TimeoutError()
    assert retry_reason(timeout) == "timeout"
    reset = RetryableError("x")
    reset.__cause__ = ConnectionResetError()
    assert retry_reason(reset) == "connection"


@pytest.mark.parametrize(
    ("error", "proves"),
    [
        (ThrottledError("429", retry_after=3.0), True),
        (NotSentError("cannot connect"), True),
        *((RejectedError(f"{s}", status=s), True) for s in (400, 401, 403, 404, 413)),
        (RejectedError("501", status=501), False),
        (RejectedError("409", status=409), False),
        *((RetryableError(f"{s}", status=s), False) for s in (408, 500, 502, 503, 504)),
        (RetryableError("no answer"), False),  # a timeout or a dropped connection
        (AmazonError("no jobRequestId in a 202"), False),
        # the token request failed: the records POST never left, whatever LwA answered
        *((RetryableError(f"token {s}", status=s, operation="token"), True) for s in (503, 404)),
        (RetryableError("token: no answer", operation="token"), True),
        (RetryableError("LwA answered without a token", status=200, operation="token"), True),
        (ThrottledError("token 429", operation="token"), True),
    ],
)
def test_only_answers_that_prove_nothing_was_accepted_release_a_records_post(
    error: AmazonError, proves: bool
) -> None:
    assert nothing_accepted(error) is proves
