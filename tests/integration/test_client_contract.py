"""Contract tests: AmazonClient against the sandbox over real HTTP, every operation and the
fault paths. Waits are never real: an injected sleep records the requested delays and lifts
the injected fault, so the retry that follows must succeed."""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import orjson
import pytest

from syncd import cli
from syncd.amazon.api import records_body
from syncd.amazon.client import MAX_JOB_REQUEST_ID, AmazonClient
from syncd.amazon.retry import nothing_accepted
from syncd.config import AmazonConfig
from syncd.errors import AmazonError, AuthError, NotSentError, RejectedError, RetryableError
from syncd.localstack import free_port
from syncd.sandbox.server import RunningSandbox, running_sandbox
from syncd.sandbox.state import SandboxSettings
from syncd.store.schema import jobs

pytestmark = pytest.mark.integration

CREDENTIALS = {
    "client_id": "sandbox-client-id",
    "client_secret": "sandbox-client-secret",
    "refresh_token": "sandbox-refresh-token",
}
EMAIL_HASH = hashlib.sha256(b"someone@example.com").hexdigest()
# Client timeout for tests where the sandbox hangs a request: short, yet far above what a loopback
# request costs on a busy machine (the setup requests before the fault share it).
SHORT_TIMEOUT_S = 1.0


class RecordingSleep:
    """Records requested delays instead of waiting; runs `then` (e.g. lift a fault) each time."""

    def __init__(self, then: Callable[[], None] = lambda: None) -> None:
        self.delays: list[float] = []
        self.then = then

    async def __call__(self, seconds: float) -> None:
        self.delays.append(seconds)
        self.then()
        await asyncio.sleep(0)


@pytest.fixture
async def sandbox() -> AsyncIterator[RunningSandbox]:
    async with running_sandbox(SandboxSettings(job_delay_s=0.2, seed=7)) as sb:
        yield sb


def config(sb: RunningSandbox, **overrides: Any) -> AmazonConfig:
    values: dict[str, Any] = {
        **CREDENTIALS,
        "api_url": sb.url,
        "token_url": sb.token_url,
        "request_timeout_s": 5.0,
        "backoff_base_s": 0.5,
        **overrides,
    }
    return AmazonConfig(**values)


def requests(sb: RunningSandbox, prefix: str) -> int:
    """How many API requests the sandbox saw whose 'METHOD route status' starts with prefix."""
    counts: dict[str, int] = sb.state.stats()["requests"]
    return sum(n for key, n in counts.items() if key.startswith(prefix))


async def setup_destination(client: AmazonClient) -> tuple[str, int]:
    terms = await client.get_terms()
    await client.accept_terms(terms.agreement_token)
    connection_id = await client.create_connection(amc_instance_id="amc1234567")
    audience = await client.create_audience("syncdcontract01", connection_id=connection_id)
    return connection_id, audience.audience_id


def encoded_records(audience_id: int, connection_id: str, user: str = "cdp-user-1") -> bytes:
    record = {
        "externalUserId": user,
        "countryCode": "US",
        "action": "CREATE",
        "hashedPII": [{"email": EMAIL_HASH}],
    }
    return orjson.dumps(records_body(audience_id, connection_id, [record]))


