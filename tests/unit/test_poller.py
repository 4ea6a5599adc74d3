"""The poller with a fake Amazon client, on a real SQLite store with an injected clock."""

from __future__ import annotations

import asyncio
import dataclasses
import importlib
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import text
from sqlalchemy.exc import OperationalError
from structlog.testing import capture_logs

from syncd.amazon.api import InvalidRecord, JobStatus
from syncd.config import PollConfig
from syncd.errors import AuthError, RejectedError, RetryableError
from syncd.jobs import (
    DEAD_LETTER_LEASE_S,
    IDLE_MAX_S,
    UNKNOWN_JOB_GIVE_UP_S,
    MemberOutcomes,
    Poller,
    poll_interval,
)
from syncd.members import JobIdReused, MemberTable, member_change
from syncd.model import Action, member_record
from syncd.observability.metrics import REGISTRY
from syncd.store import JobRow, NewJob, Store
from syncd.store.reasons import INVALID_REASONS
from tests.fakes import T0, FakeClock

CFG = PollConfig(
    first_delay_s=10, max_interval_s=60, max_job_age_s=1000, concurrency=2, claim_batch=5
)


class FakeClient:
    """Answers from a script per job (default PENDING); records every GET. `during_get` runs
    inside each GET (e.g. to look at the store, or to let the clock run as a throttled GET
    would); `in_flight` and `peak_per_job` count GETs of one job under way at once."""

    def __init__(self) -> None:
        self.script: dict[str, list[JobStatus | Exception]] = {}
        self.calls: list[str] = []
        self.active = 0
        self.peak = 0
        self.called = asyncio.Event()
        self.during_get: Callable[[str], Awaitable[None]] | None = None
        self.in_flight: Counter[str] = Counter()
        self.peak_per_job = 0

    async def get_job(self, job_request_id: str) -> JobStatus:
        self.calls.append(job_request_id)
        self.called.set()
        self.active += 1
        self.peak = max(self.peak, self.active)
        self.in_flight[job_request_id] += 1
        self.peak_per_job = max(self.peak_per_job, self.in_flight[job_request_id])
        try:
            await asyncio.sleep(0)  # let other polls start: the concurrency bound is observable
            if self.during_get is not None:
                await self.during_get(job_request_id)
        finally:
            self.active -= 1
            self.in_flight[job_request_id] -= 1
        queue = self.script.get(job_request_id, [])
        answer = queue.pop(0) if queue else JobStatus(job_request_id, "PENDING")
        if isinstance(answer, Exception):
            raise answer
        return answer


@pytest.fixture
def client() -> FakeClient:
    return FakeClient()


@pytest.fixture
def poller(store: Store, client: FakeClient, clock: FakeClock) -> Poller:
    return Poller(store, client, CFG, owner="replica-a", clock=clock)


async def add(store: Store, job_id: str, after: float = CFG.first_delay_s) -> None:
    await store.add_job(NewJob(job_id, "conn-1", 7, "vip", 100, 60, 40), first_poll_after_s=after)


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_interval_doubles_from_first_delay_up_to_the_maximum() -> None:
    assert [poll_interval(n, CFG) for n in range(5)] == [10, 20, 40, 60, 60]
    assert poll_interval(10_000, CFG) == 60


async def test_backoff_grows_and_terminal_job_is_never_polled_again(
    store: Store, client: FakeClient, poller: Poller, clock: FakeClock
) -> None:
    await add(store, "job-1")
    client.script["job-1"] = [JobStatus("job-1", "PENDING")] * 4 + [
        JobStatus("job-1", "SUCCEEDED", processed_rate=100.0)
    ]
    assert await poller.poll_once() == IDLE_MAX_S  # first poll is due in 10 s
    assert client.calls == []
    poll_times = []
    for _ in range(200):
        clock.advance(1)
        await poller.poll_once()
        if len(client.calls) > len(poll_times):
            poll_times.append(clock.now - T0)
    # polled at 10, then +20, +40, +60 (capped), +60; terminal after the fifth poll
    assert poll_times == [10, 30, 70, 130, 190]
    [row] = await store.list_jobs()
    assert (row.state, row.polls, row.terminal_at) == ("SUCCEEDED", 5, T0 + 190)


async def test_terminal_job_records_metrics_and_reasons(
    store: Store, client: FakeClient, poller: Poller, clock: FakeClock
) -> None:
    reason = "INVALID_HASHED_PII: unit test 42"  # Amazon's text: its class is the label
    before_finished = sample("syncd_jobs_finished_total", state="PARTIALLYSUCCEEDED")
    before_invalid = sample("syncd_invalid_records_total", reason="invalid_pii")
    before_rate = sample("syncd_job_processed_rate_percent_count")
    await add(store, "job-1", after=0)
    client.script["job-1"] = [
        JobStatus(
            "job-1",
            "PARTIALLYSUCCEEDED",
            processed_rate=97.0,
            invalid_records=(InvalidRecord("p1", reason), InvalidRecord("p2", reason)),
        )
    ]
    clock.advance(5)
    await poller.poll_once()
    assert sample("syncd_jobs_finished_total", state="PARTIALLYSUCCEEDED") == before_finished + 1
    assert sample("syncd_invalid_records_total", reason="invalid_pii") == before_invalid + 2
    assert sample("syncd_invalid_records_total", reason=reason) == 0
    assert sample("syncd_job_processed_rate_percent_count") == before_rate + 1
    assert sample("syncd_jobs", state="PARTIALLYSUCCEEDED") >= 1
    [row] = await store.list_jobs()
    assert row.invalid_reasons == {"invalid_pii": 2}
    clock.advance(10_000)
    for _ in range(3):
        await poller.poll_once()
    assert client.calls == ["job-1"]