async def test_every_operation(sandbox: RunningSandbox) -> None:
    async with AmazonClient(config(sandbox)) as client:
        assert not client.token_held
        await client.ensure_token()
        assert client.token_held

        terms = await client.get_terms()
        assert terms.has_accepted is False
        assert terms.agreement_token
        await client.accept_terms(terms.agreement_token)
        assert (await client.get_terms()).has_accepted is True

        connection_id = await client.create_connection(
            amc_instance_id="amc1234567", dsp_advertiser_id="5550001", is_default=True
        )
        other = await client.create_connection(dsp_advertiser_id="5550002")
        listed = await client.list_connections()
        assert {c.connection_id for c in listed} == {connection_id, other}
        only = await client.list_connections(connection_id=connection_id)
        assert [c.connection_id for c in only] == [connection_id]
        assert only[0].raw["amcInstanceId"] == "amc1234567"
        default = await client.list_connections(is_default=True)
        assert [c.connection_id for c in default] == [connection_id]

        created = await client.create_audience(
            "syncdcontract01",
            connection_id=connection_id,
            description="contract test",
            country_code="US",
            external_audience_id="contract-1",
            ttl_s=604800,
        )
        audience_id = created.audience_id
        assert isinstance(audience_id, int)
        assert len(str(audience_id)) == 18  # an exact 18-digit int, never a float
        fetched = await client.get_audience(audience_id)
        assert fetched.audience_id == audience_id
        assert fetched.raw["metadata"]["externalAudienceId"] == "contract-1"
        updated = await client.update_audience(audience_id, description="changed", ttl_s=86400)
        assert updated.audience_id == audience_id
        assert updated.raw["description"] == "changed"
        assert updated.raw["metadata"]["ttl"] == 86400

        job_id = await client.post_records(
            encoded_records(audience_id, connection_id), connection_id=connection_id
        )
        assert job_id
        status = await client.get_job(job_id)
        deadline = time.monotonic() + 10
        while not status.terminal and time.monotonic() < deadline:
            await asyncio.sleep(0.1)  # polling the sandbox's real job state, with a deadline
            status = await client.get_job(job_id)
        assert status.job_state == "SUCCEEDED"
        assert status.job_request_id == job_id
        assert status.processed_rate == 100.0
        assert status.received_record_size == 1
        [entry] = sandbox.state.ledger(connection_id)
        assert entry["audienceId"] == audience_id  # arrived as the exact integer
        assert entry["jobRequestId"] == job_id
        assert entry["record"]["externalUserId"] == "cdp-user-1"

        await client.delete_connection(other)
        assert [c.connection_id for c in await client.list_connections()] == [connection_id]
    assert sandbox.state.stats()["terminal_polls"] == 0
    assert sandbox.state.stats()["token_requests"] == 1


async def test_partial_job_reports_invalid_records() -> None:
    settings = SandboxSettings(job_delay_s=0.0, invalid_record_rate=1.0, seed=3)
    async with running_sandbox(settings) as sb, AmazonClient(config(sb)) as client:
        connection_id, audience_id = await setup_destination(client)
        job_id = await client.post_records(
            encoded_records(audience_id, connection_id, user="cdp-user-9"),
            connection_id=connection_id,
        )
        status = await client.get_job(job_id)
    assert status.terminal
    assert status.job_state == "PARTIALLYSUCCEEDED"
    assert status.processed_rate == 0.0
    assert [r.external_id for r in status.invalid_records] == ["cdp-user-9"]
    assert status.invalid_records[0].error.startswith("INVALID_HASHED_PII")


async def test_delete_without_connection_id_is_never_sent(sandbox: RunningSandbox) -> None:
    async with AmazonClient(config(sandbox)) as client:
        await client.create_connection(amc_instance_id="amc1234567")
        for empty in ("", "  "):
            with pytest.raises(ValueError, match="ALL"):
                await client.delete_connection(empty)
        assert len(await client.list_connections()) == 1
    assert requests(sandbox, "DELETE") == 0


async def test_unknown_job_is_a_rejection(sandbox: RunningSandbox) -> None:
    async with AmazonClient(config(sandbox)) as client:
        with pytest.raises(RejectedError) as info:
            await client.get_job("00000000-0000-0000-0000-000000000000")
    assert info.value.status == 404
    assert info.value.operation == "records_get"
    assert "not found" in str(info.value)


async def test_a_job_request_id_the_store_cannot_hold_is_a_clear_error_of_that_post(
    sandbox: RunningSandbox,
) -> None:
    """A 202 whose jobRequestId is longer than the store's column (128 characters): the POST
    fails with an error naming it (not one that proves nothing was accepted: the sender
    resends under a reservation of its own), instead of an id PostgreSQL refuses to store."""
    async with AmazonClient(config(sandbox)) as client:
        connection_id, audience_id = await setup_destination(client)
        sandbox.state.set_faults({"job_request_id": "j" * 129})
        with pytest.raises(AmazonError) as info:
            await client.post_records(
                encoded_records(audience_id, connection_id), connection_id=connection_id
            )
    assert "jobRequestId" in str(info.value)
    assert "129" in str(info.value)
    assert not nothing_accepted(info.value)
    assert requests(sandbox, "POST /amc/audiences/records") == 1
    assert jobs.c.job_request_id.type.length == MAX_JOB_REQUEST_ID == 128


@pytest.mark.parametrize("odd", [".", ".."])
async def test_a_job_request_id_no_path_can_name_is_a_clear_error_of_that_post(
    sandbox: RunningSandbox, odd: str
) -> None:
    """`.` and `..` cannot be one path segment (URLs resolve them): such a job could never be
    polled, so its POST fails with an error naming the id, as one too long for the store."""
    error = await post_answered_with_job_id(sandbox, odd)
    assert not nothing_accepted(error)


@pytest.mark.parametrize("odd", ["job\x00id", "job\nid", "\x7f"])
async def test_a_job_request_id_holding_a_control_character_is_a_clear_error_of_that_post(
    sandbox: RunningSandbox, odd: str
) -> None:
    """No jobRequestId holds a control character; a NUL is one PostgreSQL cannot store (its
    job row was refused after the 202: the sender task failed, syncd exited 1 and resent the
    batch at every start). The POST fails naming the id, as one too long for the store."""
    error = await post_answered_with_job_id(sandbox, odd)
    assert "control character" in str(error)
    assert odd not in str(error)
    assert not nothing_accepted(error)


async def post_answered_with_job_id(sandbox: RunningSandbox, job_id: str) -> AmazonError:
    """The error of a records POST the sandbox answers 202 with `job_id` (it must name it)."""
    async with AmazonClient(config(sandbox)) as client:
        connection_id, audience_id = await setup_destination(client)
        sandbox.state.set_faults({"job_request_id": job_id})
        with pytest.raises(AmazonError, match="jobRequestId") as info:
            await client.post_records(
                encoded_records(audience_id, connection_id), connection_id=connection_id
            )
    return info.value


async def test_a_nul_in_amazons_job_status_or_error_text_reaches_no_result(
    sandbox: RunningSandbox,
) -> None:
    """Amazon's texts go to the store (a poll's error, a dead letter's detail, invalid members'
    ids): a NUL in them is a text PostgreSQL refuses to store (the write failed at every
    poll of the job, and took the round's other polls down with it). It arrives as U+FFFD."""
    async with AmazonClient(config(sandbox)) as client:
        connection_id, audience_id = await setup_destination(client)
        job_id = await client.post_records(
            encoded_records(audience_id, connection_id), connection_id=connection_id
        )
        job = sandbox.state.jobs[job_id]
        job.ready_at = 0.0
        job.final_state = "PARTIALLYSUCCEEDED"
        job.invalid_records = [{"externalId": "cdp-user-1\x00", "error": "bad\x00hash"}]
        status = await client.get_job(job_id)
        [invalid] = status.invalid_records
        assert (invalid.external_id, invalid.error) == ("cdp-user-1\ufffd", "bad\ufffdhash")
        job.final_state = "DONE\x00"
        with pytest.raises(AmazonError, match="unknown jobState") as unknown:
            await client.get_job(job_id)
        assert "\x00" not in str(unknown.value)
        with pytest.raises(RejectedError) as refused:
            await client.get_job("no-such-job\x00")  # the sandbox's 404 names the id
        assert "\x00" not in str(refused.value)


@pytest.mark.parametrize("odd", ["job?x=1#y", "job a%2Fb", "j" * 128])
async def test_a_job_request_id_of_any_characters_is_polled_as_itself(
    sandbox: RunningSandbox, odd: str
) -> None:
    """Amazon's jobRequestId goes into the GET's path as one segment, whatever it holds."""
    async with AmazonClient(config(sandbox)) as client:
        connection_id, audience_id = await setup_destination(client)
        sandbox.state.set_faults({"job_request_id": odd})
        job_id = await client.post_records(
            encoded_records(audience_id, connection_id), connection_id=connection_id
        )
        assert job_id == odd
        status = await client.get_job(job_id)
    assert status.job_request_id == odd
    assert requests(sandbox, "GET /amc/audiences/records/{jobRequestId} 200") == 1