async def test_audience_counts_match_figures_and_failed_jobs_in_a_row(
    store: Store, client: FakeClient, poller: Poller, clock: FakeClock
) -> None:
    audience = f"aud-{uuid.uuid4().hex[:6]}"  # series of their own: the registry is global
    states = ["FAILED", "FAILED", "SUCCEEDED", "FAILED", "FAILED", "FAILED"]
    seen = []
    for i, state in enumerate(states):
        job_id = f"job-{i}"
        await store.add_job(
            NewJob(job_id, "conn-1", 7, audience, 100, 100, 0), first_poll_after_s=0
        )
        client.script[job_id] = [
            JobStatus(job_id, state, received_record_size=100, id_resolution_count=60)
        ]
        clock.advance(1)
        await poller.poll_once()
        seen.append(sample("syncd_audience_failed_jobs_in_row", audience=audience))
    assert seen == [1, 2, 0, 1, 2, 3]
    assert sample("syncd_audience_job_records_total", audience=audience, kind="received") == 600
    assert sample("syncd_audience_job_records_total", audience=audience, kind="matched") == 360


async def test_old_jobs_expire_and_are_not_polled(
    store: Store, client: FakeClient, poller: Poller, clock: FakeClock
) -> None:
    before = sample("syncd_jobs_finished_total", state="EXPIRED")
    await add(store, "old", after=2000)  # never due before it is too old
    clock.advance(1000)
    await poller.poll_once()
    assert client.calls == []
    assert await store.job_states(["old"]) == {"old": "EXPIRED"}
    assert sample("syncd_jobs_finished_total", state="EXPIRED") == before + 1
    clock.advance(5000)
    await poller.poll_once()
    assert client.calls == []


async def test_failed_get_is_retried_with_backoff(
    store: Store, client: FakeClient, poller: Poller, clock: FakeClock
) -> None:
    await add(store, "job-1", after=0)
    client.script["job-1"] = [RetryableError("HTTP 503", status=503)]
    await poller.poll_once()
    [row] = await store.list_jobs()
    assert (row.state, row.polls, row.error) == ("PENDING", 1, "HTTP 503")
    assert row.next_poll_at == T0 + poll_interval(1, CFG)
    clock.advance(poll_interval(1, CFG))
    await poller.poll_once()
    assert client.calls == ["job-1", "job-1"]
    [row] = await store.list_jobs()
    assert (row.polls, row.error) == (2, None)


async def test_an_answer_the_client_cannot_read_fails_that_poll_alone(
    store: Store, client: FakeClient, poller: Poller
) -> None:
    """An unexpected error from one GET (an answer of a shape no one foresaw) is that job's
    failed poll, retried later; the other polls of the round go on and are stored."""
    await add(store, "odd", after=0)
    await add(store, "fine", after=0)
    client.script["odd"] = [TypeError("'int' object is not iterable")]
    client.script["fine"] = [JobStatus("fine", "SUCCEEDED", 100.0)]
    await poller.poll_once()
    rows = {row.job_request_id: row for row in await store.list_jobs()}
    assert rows["fine"].state == "SUCCEEDED"
    assert (rows["odd"].state, rows["odd"].polls) == ("PENDING", 1)
    assert rows["odd"].error is not None


@pytest.mark.parametrize(
    "odd",
    [
        {"invalidRecords": 1},
        {"invalidRecords": "x"},
        {"invalidRecords": [1, None, {"externalUserId": 5}]},
        {"successful": [], "audienceSize": 3},
        {"successful": {"recordsProcessedRate": "100"}},
    ],
)
def test_a_job_status_of_odd_field_types_is_read_without_them(odd: dict[str, Any]) -> None:
    from syncd.amazon.client import _job_status

    status = _job_status({"jobState": "SUCCEEDED", **odd}, "job-1", "get_job")
    assert (status.job_request_id, status.job_state) == ("job-1", "SUCCEEDED")
    assert status.terminal


async def test_concurrency_is_bounded_and_full_batches_loop_at_once(
    store: Store, client: FakeClient, poller: Poller, clock: FakeClock
) -> None:
    for i in range(7):
        await add(store, f"job-{i}", after=0)
    assert await poller.poll_once() == 0.0  # a full claim: more may be due
    assert len(client.calls) == CFG.concurrency  # it claims only what it can poll at once
    assert client.peak == CFG.concurrency
    while await poller.poll_once() == 0.0:
        pass
    assert Counter(client.calls) == {f"job-{i}": 1 for i in range(7)}


async def test_two_pollers_never_poll_one_job_twice(
    store: Store, client: FakeClient, clock: FakeClock
) -> None:
    for i in range(40):
        await add(store, f"job-{i}", after=0)
    a = Poller(store, client, CFG, owner="a", clock=clock)
    b = Poller(store, client, CFG, owner="b", clock=clock)
    while len(client.calls) < 40:
        await asyncio.gather(a.poll_once(), b.poll_once())
    assert Counter(client.calls) == {f"job-{i}": 1 for i in range(40)}


async def test_auth_error_stops_the_poller(
    store: Store, client: FakeClient, poller: Poller
) -> None:
    await add(store, "job-1", after=0)
    client.script["job-1"] = [AuthError("invalid_grant")]
    with pytest.raises(AuthError):  # ends by itself: the daemon turns fatal and unready
        await asyncio.wait_for(poller.run(asyncio.Event()), timeout=10)
    assert client.calls == ["job-1"]


async def test_run_polls_until_stopped(store: Store, client: FakeClient, poller: Poller) -> None:
    await add(store, "job-1", after=0)
    stop = asyncio.Event()
    task = asyncio.ensure_future(poller.run(stop))
    await asyncio.wait_for(client.called.wait(), timeout=10)
    stop.set()
    await asyncio.wait_for(task, timeout=10)
    assert client.calls == ["job-1"]
    [row] = await store.list_jobs()
    assert row.polls == 1