async def test_throttled_call_obeys_retry_after(sandbox: RunningSandbox) -> None:
    sleep = RecordingSleep(then=lambda: sandbox.state.set_faults({"throttle_for_s": 0}))
    throttles: list[float | None] = []
    async with AmazonClient(config(sandbox), sleep=sleep) as client:
        connection_id, audience_id = await setup_destination(client)
        sandbox.state.set_faults({"throttle_for_s": 30})
        job_id = await client.post_records(
            encoded_records(audience_id, connection_id),
            connection_id=connection_id,
            on_throttle=throttles.append,
        )
    assert job_id
    assert throttles == [30.0]
    assert len(sleep.delays) == 1
    assert sleep.delays[0] >= 30.0  # Retry-After wins over a (smaller) jittered backoff
    assert requests(sandbox, "POST /amc/audiences/records 429") == 1
    assert requests(sandbox, "POST /amc/audiences/records 202") == 1


async def test_401_refreshes_once_and_succeeds(sandbox: RunningSandbox) -> None:
    sleep = RecordingSleep()
    async with AmazonClient(config(sandbox), sleep=sleep) as client:
        await client.ensure_token()
        sandbox.state.set_faults({"expire_tokens": True})
        terms = await client.get_terms()
        assert terms.agreement_token
        assert client.fatal_error is None
    assert sandbox.state.stats()["token_requests"] == 2
    assert requests(sandbox, "GET /amc/audiences/connections/terms 401") == 1
    assert requests(sandbox, "GET /amc/audiences/connections/terms 200") == 1
    assert sleep.delays == []  # a refresh, not a backoff


async def test_server_errors_are_retried_then_succeed(sandbox: RunningSandbox) -> None:
    sleep = RecordingSleep(then=lambda: sandbox.state.set_faults({"error_rate": 0}))
    async with AmazonClient(config(sandbox), sleep=sleep, rng=lambda: 1.0) as client:
        await client.ensure_token()
        sandbox.state.set_faults({"error_rate": 1.0})
        terms = await client.get_terms()
    assert terms.agreement_token
    assert sleep.delays == [0.5]  # attempt 1 backoff ceiling with rng at its maximum
    assert requests(sandbox, "GET /amc/audiences/connections/terms 5") == 1
    assert requests(sandbox, "GET /amc/audiences/connections/terms 200") == 1


async def test_a_records_post_answered_5xx_is_not_resent(sandbox: RunningSandbox) -> None:
    """Amazon may have accepted it before failing: the sender resends it under a reservation
    of its own, so that every POST Amazon may count is counted."""
    sleep = RecordingSleep()
    async with AmazonClient(config(sandbox), sleep=sleep) as client:
        connection_id, audience_id = await setup_destination(client)
        sandbox.state.set_faults({"error_rate": 1.0})
        with pytest.raises(RetryableError) as info:
            await client.post_records(
                encoded_records(audience_id, connection_id), connection_id=connection_id
            )
    assert info.value.status in (500, 502, 503, 504)
    assert sleep.delays == []
    assert requests(sandbox, "POST /amc/audiences/records") == 1


async def test_a_401_after_a_fresh_token_refuses_that_call_and_is_not_fatal(
    sandbox: RunningSandbox,
) -> None:
    """LwA just issued the token: Amazon refuses this connection, not the credentials. The
    records sender blocks that connection alone; the client goes on for everything else."""
    async with AmazonClient(config(sandbox), sleep=RecordingSleep()) as client:
        connection_id, audience_id = await setup_destination(client)
        fault = {"connection_id": connection_id, "status": 401, "for_s": 60}
        sandbox.state.set_faults({"connection_status": fault})
        tokens = sandbox.state.stats()["token_requests"]
        with pytest.raises(RejectedError) as info:
            await client.post_records(
                encoded_records(audience_id, connection_id), connection_id=connection_id
            )
        assert info.value.status == 401
        assert "even after a token refresh" in str(info.value)
        assert client.fatal_error is None
        assert (await client.get_terms()).agreement_token  # other calls go on
    assert sandbox.state.stats()["token_requests"] == tokens + 1  # one refresh
    assert requests(sandbox, "POST /amc/audiences/records 401") == 2


async def test_a_records_post_that_cannot_connect_is_resent(sandbox: RunningSandbox) -> None:
    """Nothing reached Amazon, so even a records POST may be resent (same reservation)."""
    sleep = RecordingSleep()
    cfg = config(sandbox, api_url=f"http://127.0.0.1:{free_port()}", max_attempts=3)
    async with AmazonClient(cfg, sleep=sleep) as client:
        with pytest.raises(NotSentError, match="cannot connect"):
            await client.post_records(encoded_records(413642381039213536, "c"), connection_id="c")
    assert len(sleep.delays) == 2  # three attempts


async def test_a_records_post_whose_token_request_failed_proves_nothing_was_accepted(
    sandbox: RunningSandbox,
) -> None:
    """LwA answering a page instead of a token (a 404 here): the records POST never left, so its
    budget reservation is released, not spent (nothing_accepted)."""
    sleep = RecordingSleep()
    cfg = config(sandbox, token_url=f"{sandbox.url}/no-token-here", max_attempts=2)
    async with AmazonClient(cfg, sleep=sleep) as client:
        with pytest.raises(RetryableError) as info:
            await client.post_records(encoded_records(413642381039213536, "c"), connection_id="c")
    assert info.value.status == 404
    assert nothing_accepted(info.value)
    assert requests(sandbox, "POST /amc/audiences/records") == 0


async def test_retries_exhausted_raise_the_last_retryable_error(sandbox: RunningSandbox) -> None:
    sleep = RecordingSleep()
    async with AmazonClient(config(sandbox, max_attempts=3), sleep=sleep) as client:
        await client.ensure_token()
        sandbox.state.set_faults({"error_rate": 1.0})
        with pytest.raises(RetryableError) as info:
            await client.get_terms()
    assert info.value.status in (500, 502, 503, 504)
    assert info.value.operation == "terms_get"
    assert "injected server error" in str(info.value)
    assert len(sleep.delays) == 2
    assert requests(sandbox, "GET /amc/audiences/connections/terms 5") == 3


async def test_bad_request_is_not_retried_and_leaks_no_body(sandbox: RunningSandbox) -> None:
    sleep = RecordingSleep()
    async with AmazonClient(config(sandbox), sleep=sleep) as client:
        connection_id, audience_id = await setup_destination(client)
        body = encoded_records(audience_id, connection_id, user="not a valid id!")
        with pytest.raises(RejectedError) as info:
            await client.post_records(body, connection_id=connection_id)
    assert info.value.status == 400
    assert info.value.operation == "records_post"
    assert "HTTP 400" in str(info.value)
    assert "externalUserId" in str(info.value)  # Amazon's message names the problem
    assert EMAIL_HASH not in str(info.value)
    assert sleep.delays == []
    assert requests(sandbox, "POST /amc/audiences/records") == 1


async def test_timeout_is_retried(sandbox: RunningSandbox) -> None:
    sleep = RecordingSleep(then=lambda: sandbox.state.set_faults({"timeout_rate": 0}))
    cfg = config(sandbox, request_timeout_s=SHORT_TIMEOUT_S)
    async with AmazonClient(cfg, sleep=sleep) as client:
        connection_id, audience_id = await setup_destination(client)
        job_id = await client.post_records(
            encoded_records(audience_id, connection_id), connection_id=connection_id
        )
        sandbox.state.set_faults({"timeout_rate": 1.0})
        status = await client.get_job(job_id)
    assert status.job_request_id == job_id
    assert len(sleep.delays) == 1
    assert requests(sandbox, "GET /amc/audiences/records/") == 1  # the hung one never answered


@pytest.mark.parametrize(
    ("fault", "message"), [("timeout_rate", "outcome unknown"), ("reset_rate", "connection error")]
)
async def test_a_records_post_with_unknown_outcome_is_not_resent(
    sandbox: RunningSandbox, fault: str, message: str
) -> None:
    """Amazon may have accepted it: the sender resends it under a new budget reservation."""
    sleep = RecordingSleep()
    async with AmazonClient(
        config(sandbox, request_timeout_s=SHORT_TIMEOUT_S), sleep=sleep
    ) as client:
        connection_id, audience_id = await setup_destination(client)
        sandbox.state.set_faults({fault: 1.0})
        with pytest.raises(RetryableError, match=message) as info:
            await client.post_records(
                encoded_records(audience_id, connection_id), connection_id=connection_id
            )
    assert info.value.status is None
    assert sleep.delays == []
    if fault == "reset_rate":
        assert requests(sandbox, "POST /amc/audiences/records dropped") == 1