async def owned_by(store: Store, owner: str) -> list[JobRow]:
    return [j for j in await store.list_jobs(limit=1000) if j.owner == owner]


async def test_it_claims_no_more_jobs_than_it_polls_at_once(
    store: Store, client: FakeClient, poller: Poller
) -> None:
    """A job claimed but waiting for a free slot would spend its lease waiting."""
    for i in range(12):
        await add(store, f"job-{i}", after=0)
    held: list[int] = []

    async def look(_job: str) -> None:
        held.append(len(await owned_by(store, "replica-a")))

    client.during_get = look
    while await poller.poll_once() == 0.0:
        pass
    assert len(client.calls) == 12
    assert max(held) <= CFG.concurrency


async def test_the_lease_never_runs_out_while_a_get_is_under_way(
    store: Store, client: FakeClient, clock: FakeClock
) -> None:
    """Throttled GETs take long (here 40 s of a 100 s lease each, one at a time): every job is
    still leased to the poller when its GET starts and when it ends."""
    cfg = dataclasses.replace(CFG, concurrency=1)
    poller = Poller(store, client, cfg, owner="a", lease_s=100, clock=clock)
    for i in range(5):
        await add(store, f"job-{i}", after=0)
        client.script[f"job-{i}"] = [JobStatus(f"job-{i}", "SUCCEEDED")]
    leases: list[bool] = []

    async def throttled(job_id: str) -> None:
        for _ in range(2):
            [row] = [j for j in await store.list_jobs() if j.job_request_id == job_id]
            leases.append(row.owner == "a" and (row.claimed_until or 0) > clock.now)
            clock.advance(40)

    client.during_get = throttled
    while await poller.poll_once() == 0.0:
        pass
    assert len(client.calls) == 5
    assert all(leases), leases


async def test_throttled_pollers_never_poll_one_job_at_once_nor_after_it_ended(
    store: Store, client: FakeClient, clock: FakeClock
) -> None:
    """Two pollers whose GETs are slow (each GET lasts 45 s of a 100 s lease on the store's
    clock, GETs under way at once overlapping in time, and the other poller gets its turn
    meanwhile): no job is polled by both at once, and none is polled again once its terminal
    state is stored."""
    cfg = dataclasses.replace(CFG, claim_batch=50, concurrency=4)
    a = Poller(store, client, cfg, owner="a", lease_s=100, clock=clock)
    b = Poller(store, client, cfg, owner="b", lease_s=100, clock=clock)
    ids = [f"job-{i}" for i in range(30)]
    for job_id in ids:
        await add(store, job_id, after=0)
        client.script[job_id] = [JobStatus(job_id, "SUCCEEDED", processed_rate=100.0)]
    polled_after_end: list[str] = []

    async def throttled(job_id: str) -> None:
        started = clock()  # the look at the store below is part of the GET's 45 s
        if (await store.job_states([job_id]))[job_id] != "PENDING":
            polled_after_end.append(job_id)
        for step in (1, 2, 3):  # 45 s from its own start, whatever else is under way
            clock.advance(max(0.0, started + 15 * step - clock()))
            await asyncio.sleep(0)  # the other poller runs: claims, GETs, records

    async def ended() -> bool:
        return set((await store.job_states(ids)).values()) == {"SUCCEEDED"}

    async def drive(poller: Poller) -> None:  # both loop at once, as two replicas would
        for _ in range(200):
            if await ended():
                return
            await poller.poll_once()

    client.during_get = throttled
    await asyncio.gather(drive(a), drive(b))
    assert await ended()
    assert client.peak_per_job == 1
    assert polled_after_end == []
    # every job polled; a second GET of one is allowed only before its end was stored (a lease
    # that ran out on the shared fake clock while its result waited for the store), which
    # `polled_after_end` rules out
    assert set(client.calls) == set(ids)


async def test_a_get_that_outlasts_the_lease_is_given_up(store: Store, client: FakeClient) -> None:
    """A GET still under way when the lease would run out is abandoned (a failed poll, retried
    later): past the lease another replica may claim and poll the job."""
    poller = Poller(store, client, CFG, owner="a", lease_s=0.2)
    await add(store, "job-1", after=0)

    async def hang(_job: str) -> None:
        await asyncio.Event().wait()

    client.during_get = hang
    await asyncio.wait_for(poller.poll_once(), timeout=10)
    [row] = await store.list_jobs()
    assert (row.state, row.polls, row.owner) == ("PENDING", 1, None)
    assert row.error is not None
    assert "lease" in row.error


class FlakyStore:
    """The store, but the next `failures` record_poll calls fail (a store hiccup)."""

    def __init__(self, store: Store, failures: int) -> None:
        self.store = store
        self.failures = failures

    def __getattr__(self, name: str) -> Any:
        return getattr(self.store, name)

    async def record_poll(self, *args: Any, **kwargs: Any) -> bool:
        if self.failures > 0:
            self.failures -= 1
            raise ConnectionError("store unreachable")
        return await self.store.record_poll(*args, **kwargs)