async def test_connection_reset_is_retried(sandbox: RunningSandbox) -> None:
    sleep = RecordingSleep(then=lambda: sandbox.state.set_faults({"reset_rate": 0}))
    async with AmazonClient(config(sandbox), sleep=sleep) as client:
        await client.ensure_token()
        sandbox.state.set_faults({"reset_rate": 1.0})
        connections = await client.list_connections()
    assert connections == []
    assert len(sleep.delays) == 1
    # aiohttp itself resends an idempotent request once when a pooled connection drops
    assert requests(sandbox, "GET /amc/audiences/connections dropped") in (1, 2)


async def test_timeout_of_a_create_is_not_resent(sandbox: RunningSandbox) -> None:
    sleep = RecordingSleep()
    async with AmazonClient(
        config(sandbox, request_timeout_s=SHORT_TIMEOUT_S), sleep=sleep
    ) as client:
        await client.ensure_token()
        sandbox.state.set_faults({"reset_rate": 1.0})
        with pytest.raises(RetryableError, match="connection error"):
            await client.create_connection(amc_instance_id="amc1234567")
    assert sleep.delays == []  # the outcome is unknown: a resend could create a duplicate
    assert requests(sandbox, "POST /amc/audiences/connections") == 1


async def test_revoked_refresh_token_is_fatal(sandbox: RunningSandbox) -> None:
    sleep = RecordingSleep()
    async with AmazonClient(config(sandbox), sleep=sleep) as client:
        await client.ensure_token()
        sandbox.state.set_faults({"revoke_refresh_token": True, "expire_tokens": True})
        with pytest.raises(AuthError, match="invalid_grant") as info:
            await client.get_terms()
        assert client.fatal_error is info.value
        token_requests = sandbox.state.stats()["token_requests"]
        with pytest.raises(AuthError) as again:  # no loop: the remembered error, at once
            await client.list_connections()
        assert again.value is info.value
    assert sandbox.state.stats()["token_requests"] == token_requests == 2
    assert sleep.delays == []


async def test_wrong_client_secret_fails_ensure_token(sandbox: RunningSandbox) -> None:
    async with AmazonClient(config(sandbox, client_secret="wrong")) as client:
        with pytest.raises(AuthError, match="invalid_client"):
            await client.ensure_token()
        assert not client.token_held
        assert client.fatal_error is not None


async def test_onboarding_commands(
    sandbox: RunningSandbox, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg_file = tmp_path / "syncd.toml"
    cfg_file.write_text(
        "[amazon]\n"
        + "".join(f'{k} = "{v}"\n' for k, v in CREDENTIALS.items())
        + f'api_url = "{sandbox.url}"\ntoken_url = "{sandbox.token_url}"\n',
        encoding="utf-8",
    )

    errors: list[str] = []

    async def syncd(*argv: str) -> tuple[int, Any]:
        code = await asyncio.to_thread(cli.main, [*argv, "--config", str(cfg_file)])
        captured = capsys.readouterr()
        errors.append(captured.err)
        return code, orjson.loads(captured.out) if code == 0 else None

    code, shown = await syncd("terms", "show")
    assert code == 0
    assert shown["hasAccepted"] is False
    assert (await syncd("terms", "accept"))[1]["hasAccepted"] is True
    assert sandbox.state.terms_accepted

    code, created = await syncd("connections", "create", "--amc-instance-id", "amc1234567")
    assert code == 0
    connection_id = created["connectionId"]
    code, listed = await syncd("connections", "list")
    assert [c["connectionId"] for c in listed["connections"]] == [connection_id]

    code, audience = await syncd(
        "audiences", "create", "--name", "syncdonboarding", "--connection-id", connection_id
    )
    assert code == 0
    audience_id = audience["audienceId"]
    assert isinstance(audience_id, int)
    code, updated = await syncd("audiences", "update", str(audience_id), "--ttl", "3600")
    assert updated["metadata"]["ttl"] == 3600
    code, got = await syncd("audiences", "get", str(audience_id))
    assert got["audienceId"] == audience_id

    code, _ = await syncd("audiences", "get", "123456789012345678")
    assert code == 1
    assert "HTTP 404" in errors[-1]
    code, _ = await syncd("audiences", "update", str(audience_id))
    assert code == 2
    assert "description or ttl" in errors[-1]
    code, _ = await syncd("audiences", "update", str(audience_id), "--ttl", "99999999")
    assert code == 2
    assert "--ttl" in errors[-1]