async def test_a_poll_result_survives_a_store_hiccup(
    store: Store, client: FakeClient, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    # syncd.store.persist is also the name of the function: reach the module itself
    monkeypatch.setattr(importlib.import_module("syncd.store.persist"), "FIRST_PAUSE_S", 0.001)
    poller = Poller(FlakyStore(store, 3), client, CFG, owner="a", clock=clock)
    await add(store, "job-1", after=0)
    client.script["job-1"] = [JobStatus("job-1", "SUCCEEDED", processed_rate=100.0)]
    await poller.poll_once()
    assert await store.job_states(["job-1"]) == {"job-1": "SUCCEEDED"}
    assert client.calls == ["job-1"]


async def test_a_job_ended_by_another_replica_is_counted_once(
    store: Store, client: FakeClient, clock: FakeClock
) -> None:
    """A result stored after the job ended elsewhere (the other replica's terminal answer won)
    changes nothing and is not counted again."""
    before = sample("syncd_jobs_finished_total", state="FAILED")
    a = Poller(store, client, CFG, owner="a", lease_s=100, clock=clock)
    await add(store, "job-1", after=0)
    client.script["job-1"] = [JobStatus("job-1", "FAILED")]

    async def ended_elsewhere(_job: str) -> None:
        clock.advance(150)  # a's lease ran out; b claims, polls and stores the end
        [job] = await store.claim_due_jobs("b", 10, 100)
        assert await store.record_poll(job, JobStatus("job-1", "SUCCEEDED"), next_poll_in_s=0)

    client.during_get = ended_elsewhere
    await a.poll_once()
    assert await store.job_states(["job-1"]) == {"job-1": "SUCCEEDED"}
    assert sample("syncd_jobs_finished_total", state="FAILED") == before


HOSTILE = st.text(
    st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=0, max_size=300
) | st.sampled_from(
    ["jane.doe@example.com", "+44 20 7946 0958", "x" * 10_000, '\x00\n\r{}"', "INVALID_\u202e"]
)


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(texts=st.lists(HOSTILE, min_size=1, max_size=8))
async def test_invalid_record_reasons_stay_a_small_fixed_set(
    store: Store, client: FakeClient, poller: Poller, texts: list[str]
) -> None:
    """Whatever Amazon writes in invalidRecords[].error, the metric's reason labels and the
    stored reason keys stay within the few classes, and the text itself is kept nowhere."""
    job_id = f"job-{uuid.uuid4().hex}"
    await add(store, job_id, after=0)
    invalid = tuple(InvalidRecord(f"p{i}", t) for i, t in enumerate(texts))
    client.script[job_id] = [JobStatus(job_id, "PARTIALLYSUCCEEDED", 90.0, invalid)]
    await poller.poll_once()
    [row] = [j for j in await store.list_jobs(limit=1000) if j.job_request_id == job_id]
    assert set(row.invalid_reasons) <= set(INVALID_REASONS)
    assert sum(row.invalid_reasons.values()) == len(texts)
    labels = {
        s.labels["reason"]
        for m in REGISTRY.collect()
        if m.name == "syncd_invalid_records"
        for s in m.samples
    }
    assert labels <= set(INVALID_REASONS)


# -- terminal jobs -> their members ------------------------------------------------------------


class MemberDeadLetterSink:
    def __init__(self) -> None:
        self.sent: list[tuple[dict[str, Any], str, str]] = []

    async def dead_letter_member(self, value: bytes, reason: str, detail: str) -> None:
        self.sent.append((orjson.loads(value), reason, detail))


async def sent_members(
    table: MemberTable, job_id: str, ids: list[str], audience_id: int = 7
) -> None:
    """Record `ids` as changes of `audience_id` and send them as `job_id` (its row stored)."""
    await table.record_changes(
        member_change(
            audience_id,
            member_record(euid, "US", Action.ADD, [{"email": "c" * 64}]),
            occurred_at=T0,
            position=i,
        )
        for i, euid in enumerate(ids)
    )
    claims = await table.claim_due([audience_id], 100, 60, "sender")
    job = NewJob(job_id, "conn-1", audience_id, "vip", len(ids), len(ids), 0)
    assert await table.store_job(claims, job, first_poll_after_s=0) == []


async def test_a_terminal_job_settles_its_members_and_dead_letters_the_invalid_ones(
    store: Store, client: FakeClient, clock: FakeClock
) -> None:
    table, sink = MemberTable(store), MemberDeadLetterSink()
    outcomes = MemberOutcomes(table, sink, {7: "vip"}, max_attempts=2)
    poller = Poller(store, client, CFG, owner="a", clock=clock, outcomes=outcomes)
    await sent_members(table, "ok", ["u1", "u2"])
    client.script["ok"] = [
        JobStatus(
            "ok",
            "PARTIALLYSUCCEEDED",
            invalid_records=(InvalidRecord("u2", "INVALID_HASHED_PII: no identifier resolved"),),
        )
    ]
    await poller.poll_once()
    u1, u2 = await table.member(7, "u1"), await table.member(7, "u2")
    assert u1 is not None
    assert u2 is not None
    assert (u1.outcome, u1.job_request_id, u1.due_since) == ("confirmed", None, None)
    assert (u2.outcome, u2.reason, u2.due_since) == ("invalid", "invalid_pii", None)
    await outcomes.send_dead_letters()
    [(value, reason, detail)] = sink.sent
    assert (value["audience"], value["audience_id"], value["externalUserId"]) == ("vip", 7, "u2")
    assert (value["action"], value["record"]["externalUserId"]) == ("CREATE", "u2")
    assert (reason, detail) == ("invalid_pii", "INVALID_HASHED_PII: no identifier resolved")
    assert await store.job_states(["ok"]) == {"ok": "PARTIALLYSUCCEEDED"}
    # FAILED: due again, dead-lettered after max_attempts failed sends
    await sent_members(table, "f1", ["u3"])
    client.script["f1"] = [JobStatus("f1", "FAILED")]
    await poller.poll_once()
    u3 = await table.member(7, "u3")
    assert u3 is not None
    assert (u3.outcome, u3.attempts, u3.due_since is not None) == ("failed", 1, True)
    claims = await table.claim_due([7], 10, 60, "sender")
    assert (
        await table.store_job(claims, NewJob("f2", "c", 7, "vip", 1, 1, 0), first_poll_after_s=0)
        == []
    )
    client.script["f2"] = [JobStatus("f2", "FAILED")]
    await poller.poll_once()
    u3 = await table.member(7, "u3")
    assert u3 is not None
    assert u3.due_since is None  # not resent until it changes
    await outcomes.send_dead_letters()
    assert [(v["externalUserId"], r, d) for v, r, d in sink.sent[1:]] == [
        ("u3", "failed", "job f2 FAILED; 2 sends failed")
    ]


async def test_an_expired_job_makes_its_members_due_again(
    store: Store, client: FakeClient, clock: FakeClock
) -> None:
    table = MemberTable(store)
    poller = Poller(
        store,
        client,
        CFG,
        owner="a",
        clock=clock,
        outcomes=MemberOutcomes(table, MemberDeadLetterSink(), {7: "vip"}),
    )
    await sent_members(table, "old", ["u1"])
    clock.advance(CFG.max_job_age_s + 1)
    await poller.poll_once()
    assert await store.job_states(["old"]) == {"old": "EXPIRED"}
    [claim] = await table.claim_due([7], 10, 60, "sender")  # due again: the same action resent
    assert (claim.external_user_id, claim.action) == ("u1", "add")


async def test_a_job_amazon_does_not_know_is_given_up_after_an_hour_not_max_job_age(
    store: Store, client: FakeClient, clock: FakeClock
) -> None:
    """A GET answering 404 ("unknown job") for good held the job's members (their changes, their
    refresh) until `poll.max_job_age_s`, 7 days by default. A 404 right after the 202 may be
    Amazon not showing the job yet: it is retried for UNKNOWN_JOB_GIVE_UP_S, then the job is
    EXPIRED (never polled again) and its members are due again."""
    cfg = dataclasses.replace(CFG, max_job_age_s=7 * 86400.0)
    table = MemberTable(store)
    outcomes = MemberOutcomes(table, MemberDeadLetterSink(), {7: "vip"})
    poller = Poller(store, client, cfg, owner="a", clock=clock, outcomes=outcomes)
    await sent_members(table, "gone", ["u1"])
    client.script["gone"] = [RejectedError("HTTP 404: job not found", status=404)] * 1000
    await poller.poll_once()
    assert await store.job_states(["gone"]) == {"gone": "PENDING"}  # too young to give up
    while clock.now - T0 < UNKNOWN_JOB_GIVE_UP_S + cfg.max_interval_s:
        clock.advance(cfg.max_interval_s)
        await poller.poll_once()
    polls = len(client.calls)
    assert await store.job_states(["gone"]) == {"gone": "EXPIRED"}
    [row] = await store.list_jobs()
    assert "404" in (row.error or "")
    [claim] = await table.claim_due([7], 10, 60, "sender")
    assert (claim.external_user_id, claim.action) == ("u1", "add")
    clock.advance(10 * cfg.max_interval_s)
    await poller.poll_once()
    assert len(client.calls) == polls  # never polled again


async def test_jobs_amazon_never_knows_count_as_failed_sends(
    store: Store, client: FakeClient, clock: FakeClock
) -> None:
    """A job given up on 404s made its members due again with no count of attempts: where every
    GET answers 404 (an `amazon.api_url` of another region that still takes POSTs), the members
    were sent again each hour for good, spending their budget each time. Each give-up is a failed
    send now: after `max_attempts` of them the member is dead-lettered (`unknown_job`) and not
    sent again until it changes."""
    cfg = dataclasses.replace(CFG, max_job_age_s=7 * 86400.0)
    table, sink = MemberTable(store), MemberDeadLetterSink()
    outcomes = MemberOutcomes(table, sink, {7: "vip"}, max_attempts=2)
    poller = Poller(store, client, cfg, owner="a", clock=clock, outcomes=outcomes)
    not_found = RejectedError("HTTP 404: job not found", status=404)

    async def given_up(job_id: str) -> None:
        client.script[job_id] = [not_found] * 1000
        start = clock.now
        while await store.job_states([job_id]) == {job_id: "PENDING"}:
            assert clock.now - start < 2 * UNKNOWN_JOB_GIVE_UP_S
            clock.advance(cfg.max_interval_s)
            await poller.poll_once()

    await sent_members(table, "g1", ["u1"])
    await given_up("g1")
    u1 = await table.member(7, "u1")
    assert u1 is not None
    assert (u1.outcome, u1.reason, u1.attempts) == ("failed", "unknown_job", 1)
    claims = await table.claim_due([7], 10, 60, "sender")  # due again: sent once more
    assert [c.external_user_id for c in claims] == ["u1"]
    assert (
        await table.store_job(claims, NewJob("g2", "c", 7, "vip", 1, 1, 0), first_poll_after_s=0)
        == []
    )
    await given_up("g2")
    assert await table.claim_due([7], 10, 60, "sender") == []  # not sent again until it changes
    await outcomes.send_dead_letters()
    assert [(v["externalUserId"], r, d) for v, r, d in sink.sent] == [
        ("u1", "unknown_job", "job g2 unknown_job; 2 sends failed")
    ]


async def test_a_404_between_answers_gives_up_no_job_amazon_still_processes(
    store: Store, client: FakeClient, clock: FakeClock
) -> None:
    """One 404 (a fault between syncd and Amazon: a gateway, a deploy at Amazon) of a job Amazon
    had answered PENDING for two hours gave the job up at once, because the job was over an
    hour old: its members were sent again (budget spent twice) while Amazon still processed it,
    and a member's newer change could then be overtaken by the older one. A job is given up only
    once Amazon has answered 404 for UNKNOWN_JOB_GIVE_UP_S with no status between (the first
    404 since its last status starts the hour)."""
    cfg = dataclasses.replace(CFG, max_job_age_s=7 * 86400.0)
    table = MemberTable(store)
    outcomes = MemberOutcomes(table, MemberDeadLetterSink(), {7: "vip"})
    poller = Poller(store, client, cfg, owner="a", clock=clock, outcomes=outcomes)
    await sent_members(table, "slow", ["u1"])
    not_found = RejectedError("HTTP 404: job not found", status=404)

    async def polled_until(t: float) -> str:
        while clock.now - T0 < t:
            clock.advance(cfg.max_interval_s)
            await poller.poll_once()
        return (await store.job_states(["slow"]))["slow"]

    assert await polled_until(2 * UNKNOWN_JOB_GIVE_UP_S) == "PENDING"  # Amazon: PENDING
    client.script["slow"] = [not_found]
    assert await polled_until(2 * UNKNOWN_JOB_GIVE_UP_S + 5 * cfg.max_interval_s) == "PENDING"
    # 404s for most of an hour, one PENDING answer, 404s again: the hour starts over
    resumed = 3 * UNKNOWN_JOB_GIVE_UP_S
    client.script["slow"] = [not_found] * int(UNKNOWN_JOB_GIVE_UP_S * 0.9 / cfg.max_interval_s)
    client.script["slow"] += [JobStatus("slow", "PENDING")] + [not_found] * 1000
    assert await polled_until(resumed) == "PENDING"
    assert await polled_until(resumed + UNKNOWN_JOB_GIVE_UP_S - 2 * cfg.max_interval_s) == (
        "PENDING"
    )
    assert await table.claim_due([7], 10, 60, "sender") == []  # held by the job meanwhile
    assert await polled_until(resumed + UNKNOWN_JOB_GIVE_UP_S + 2 * cfg.max_interval_s) == (
        "EXPIRED"
    )
    [claim] = await table.claim_due([7], 10, 60, "sender")
    assert (claim.external_user_id, claim.action) == ("u1", "add")


async def test_a_status_an_older_release_recorded_starts_the_hour_of_404s_over(
    store: Store, client: FakeClient, clock: FakeClock
) -> None:
    """During a rolling upgrade an older release records a poll's status without clearing
    `unknown_since`: a start it left behind counts only while the job's last poll failed."""
    cfg = dataclasses.replace(CFG, max_job_age_s=7 * 86400.0)
    poller = Poller(store, client, cfg, owner="a", clock=clock)
    await add(store, "j")
    async with store._engine.begin() as conn:  # an hour-old start, then a status (no error)
        await conn.execute(
            text("UPDATE jobs SET unknown_since = :t, error = NULL"), {"t": clock.now - 7200}
        )
    client.script["j"] = [RejectedError("HTTP 404: job not found", status=404)] * 2
    clock.advance(cfg.first_delay_s)
    await poller.poll_once()
    [row] = await store.list_jobs()
    assert (row.state, row.unknown_since) == ("PENDING", clock.now)  # the hour starts now
    clock.advance(cfg.max_interval_s)
    await poller.poll_once()
    [row] = await store.list_jobs()
    assert (row.state, row.polls, row.unknown_since) == ("PENDING", 2, clock.now - 60)


async def test_an_expiry_a_crash_interrupted_is_settled_by_the_next_poller(
    store: Store, client: FakeClient, clock: FakeClock
) -> None:
    """The job was marked EXPIRED and the process died before its members were made due: a
    poller started afterwards finds them in the member table and makes them due again."""
    table = MemberTable(store)
    await sent_members(table, "old", ["u1", "u2"])
    clock.advance(CFG.max_job_age_s + 1)
    assert await store.expire_jobs(CFG.max_job_age_s) == 1  # the crash: nothing applied yet
    assert await table.claim_due([7], 10, 60, "sender") == []  # stuck behind the job
    poller = Poller(
        store,
        client,
        CFG,
        owner="b",
        clock=clock,
        outcomes=MemberOutcomes(table, MemberDeadLetterSink(), {7: "vip"}),
    )
    await poller.poll_once()
    claims = await table.claim_due([7], 10, 60, "sender")
    assert sorted(c.external_user_id for c in claims) == ["u1", "u2"]


async def partial_job(table: MemberTable, client: FakeClient) -> None:
    """Job "partial" of u1 and u2, sent; Amazon ends it PARTIALLYSUCCEEDED, u2 refused."""
    await sent_members(table, "partial", ["u1", "u2"])
    client.script["partial"] = [
        JobStatus("partial", "PARTIALLYSUCCEEDED", invalid_records=(InvalidRecord("u2", "bad"),))
    ]


class StalledDeadLetters(MemberDeadLetterSink):
    """A broker that takes no dead letter until `open` is set (an outage)."""

    def __init__(self) -> None:
        super().__init__()
        self.waiting = asyncio.Event()
        self.open = asyncio.Event()

    async def dead_letter_member(self, value: bytes, reason: str, detail: str) -> None:
        self.waiting.set()
        await self.open.wait()
        await super().dead_letter_member(value, reason, detail)


async def test_a_broker_outage_holds_the_dead_letters_not_the_polls(
    store: Store, client: FakeClient, clock: FakeClock
) -> None:
    """A terminal job's dead letter waits on the broker: the job is stored terminal and the
    polls go on (other jobs end meanwhile); the dead letters go once the broker is back."""
    table, sink = MemberTable(store), StalledDeadLetters()
    outcomes = MemberOutcomes(table, sink, {7: "vip"})
    poller = Poller(store, client, CFG, owner="a", clock=clock, outcomes=outcomes)
    await partial_job(table, client)
    stop = asyncio.Event()
    sending = asyncio.create_task(outcomes.run(stop))
    await poller.poll_once()
    await sink.waiting.wait()
    assert await store.job_states(["partial"]) == {"partial": "PARTIALLYSUCCEEDED"}
    await sent_members(table, "later", ["u3"])
    client.script["later"] = [JobStatus("later", "FAILED")]
    clock.advance(CFG.first_delay_s)
    await poller.poll_once()
    assert await store.job_states(["later"]) == {"later": "FAILED"}
    stop.set()
    sink.open.set()
    await sending
    assert [(v["externalUserId"], r) for v, r, _ in sink.sent] == [("u2", "other")]
    assert client.calls == ["partial", "later"]
    assert REGISTRY.get_sample_value("syncd_member_dead_letters_queued") == 0


async def test_dead_letters_a_crash_left_unsent_are_sent_after_a_restart(
    store: Store, client: FakeClient, clock: FakeClock
) -> None:
    """The process died while a terminal job's dead letter waited on the broker (the job was
    stored terminal already, so it is never polled again): the dead letter waits in the store,
    and the next process sends it once the crashed one's lease ran out, once."""
    table, stalled = MemberTable(store), StalledDeadLetters()
    outcomes = MemberOutcomes(table, stalled, {})
    poller = Poller(store, client, CFG, owner="a", clock=clock, outcomes=outcomes)
    await partial_job(table, client)
    await poller.poll_once()
    sending = asyncio.create_task(outcomes.send_dead_letters())
    await stalled.waiting.wait()
    sending.cancel()  # the crash
    with pytest.raises(asyncio.CancelledError):
        await sending
    sink = MemberDeadLetterSink()
    after = MemberOutcomes(table, sink, {7: "v"})
    await after.send_dead_letters()
    assert sink.sent == []  # the crashed process's lease still holds
    clock.advance(DEAD_LETTER_LEASE_S)
    await after.send_dead_letters()
    assert [(v["externalUserId"], v["audience"], r, d) for v, r, d in sink.sent] == [
        ("u2", "v", "other", "bad")
    ]
    clock.advance(DEAD_LETTER_LEASE_S)
    await after.send_dead_letters()
    assert len(sink.sent) == 1


async def test_a_dead_letter_held_up_by_the_broker_keeps_its_lease(
    store: Store, client: FakeClient, clock: FakeClock
) -> None:
    """A send that outlasts the lease (a broker outage) renews it: another replica does not
    send the same dead letter meanwhile."""
    table, stalled, other = MemberTable(store), StalledDeadLetters(), MemberDeadLetterSink()
    outcomes = MemberOutcomes(table, stalled, {7: "vip"}, lease_s=0.3)
    poller = Poller(store, client, CFG, owner="a", clock=clock, outcomes=outcomes)
    await partial_job(table, client)
    await poller.poll_once()
    sending = asyncio.create_task(outcomes.send_dead_letters())
    await stalled.waiting.wait()
    leased_at = clock.now
    clock.advance(1.0)  # past the first lease

    async def renewed() -> bool:
        async with store._read() as conn:
            until_ = await conn.scalar(text("SELECT leased_until FROM member_dead_letters"))
        return bool(until_ > leased_at + 1.0)

    def queued() -> float | None:
        return REGISTRY.get_sample_value("syncd_member_dead_letters_queued")

    deadline = asyncio.get_running_loop().time() + 10
    while not (await renewed() and queued() == 1):  # the gauge shows the letter waiting
        assert asyncio.get_running_loop().time() < deadline, "the lease renewed, 1 queued"
        await asyncio.sleep(0.01)
    await MemberOutcomes(table, other, {7: "vip"}).send_dead_letters()
    assert other.sent == []
    stalled.open.set()
    await sending
    assert [(v["externalUserId"], r) for v, r, _ in stalled.sent] == [("u2", "other")]
    assert await table.lease_dead_letters(10, 60) == []


class CommitReplyLost(MemberTable):
    """A store whose first job-outcome COMMIT succeeds but whose answer is lost (a dropped
    connection, a statement timeout at COMMIT): `persist` writes the outcome again."""

    lost = False

    async def apply_job_outcome(self, *args: Any, **kwargs: Any) -> Any:
        outcome = await super().apply_job_outcome(*args, **kwargs)
        if not self.lost:
            self.lost = True
            raise OperationalError("COMMIT", {}, ConnectionResetError("reply lost"))
        return outcome


async def test_a_job_outcome_written_again_after_a_lost_commit_reply_loses_no_dead_letter(
    store: Store, client: FakeClient, clock: FakeClock
) -> None:
    table, sink = CommitReplyLost(store), MemberDeadLetterSink()
    outcomes = MemberOutcomes(table, sink, {7: "v"})
    poller = Poller(store, client, CFG, owner="a", clock=clock, outcomes=outcomes)
    await sent_members(table, "partial", ["u1", "u2"])
    client.script["partial"] = [
        JobStatus(
            "partial",
            "PARTIALLYSUCCEEDED",
            invalid_records=(InvalidRecord("u2", "INVALID_HASHED_PII: unresolved"),),
        )
    ]
    with capture_logs() as logs:
        await poller.poll_once()
    assert table.lost
    assert not [e for e in logs if "name no member" in e["event"]]  # the retry found none
    await outcomes.send_dead_letters()
    assert [(v["externalUserId"], r) for v, r, _ in sink.sent] == [("u2", "invalid_pii")]
    assert await store.job_states(["partial"]) == {"partial": "PARTIALLYSUCCEEDED"}


@pytest.mark.parametrize(
    "size",
    [
        {"receivedRecordSize": -5},
        {"idResolutionCount": -1},
        {"receivedRecordSize": 2**63},  # past any integer column (SQLite: OverflowError)
        {"dspAudienceSize": 2**64 - 1},
        {"receivedRecordSize": 2**31},  # past PostgreSQL's integer column
    ],
)
async def test_odd_counts_in_a_job_status_lose_no_dead_letter_and_stop_no_poll(
    store: Store, client: FakeClient, clock: FakeClock, size: dict[str, int]
) -> None:
    """A terminal job status whose audienceSize counts are negative or larger than the store's
    columns hold (Amazon answering oddly): the counts are left out, the job is stored terminal,
    its invalid member is dead-lettered and the round's other poll is stored too."""
    from syncd.amazon.client import _job_status

    table, sink = MemberTable(store), MemberDeadLetterSink()
    outcomes = MemberOutcomes(table, sink, {7: "vip"})
    poller = Poller(store, client, CFG, owner="a", clock=clock, outcomes=outcomes)
    await sent_members(table, "odd", ["u1", "u2"])
    await sent_members(table, "fine", ["u3"])
    raw = {
        "jobState": "PARTIALLYSUCCEEDED",
        "invalidRecords": [{"externalId": "u2", "error": "INVALID_HASHED_PII: unresolved"}],
        "audienceSize": size,
    }
    client.script["odd"] = [_job_status(raw, "odd", "records_get")]
    client.script["fine"] = [JobStatus("fine", "SUCCEEDED", 100.0)]
    await poller.poll_once()
    await outcomes.send_dead_letters()
    assert await store.job_states(["odd", "fine"]) == {
        "odd": "PARTIALLYSUCCEEDED",
        "fine": "SUCCEEDED",
    }
    assert [(v["externalUserId"], r) for v, r, _ in sink.sent] == [("u2", "invalid_pii")]
    [row] = [j for j in await store.list_jobs() if j.job_request_id == "odd"]
    assert (row.received_records, row.matched_records, row.audience_size) == (None, None, None)


async def test_a_job_id_of_a_finished_job_is_refused_by_store_job(
    store: Store, client: FakeClient, clock: FakeClock
) -> None:
    """Amazon answers a POST's 202 with the jobRequestId of a job that is already terminal (a
    reused id): that job is never polled again, so its new members cannot wait for it.
    `store_job` raises JobIdReused and writes nothing: the claims still hold (the feed
    dead-letters them, tests/unit/test_feed.py), the finished job stays as it was."""
    table = MemberTable(store)
    outcomes = MemberOutcomes(table, MemberDeadLetterSink(), {7: "vip"})
    poller = Poller(store, client, CFG, owner="a", clock=clock, outcomes=outcomes)
    await sent_members(table, "reused", ["u1"])
    client.script["reused"] = [JobStatus("reused", "SUCCEEDED", 100.0)]
    await poller.poll_once()
    assert await store.job_states(["reused"]) == {"reused": "SUCCEEDED"}
    u2 = member_record("u2", "US", Action.ADD, [{"email": "c" * 64}])
    await table.record_changes([member_change(7, u2, occurred_at=T0, position=0)])
    claims = await table.claim_due([7], 10, 60, "sender")
    job = NewJob("reused", "conn-1", 7, "vip", 1, 1, 0)
    with pytest.raises(JobIdReused, match="reused"):
        await table.store_job(claims, job, first_poll_after_s=0)
    state = await table.member(7, "u2")
    assert state is not None
    assert (state.job_request_id, state.sent_action) == (None, None)
    assert await table.renew(claims, 60) == []  # still held by the sender
    [row] = await store.list_jobs()
    assert (row.job_request_id, row.state, row.records) == ("reused", "SUCCEEDED", 1)


async def test_invalid_records_naming_no_member_of_the_job_are_reported(
    store: Store, client: FakeClient, clock: FakeClock
) -> None:
    """Amazon lists invalid records without an id (or with one the job does not hold): nothing
    says which members they were, so the job's members count as confirmed; a warning says how
    many entries named none of them."""
    table = MemberTable(store)
    outcomes = MemberOutcomes(table, MemberDeadLetterSink(), {7: "vip"})
    poller = Poller(store, client, CFG, owner="a", clock=clock, outcomes=outcomes)
    await sent_members(table, "partial", ["u1", "u2"])
    invalid = (
        InvalidRecord(None, "bad hash"),
        InvalidRecord("nobody", "bad"),
        InvalidRecord("u2", "x"),
    )
    client.script["partial"] = [JobStatus("partial", "PARTIALLYSUCCEEDED", invalid_records=invalid)]
    with capture_logs() as logs:
        await poller.poll_once()
    [warning] = [e for e in logs if e["event"].startswith("invalid records name no member")]
    assert (warning["job_request_id"], warning["unmatched"], warning["invalid_records"]) == (
        "partial",
        2,
        3,
    )


async def test_a_job_id_of_another_pending_job_is_refused_by_store_job(store: Store) -> None:
    """A jobRequestId Amazon gave another POST that is still pending: the two POSTs would share
    one outcome, the second's members confirmed by a job that never held them. Only the same
    POST stored again (a retried write) takes the job as it is."""
    table = MemberTable(store)
    await sent_members(table, "shared", ["u1", "u2"])  # the first POST: 2 records
    u3 = member_record("u3", "US", Action.ADD, [{"email": "c" * 64}])
    await table.record_changes([member_change(7, u3, occurred_at=T0, position=9)])
    claims = await table.claim_due([7], 10, 60, "sender")
    with pytest.raises(JobIdReused, match="shared"):
        await table.store_job(
            claims, NewJob("shared", "conn-1", 7, "vip", 1, 1, 0), first_poll_after_s=0
        )
    state = await table.member(7, "u3")
    assert state is not None
    assert state.job_request_id is None
