"""The sandbox over real HTTP (127.0.0.1, free port): every validation rule answers with the
right status and a message naming the problem; jobs, throttling, the budget window, faults and
the control endpoints behave as documented."""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from syncd.amazon import api
from syncd.cli import build_parser
from syncd.localstack import sandbox_settings
from syncd.sandbox.server import RunningSandbox, running_sandbox, settings_from_args
from syncd.sandbox.state import RollingWindow, SandboxSettings, TokenBucket
from syncd.sandbox.validation import _all_digests

CONNECTION = "5a523424-e8b3-4da5-9a32-24a861aea576"
AUDIENCE = 413642381039213536
DIGEST = hashlib.sha256(b"user@example.com").hexdigest()


def record(i: int = 0, **overrides: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "externalUserId": f"cdp-user-{i}",
        "countryCode": "US",
        "action": "CREATE",
        "hashedPII": [{"email": DIGEST}],
    }
    base.update(overrides)
    return {k: v for k, v in base.items() if v is not REMOVE}


REMOVE = object()  # record(key=REMOVE) drops the key


def body(records: list[Any] | None = None, **overrides: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "audienceId": AUDIENCE,
        "targetResource": {"connectionId": CONNECTION},
        "records": [record()] if records is None else records,
    }
    base.update(overrides)
    return {k: v for k, v in base.items() if v is not REMOVE}


class Client:
    """A raw HTTP client for the sandbox: each call returns (status, json body, headers)."""

    def __init__(self, http: aiohttp.ClientSession, sandbox: RunningSandbox) -> None:
        self.http = http
        self.sandbox = sandbox
        self.access_token = ""

    async def token(self, **form: str) -> tuple[int, Any]:
        fields = {
            "grant_type": "refresh_token",
            "refresh_token": "sandbox-refresh-token",
            "client_id": "sandbox-client-id",
            "client_secret": "sandbox-client-secret",
            **form,
        }
        async with self.http.post(self.sandbox.token_url, data=fields) as r:
            return r.status, await r.json()

    async def login(self) -> None:
        status, data = await self.token()
        assert status == 200, data
        self.access_token = data["access_token"]

    def headers(self, media_type: str) -> dict[str, str]:
        return {
            "Authorization": f"Bearer {self.access_token}",
            api.CLIENT_ID_HEADER: "sandbox-client-id",
            "Content-Type": media_type,
            "Accept": media_type,
        }

    async def call(
        self,
        method: str,
        path: str,
        payload: Any = None,
        *,
        raw: bytes | None = None,
        headers: dict[str, str | None] | None = None,
        params: dict[str, str] | None = None,
    ) -> tuple[int, Any, dict[str, str]]:
        media_type = (
            api.CONNECTIONS_MEDIA_TYPE
            if path.startswith(api.CONNECTIONS_PATH)
            else api.AUDIENCES_MEDIA_TYPE
        )
        merged: dict[str, str | None] = {**self.headers(media_type), **(headers or {})}
        sent = {k: v for k, v in merged.items() if v is not None}
        data = raw if raw is not None else (None if payload is None else orjson.dumps(payload))
        async with self.http.request(
            method, self.sandbox.url + path, data=data, headers=sent, params=params
        ) as r:
            content = await r.read()
            return r.status, orjson.loads(content) if content else None, dict(r.headers)

    async def post_records(self, payload: Any) -> tuple[int, Any, dict[str, str]]:
        return await self.call("POST", api.RECORDS_PATH, payload)


@pytest.fixture
async def client(sandbox: RunningSandbox) -> AsyncIterator[Client]:
    async with aiohttp.ClientSession() as http:
        c = Client(http, sandbox)
        await c.login()
        yield c


@pytest.fixture
def custom_client() -> Callable[[SandboxSettings], Any]:
    """`async with custom_client(settings) as c:` a logged-in client of a dedicated sandbox."""

    class _Ctx:
        def __init__(self, settings: SandboxSettings) -> None:
            self.settings = settings
            self.stack: list[Any] = []

        async def __aenter__(self) -> Client:
            sandbox_cm = running_sandbox(self.settings)
            sb = await sandbox_cm.__aenter__()
            http = aiohttp.ClientSession()
            self.stack = [sandbox_cm, http]
            c = Client(http, sb)
            await c.login()
            return c

        async def __aexit__(self, *exc: object) -> None:
            sandbox_cm, http = self.stack
            await http.close()
            await sandbox_cm.__aexit__(None, None, None)

    return _Ctx


async def wait_until(check: Callable[[], Awaitable[bool]], timeout: float, what: str) -> None:
    """Poll a real observable state until it holds, or fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not await check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


async def expect_400(client: Client, payload: Any, *fragments: str) -> str:
    status, data, _ = await client.post_records(payload)
    assert status == 400, data
    message: str = data["message"]
    for fragment in fragments:
        assert fragment in message, message
    return message


# -- records body: one test per rule ---------------------------------------------------------


async def test_valid_body_is_accepted_with_a_job_id(client: Client) -> None:
    status, data, headers = await client.post_records(body())
    assert status == 202, data
    assert len(data["jobRequestId"]) == 36
    assert headers["Content-Type"].startswith(api.AUDIENCES_MEDIA_TYPE)


async def test_body_not_json(client: Client) -> None:
    status, data, _ = await client.call("POST", api.RECORDS_PATH, raw=b"{not json")
    assert status == 400
    assert "not valid JSON" in data["message"]


async def test_empty_body(client: Client) -> None:
    status, data, _ = await client.call("POST", api.RECORDS_PATH, raw=b"")
    assert status == 400
    assert "body is required" in data["message"]


async def test_body_not_an_object(client: Client) -> None:
    await expect_400(client, [body()], "JSON object")


async def test_unknown_top_level_key(client: Client) -> None:
    await expect_400(client, body(audienceID=1), "unknown key", "audienceID")


@pytest.mark.parametrize(
    ("value", "kind"),
    [("413642381039213536", "string"), (4.1e17, "number"), (True, "boolean"), (None, "null")],
)
async def test_audience_id_must_be_an_integer(client: Client, value: Any, kind: str) -> None:
    await expect_400(client, body(audienceId=value), "audienceId must be an integer", kind)


async def test_audience_id_must_be_positive(client: Client) -> None:
    await expect_400(client, body(audienceId=0), "audienceId must be a positive integer")


async def test_eighteen_digit_audience_id_is_kept_exactly(client: Client) -> None:
    status, _, _ = await client.post_records(body())
    assert status == 202
    (entry,) = client.sandbox.state.ledger(CONNECTION)
    assert entry["audienceId"] == AUDIENCE


@pytest.mark.parametrize(
    ("target", "fragment"),
    [
        (REMOVE, "targetResource.connectionId is required"),
        ({}, "targetResource.connectionId is required"),
        ({"connectionId": ""}, "connectionId must be a non-empty string"),
        ({"connectionId": 7}, "connectionId must be a non-empty string"),
        ("conn", "targetResource must be an object"),
        ({"connectionId": CONNECTION, "targetTypes": ["TV"]}, "targetTypes"),
        ({"connectionId": CONNECTION, "other": 1}, "unknown key"),
    ],
)
async def test_target_resource(client: Client, target: Any, fragment: str) -> None:
    await expect_400(client, body(targetResource=target), fragment)


async def test_records_must_be_a_list(client: Client) -> None:
    await expect_400(client, body(records=REMOVE), "records must be an array")
    await expect_400(client, {**body(), "records": record()}, "records must be an array")


async def test_records_must_not_be_empty(client: Client) -> None:
    await expect_400(client, body(records=[]), "at least 1 record")


async def test_records_over_the_maximum(custom_client: Any) -> None:
    async with custom_client(SandboxSettings(max_records=5, job_delay_s=0.1)) as c:
        status, _, _ = await c.post_records(body([record(i) for i in range(5)]))
        assert status == 202
        await expect_400(c, body([record(i) for i in range(6)]), "6 records", "at most 5")


async def test_default_maximum_is_6000(client: Client) -> None:
    await expect_400(client, body([record(i) for i in range(6001)]), "at most 6000")


async def test_record_must_be_an_object(client: Client) -> None:
    await expect_400(client, body(["cdp-user-1"]), "records[0] must be an object")


async def test_unknown_record_key(client: Client) -> None:
    await expect_400(client, body([record(), record(1, hashedPii=[])]), "records[1]", "hashedPii")


@pytest.mark.parametrize(
    "external_id", [REMOVE, "", "user@example.com", "a" * 129, "cdp user", "id\n", 42]
)
async def test_external_user_id_pattern(client: Client, external_id: Any) -> None:
    message = await expect_400(
        client, body([record(externalUserId=external_id)]), "records[0].externalUserId"
    )
    assert "user@example.com" not in message  # a request may carry PII: never echo values


async def test_external_user_id_at_the_limits_is_accepted(client: Client) -> None:
    ids = ["a", "A" * 128, "x_y-Z09"]
    status, data, _ = await client.post_records(body([record(externalUserId=i) for i in ids]))
    assert status == 202, data


@pytest.mark.parametrize("action", [REMOVE, "ADD", "create", "", None, 1])
async def test_action_must_be_create_or_delete(client: Client, action: Any) -> None:
    await expect_400(client, body([record(action=action)]), "records[0].action", "CREATE, DELETE")


@pytest.mark.parametrize("country", ["us", "USA", "U", 840, ""])
async def test_country_code_must_be_alpha_2(client: Client, country: Any) -> None:
    await expect_400(client, body([record(countryCode=country)]), "records[0].countryCode")


async def test_country_code_is_optional_and_any_alpha_2(client: Client) -> None:
    records = [record(0, countryCode=REMOVE), record(1, countryCode="ZZ")]
    status, data, _ = await client.post_records(body(records))
    assert status == 202, data


_DIGEST_TEXT = st.from_regex(r"[0-9a-f]{64}", fullmatch=True)
_NEAR_DIGEST = st.from_regex(r"[0-9a-fA-Fg é\n]{63,65}", fullmatch=True)


@given(
    st.lists(
        st.one_of(_DIGEST_TEXT, _NEAR_DIGEST, st.text(), st.none(), st.integers()),
        min_size=1,
        max_size=8,
    )
)
def test_the_one_pass_digest_check_agrees_with_the_api_pattern(values: list[Any]) -> None:
    expected = all(isinstance(v, str) and api.SHA256_HEX.fullmatch(v) for v in values)
    assert _all_digests(values) is expected


@pytest.mark.parametrize(
    ("pii", "fragment"),
    [
        (REMOVE, "hashedPII must be an array of 1 to 100 objects"),
        ([], "hashedPII must be an array of 1 to 100 objects"),
        ({"email": DIGEST}, "hashedPII must be an array of 1 to 100 objects"),
        ([{"email": DIGEST}] * 101, "hashedPII must be an array of 1 to 100 objects"),
        ([{}], "hashedPII[0] must be a non-empty object"),
        ([{"email": DIGEST}, "x"], "hashedPII[1] must be a non-empty object"),
        ([{"mail": DIGEST}], "unknown key"),
        ([{"email": DIGEST.upper()}], "hashedPII[0].email must be a 64-character lowercase hex"),
        ([{"phone": DIGEST[:63]}], "hashedPII[0].phone must be a 64-character lowercase hex"),
        ([{"city": DIGEST + "0"}], "hashedPII[0].city must be a 64-character lowercase hex"),
        ([{"state": "g" * 64}], "hashedPII[0].state must be a 64-character lowercase hex"),
        ([{"postal": None}], "hashedPII[0].postal must be a 64-character lowercase hex"),
        ([{"email": "user@example.com"}], "hashedPII[0].email must be a 64-character"),
    ],
)
async def test_hashed_pii(client: Client, pii: Any, fragment: str) -> None:
    message = await expect_400(client, body([record(hashedPII=pii)]), fragment)
    assert "user@example.com" not in message


async def test_hashed_pii_at_most_100_values_per_member(client: Client) -> None:
    full = dict.fromkeys(
        ("email", "phone", "firstname", "lastname", "address", "city", "state", "postal"), DIGEST
    )
    status, _, _ = await client.post_records(body([record(hashedPII=[full] * 12)]))  # 96
    assert status == 202
    await expect_400(client, body([record(hashedPII=[full] * 13)]), "104 hashed values")


@pytest.mark.parametrize(
    ("consent", "fragment"),
    [
        ("GRANTED", "userConsent must be an object with a consent key"),
        ({}, "userConsent must be an object with a consent key"),
        ({"consent": []}, "userConsent.consent must be an object"),
        ({"consent": {"amzn": "GRANTED"}}, "consent.amzn must be an object"),
        ({"consent": {"amzn": {"amznAdStorage": "YES"}}}, "amznAdStorage must be one of"),
        ({"consent": {"amzn": {"adStorage": "GRANTED"}}}, "unknown key"),
        ({"consent": {"tcf": 1}}, "consent.tcf must be a string"),
        ({"consent": {"gdpr": "x"}}, "unknown key"),
    ],
)
async def test_user_consent_shape(client: Client, consent: Any, fragment: str) -> None:
    await expect_400(client, body([record(userConsent=consent)]), "userConsent", fragment)


async def test_full_user_consent_is_accepted(client: Client) -> None:
    consent = {
        "consent": {
            "amzn": {"amznAdStorage": "GRANTED", "amznUserData": "NOT_APPLICABLE"},
            "tcf": "CPXxRfAPXxRfAAfKABENB-CgAAAAAAAAAAYgAAAAAAAA",
            "gpp": "DBABMA~CPXxRfAPXxRfAAfKABENB-CgAAAAAAAAAAYgAAAAAAAA",
        }
    }
    status, data, _ = await client.post_records(body([record(userConsent=consent)]))
    assert status == 202, data


async def test_measurements_must_be_an_object(client: Client) -> None:
    await expect_400(client, body([record(measurements=[])]), "measurements must be an object")


async def test_first_invalid_record_is_named(client: Client) -> None:
    records = [record(0), record(1), record(2, action="UPSERT")]
    await expect_400(client, body(records), "records[2].action")


async def test_configured_audience_gets_400(custom_client: Any) -> None:
    async with custom_client(SandboxSettings(records_error_for_audience=347891)) as c:
        await expect_400(c, body(audienceId=347891), "audienceId 347891")
        status, _, _ = await c.post_records(body())
        assert status == 202


# -- headers: auth, client id, media types ---------------------------------------------------


@pytest.mark.parametrize(
    ("authorization", "fragment"),
    [
        (None, "missing Authorization header"),
        ("Token abc", "must be 'Bearer <access token>'"),
        ("Bearer not-a-token", "invalid or expired"),
    ],
)
async def test_bearer_token_required(client: Client, authorization: Any, fragment: str) -> None:
    status, data, _ = await client.call(
        "POST", api.RECORDS_PATH, body(), headers={"Authorization": authorization}
    )
    assert status == 401
    assert fragment in data["message"]


async def test_token_expires_after_its_ttl(custom_client: Any) -> None:
    async with custom_client(SandboxSettings(token_ttl_s=0.3)) as c:
        status, _, _ = await c.post_records(body())
        assert status == 202

        async def rejected() -> bool:
            return (await c.post_records(body()))[0] == 401

        await wait_until(rejected, 5, "the access token to expire")
        await c.login()
        assert (await c.post_records(body()))[0] == 202


@pytest.mark.parametrize(
    ("client_id", "fragment"),
    [(None, "missing Amazon-Advertising-API-ClientId"), ("other", "not name a known client")],
)
async def test_client_id_header(client: Client, client_id: Any, fragment: str) -> None:
    status, data, _ = await client.call(
        "GET", api.TERMS_PATH, headers={api.CLIENT_ID_HEADER: client_id}
    )
    assert status == 400
    assert fragment in data["message"]


@pytest.mark.parametrize("content_type", [None, "application/json", api.CONNECTIONS_MEDIA_TYPE])
async def test_content_type_must_be_the_media_type(client: Client, content_type: Any) -> None:
    status, data, _ = await client.call(
        "POST", api.RECORDS_PATH, body(), headers={"Content-Type": content_type}
    )
    assert status == 415
    assert api.AUDIENCES_MEDIA_TYPE in data["message"]


async def test_connections_use_their_own_media_type(client: Client) -> None:
    status, data, _ = await client.call(
        "POST",
        api.CONNECTIONS_PATH,
        {"amcInstanceId": "amc1"},
        headers={"Content-Type": api.AUDIENCES_MEDIA_TYPE},
    )
    assert status == 415
    assert api.CONNECTIONS_MEDIA_TYPE in data["message"]
    assert "requestId" in data


@pytest.mark.parametrize("accept", ["application/json", "text/html"])
async def test_accept_must_allow_the_media_type(client: Client, accept: str) -> None:
    status, data, _ = await client.call(
        "POST", api.RECORDS_PATH, body(), headers={"Accept": accept}
    )
    assert status == 406
    assert api.AUDIENCES_MEDIA_TYPE in data["message"]


@pytest.mark.parametrize("accept", [None, "*/*", "application/*", f"{api.AUDIENCES_MEDIA_TYPE}"])
async def test_accept_absent_or_wildcard_is_fine(client: Client, accept: Any) -> None:
    status, _, _ = await client.call("POST", api.RECORDS_PATH, body(), headers={"Accept": accept})
    assert status == 202


async def test_body_over_the_size_limit_is_413(custom_client: Any) -> None:
    async with custom_client(SandboxSettings(max_body_bytes=2048)) as c:
        status, data, _ = await c.post_records(body([record(i) for i in range(40)]))
        assert status == 413
        assert "Too Large" in data["message"]


async def test_unknown_route_is_a_json_404(client: Client) -> None:
    status, data, _ = await client.call("GET", "/amc/audiences/nope")
    assert status == 404
    assert "/amc/audiences/nope" in data["message"]


# -- LwA token endpoint -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("form", "status", "code"),
    [
        ({"refresh_token": "wrong"}, 400, "invalid_grant"),
        ({"client_secret": "wrong"}, 401, "invalid_client"),
        ({"client_id": "wrong"}, 401, "invalid_client"),
        ({"grant_type": "client_credentials"}, 400, "unsupported_grant_type"),
        ({"refresh_token": ""}, 400, "invalid_request"),
    ],
)
async def test_token_errors(client: Client, form: dict[str, str], status: int, code: str) -> None:
    got_status, data = await client.token(**form)
    assert (got_status, data["error"]) == (status, code)
    assert data["error_description"]


async def test_token_response_shape(client: Client) -> None:
    status, data = await client.token()
    assert status == 200
    assert data["token_type"] == "bearer"
    assert data["expires_in"] == 3600
    assert data["refresh_token"] == "sandbox-refresh-token"
    assert data["access_token"] != client.access_token  # a fresh token each time


async def test_token_needs_a_form_body(client: Client) -> None:
    async with client.http.post(client.sandbox.token_url, json={"grant_type": "x"}) as r:
        assert r.status == 400
        assert (await r.json())["error"] == "invalid_request"


async def test_revoked_refresh_token_and_expired_tokens(client: Client) -> None:
    client.sandbox.state.set_faults({"revoke_refresh_token": True, "expire_tokens": True})
    status, _, _ = await client.post_records(body())
    assert status == 401
    status, data = await client.token()
    assert (status, data["error"]) == (400, "invalid_grant")
    client.sandbox.state.set_faults({"revoke_refresh_token": False})
    await client.login()
    assert (await client.post_records(body()))[0] == 202
    assert client.sandbox.state.stats()["token_requests"] == 3


# -- jobs -------------------------------------------------------------------------------------


async def job_status(client: Client, job_id: str) -> dict[str, Any]:
    status, data, headers = await client.call("GET", f"{api.RECORDS_PATH}/{job_id}")
    assert status == 200, data
    assert headers["Content-Type"].startswith(api.AUDIENCES_MEDIA_TYPE)
    return dict(data)


async def until_terminal(client: Client, job_id: str) -> dict[str, Any]:
    result: dict[str, Any] = {}

    async def terminal() -> bool:
        result.update(await job_status(client, job_id))
        return result["jobState"] != "PENDING"

    await wait_until(terminal, 10, f"job {job_id} to finish")
    return result


async def test_job_pending_then_succeeded(custom_client: Callable[[SandboxSettings], Any]) -> None:
    # PENDING for 2 s: the status read right after the POST is PENDING on a busy machine too
    # (the default 0.2 s once ran out between the two under a full test run)
    async with custom_client(sandbox_settings(job_delay_s=2.0)) as client:
        records = [record(0), record(1, action="DELETE"), record(2, countryCode="ZZ")]
        status, data, _ = await client.post_records(body(records))
        assert status == 202
        job_id = data["jobRequestId"]
        assert (await job_status(client, job_id))["jobState"] == "PENDING"
        final = await until_terminal(client, job_id)
        assert final["jobState"] == "SUCCEEDED"
        assert final["successful"] == {"recordsProcessedRate": 100.0}
        assert final["audienceSize"]["receivedRecordSize"] == 3
        assert final["audienceSize"]["idResolutionCount"] == 2  # ZZ is not a matching country
        assert "invalidRecords" not in final
        assert client.sandbox.state.stats()["terminal_polls"] == 0
        await job_status(client, job_id)
        assert client.sandbox.state.stats()["terminal_polls"] == 1


async def test_unknown_job_is_404(client: Client) -> None:
    status, data, _ = await client.call("GET", f"{api.RECORDS_PATH}/no-such-job")
    assert status == 404
    assert "no-such-job" in data["message"]


async def test_invalid_records_make_a_partial_success(custom_client: Any) -> None:
    settings = SandboxSettings(job_delay_s=0.05, invalid_record_rate=0.5, seed=3)
    async with custom_client(settings) as c:
        _, data, _ = await c.post_records(body([record(i) for i in range(200)]))
        final = await until_terminal(c, data["jobRequestId"])
    invalid = final["invalidRecords"]
    assert final["jobState"] == "PARTIALLYSUCCEEDED"
    assert 60 < len(invalid) < 140
    assert final["successful"]["recordsProcessedRate"] == pytest.approx(
        100.0 * (200 - len(invalid)) / 200
    )
    assert invalid[0].keys() == {"audienceId", "externalId", "error"}
    assert invalid[0]["audienceId"] == str(AUDIENCE)


async def test_outcomes_replay_with_a_seed(custom_client: Any) -> None:
    async def outcome() -> list[str]:
        settings = SandboxSettings(job_delay_s=0, invalid_record_rate=0.3, seed=11)
        async with custom_client(settings) as c:
            _, data, _ = await c.post_records(body([record(i) for i in range(50)]))
            final = await until_terminal(c, data["jobRequestId"])
            return [r["externalId"] for r in final["invalidRecords"]]

    assert await outcome() == await outcome()


@pytest.mark.parametrize(
    ("settings", "state"),
    [
        (SandboxSettings(job_delay_s=0, failed_rate=1.0), "FAILED"),
        (SandboxSettings(job_delay_s=0, partial_rate=1.0), "PARTIALLYSUCCEEDED"),
    ],
)
async def test_outcome_mix(custom_client: Any, settings: SandboxSettings, state: str) -> None:
    async with custom_client(settings) as c:
        _, data, _ = await c.post_records(body())
        final = await until_terminal(c, data["jobRequestId"])
    assert final["jobState"] == state


async def test_concurrent_polls_of_one_job_are_counted(custom_client: Any) -> None:
    async with custom_client(SandboxSettings(job_delay_s=5, latency_s=0.2)) as c:
        _, data, _ = await c.post_records(body())
        job = data["jobRequestId"]
        await asyncio.gather(job_status(c, job), job_status(c, job))
        assert c.sandbox.state.stats()["max_concurrent_polls_per_job"] == 2


# -- metadata ---------------------------------------------------------------------------------


def audience_body(**overrides: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "name": "vipCustomers2024",
        "description": "VIP",
        "countryCode": "US",
        "targetResource": {"connectionId": CONNECTION},
        "metadata": {"externalAudienceId": "vip", "ttl": 604800},
    }
    base.update(overrides)
    return {k: v for k, v in base.items() if v is not REMOVE}


async def test_audience_create_get_update(client: Client) -> None:
    status, created, _ = await client.call("POST", api.METADATA_PATH, audience_body())
    assert status == 201, created
    audience_id = created["audienceId"]
    assert isinstance(audience_id, int)
    assert len(str(audience_id)) == 18
    assert created["externalAudienceId"] == "vip"
    path = f"{api.METADATA_PATH}/{audience_id}"
    update = {"description": "VIP v2", "metadata": {"ttl": 0}}
    status, updated, _ = await client.call("PUT", path, update)
    assert status == 200
    assert updated["description"] == "VIP v2"
    assert updated["metadata"]["ttl"] == 0
    await client.post_records(body([record(0), record(1)], audienceId=audience_id))
    status, got, _ = await client.call("GET", path)
    assert status == 200
    assert got["metadata"]["audienceSize"] == {  # ttl 0: the two members are not live
        "receivedRecordSize": 2,
        "idResolutionCount": 2,
        "dspAudienceSize": 0,
    }
    assert got["metadata"]["externalAudienceId"] == "vip"


@pytest.mark.parametrize(
    ("name", "ok"),
    [
        ("a" * 9, False),
        ("a" * 10, True),
        ("a" * 128, True),
        ("a" * 129, False),
        ("vip_customers", False),
        ("vip customers", False),
        (12345678901, False),
    ],
)
async def test_audience_name_rule(client: Client, name: Any, ok: bool) -> None:
    status, data, _ = await client.call("POST", api.METADATA_PATH, audience_body(name=name))
    if ok:
        assert status == 201, data
    else:
        assert status == 400
        assert "name must be 10 to 128 alphanumeric characters" in data["message"]


@pytest.mark.parametrize("ttl", [-1, api.TTL_MAX_SECONDS + 1, 1.5, "604800"])
async def test_audience_ttl_bounds(client: Client, ttl: Any) -> None:
    payload = audience_body(metadata={"ttl": ttl})
    status, data, _ = await client.call("POST", api.METADATA_PATH, payload)
    assert status == 400
    assert f"metadata.ttl must be an integer from 0 to {api.TTL_MAX_SECONDS}" in data["message"]


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        ({"name": REMOVE}, "name is required"),
        ({"targetResource": REMOVE}, "targetResource with a connectionId or an advertiserId"),
        ({"targetResource": {}}, "needs a connectionId or an advertiserId"),
        ({"targetResource": {"advertiserId": "1"}}, "advertiserId must be an integer"),
        ({"countryCode": "usa"}, "countryCode"),
        ({"description": 5}, "description must be a string"),
        ({"audienceName": "x"}, "unknown key"),
        ({"metadata": {"externalAudienceId": 5}}, "externalAudienceId must be a string"),
    ],
)
async def test_audience_create_rules(
    client: Client, overrides: dict[str, Any], fragment: str
) -> None:
    status, data, _ = await client.call("POST", api.METADATA_PATH, audience_body(**overrides))
    assert status == 400
    assert fragment in data["message"]


async def test_audience_path_and_unknown_id(client: Client) -> None:
    status, data, _ = await client.call("GET", f"{api.METADATA_PATH}/abc")
    assert status == 400
    assert "audienceId in the path must be an integer" in data["message"]
    status, data, _ = await client.call("GET", f"{api.METADATA_PATH}/123")
    assert status == 404
    status, data, _ = await client.call("PUT", f"{api.METADATA_PATH}/123", {"description": "x"})
    assert status == 404
    status, data, _ = await client.call("PUT", f"{api.METADATA_PATH}/123", {"ttl": 5})
    assert status == 400
    assert "unknown key" in data["message"]


# -- connections and terms --------------------------------------------------------------------


async def test_connections_lifecycle(client: Client) -> None:
    status, first, _ = await client.call(
        "POST", api.CONNECTIONS_PATH, {"amcInstanceId": "amc1", "isDefault": True}
    )
    assert status == 201
    status, second, _ = await client.call(
        "POST", api.CONNECTIONS_PATH, {"dspAdvertiserId": "123", "isDefault": True}
    )
    assert status == 201
    status, listed, _ = await client.call("GET", api.CONNECTIONS_PATH)
    assert status == 200
    assert {c["connectionId"] for c in listed["connections"]} == {
        first["connectionId"],
        second["connectionId"],
    }
    _, default, _ = await client.call("GET", api.CONNECTIONS_PATH, params={"isDefault": "true"})
    assert [c["connectionId"] for c in default["connections"]] == [second["connectionId"]]
    one = {"connectionId": first["connectionId"]}
    _, only, _ = await client.call("GET", api.CONNECTIONS_PATH, params=one)
    assert only["connections"][0]["amcInstanceId"] == "amc1"
    status, _, _ = await client.call("DELETE", api.CONNECTIONS_PATH, params=one)
    assert status == 204
    status, data, _ = await client.call("DELETE", api.CONNECTIONS_PATH, params=one)
    assert status == 404
    assert "requestId" in data


async def test_delete_connections_without_an_id_is_refused(client: Client) -> None:
    await client.call("POST", api.CONNECTIONS_PATH, {"amcInstanceId": "amc1"})
    status, data, _ = await client.call("DELETE", api.CONNECTIONS_PATH)
    assert status == 400
    assert "connectionId query parameter is required" in data["message"]
    _, listed, _ = await client.call("GET", api.CONNECTIONS_PATH)
    assert len(listed["connections"]) == 1


@pytest.mark.parametrize(
    ("payload", "fragment"),
    [
        ({"isDefault": True}, "needs an amcInstanceId or a dspAdvertiserId"),
        ({"amcInstanceId": 5}, "amcInstanceId must be a string"),
        ({"amcInstanceId": "a", "isDefault": "yes"}, "isDefault must be a boolean"),
        ({"amcInstanceId": "a", "instance": "b"}, "unknown key"),
    ],
)
async def test_connection_create_rules(client: Client, payload: Any, fragment: str) -> None:
    status, data, _ = await client.call("POST", api.CONNECTIONS_PATH, payload)
    assert status == 400
    assert fragment in data["message"]


async def test_terms_get_and_accept(client: Client) -> None:
    status, terms, _ = await client.call("GET", api.TERMS_PATH)
    assert status == 200
    assert terms["hasAccepted"] is False
    assert terms["agreementContent"]
    wrong = {"agreementToken": "other", "hasAccepted": True}
    status, data, _ = await client.call("PATCH", api.TERMS_PATH, wrong)
    assert status == 400
    assert "agreementToken does not match" in data["message"]
    declined = {"agreementToken": terms["agreementToken"], "hasAccepted": False}
    status, data, _ = await client.call("PATCH", api.TERMS_PATH, declined)
    assert status == 400
    assert "hasAccepted must be true" in data["message"]
    accepted = {"agreementToken": terms["agreementToken"], "hasAccepted": True}
    status, _, _ = await client.call("PATCH", api.TERMS_PATH, accepted)
    assert status == 204
    _, terms, _ = await client.call("GET", api.TERMS_PATH)
    assert terms["hasAccepted"] is True


# -- throttling and the budget window ---------------------------------------------------------


async def test_token_bucket_throttles_with_retry_after(custom_client: Any) -> None:
    async with custom_client(SandboxSettings(rate_per_s=0.5, burst=2)) as c:
        statuses = [(await c.call("GET", api.TERMS_PATH))[0] for _ in range(3)]
        assert statuses == [200, 200, 429]
        _, data, headers = await c.call("GET", api.TERMS_PATH)
        assert data["message"] == "Too Many Requests"
        assert int(headers["Retry-After"]) == 2
        stats = c.sandbox.state.stats()
        assert stats["throttled"] == 2
        assert stats["requests"]["GET /amc/audiences/connections/terms 429"] == 2


async def test_throttle_storm_for_an_interval(client: Client) -> None:
    client.sandbox.state.set_faults({"throttle_for_s": 30})
    status, _, headers = await client.post_records(body())
    assert status == 429
    assert 29 <= int(headers["Retry-After"]) <= 30
    client.sandbox.state.set_faults({"throttle_for_s": 0})
    assert (await client.post_records(body()))[0] == 202
    log = client.sandbox.state.log
    assert [e["status"] for e in log][-2:] == [429, 202]
    assert log[-2]["retry_after"] == pytest.approx(30, abs=1)


async def test_budget_window_is_reported(custom_client: Any) -> None:
    async with custom_client(SandboxSettings(window_budget=5, window_seconds=60)) as c:
        for start in (0, 3):
            status, _, _ = await c.post_records(body([record(start + i) for i in range(3)]))
            assert status == 202
        stats = c.sandbox.state.stats()
        assert stats["max_window_records"] == {CONNECTION: 6}
        assert stats["budget_exceeded"] == {CONNECTION: 1}
        assert stats["records"] == {CONNECTION: 6}
        assert stats["posts"] == 2


async def test_budget_window_can_reject(custom_client: Any) -> None:
    settings = SandboxSettings(window_budget=5, window_seconds=60, reject_over_budget=True)
    async with custom_client(settings) as c:
        assert (await c.post_records(body([record(i) for i in range(3)])))[0] == 202
        status, data, headers = await c.post_records(body([record(i) for i in range(3)]))
        assert status == 429
        assert "records per connection" in data["message"]
        assert 59 <= int(headers["Retry-After"]) <= 60
        assert (await c.post_records(body([record(i) for i in range(2)])))[0] == 202
        assert c.sandbox.state.stats()["max_window_records"] == {CONNECTION: 5}


@given(st.lists(st.tuples(st.floats(0, 10), st.integers(1, 50)), max_size=40))
def test_rolling_window_max_is_exact(arrivals: list[tuple[float, int]]) -> None:
    window = RollingWindow(2.0)
    arrivals.sort()
    for at, count in arrivals:
        window.add(at, count)
    brute = max(
        (sum(n for t, n in arrivals if end - 2.0 < t <= end) for end, _ in arrivals), default=0
    )
    assert window.max_total == brute


@given(st.lists(st.tuples(st.floats(0, 10), st.integers(1, 50)), max_size=20), st.integers(1, 80))
def test_rolling_window_wait_for_room(arrivals: list[tuple[float, int]], count: int) -> None:
    budget = 100
    window = RollingWindow(2.0)
    for at, n in sorted(arrivals):
        window.add(at, n)
    now = 10.0
    wait = window.wait_for_room(now, count, budget)
    if wait is None:
        assert window.total + count <= budget
    else:
        assert wait > 0
        assert window.wait_for_room(now + wait, count, budget) is None


def test_token_bucket_refills_at_its_rate() -> None:
    bucket = TokenBucket(rate=10.0, capacity=2, now=0.0)
    assert bucket.take(0.0) == 0.0
    assert bucket.take(0.0) == 0.0
    assert bucket.take(0.0) == pytest.approx(0.1)
    assert bucket.take(0.1) == 0.0
    assert bucket.take(100.0) == 0.0  # never more than capacity stored
    assert bucket.take(100.0) == 0.0
    assert bucket.take(100.0) > 0


# -- faults -----------------------------------------------------------------------------------


async def test_error_rate_answers_5xx(client: Client) -> None:
    client.sandbox.state.set_faults({"error_rate": 1.0})
    status, data, _ = await client.post_records(body())
    assert status in (500, 502, 503, 504)
    assert "injected" in data["message"]
    assert client.sandbox.state.stats()["posts"] == 0


async def test_reset_rate_drops_the_connection(client: Client) -> None:
    client.sandbox.state.set_faults({"reset_rate": 1.0})
    with pytest.raises(aiohttp.ClientConnectionError):
        await client.post_records(body())
    client.sandbox.state.set_faults({"reset_rate": 0.0})
    assert (await client.post_records(body()))[0] == 202
    assert client.sandbox.state.stats()["requests"]["POST /amc/audiences/records dropped"] == 1


async def test_timeout_rate_hangs_past_the_client_timeout(custom_client: Any) -> None:
    async with custom_client(SandboxSettings(timeout_rate=1.0)) as c:
        started = time.monotonic()
        with pytest.raises(TimeoutError):
            async with c.http.get(
                c.sandbox.url + api.TERMS_PATH,
                headers=c.headers(api.CONNECTIONS_MEDIA_TYPE),
                timeout=aiohttp.ClientTimeout(total=0.3),
            ):
                pass
        assert time.monotonic() - started < 5
    # leaving the block shut the sandbox down promptly despite the hanging handler


async def test_latency_is_added(custom_client: Any) -> None:
    async with custom_client(SandboxSettings(latency_s=0.2)) as c:
        started = time.monotonic()
        assert (await c.call("GET", api.TERMS_PATH))[0] == 200
        assert time.monotonic() - started >= 0.2


def test_unknown_fault_is_rejected() -> None:
    from syncd.sandbox.state import SandboxState

    with pytest.raises(ValueError, match="unknown fault"):
        SandboxState(SandboxSettings()).set_faults({"storm": 1})


# -- control endpoints and the CLI ------------------------------------------------------------


async def test_control_endpoints(client: Client) -> None:
    url = client.sandbox.url
    await client.post_records(body([record(0), record(1)]))
    async with client.http.get(f"{url}/_sandbox/stats") as r:
        assert (await r.json())["records"] == {CONNECTION: 2}
    async with client.http.get(f"{url}/_sandbox/ledger", params={"connectionId": CONNECTION}) as r:
        entries = await r.json()
    assert [e["record"]["externalUserId"] for e in entries] == ["cdp-user-0", "cdp-user-1"]
    assert entries[0].keys() == {
        "jobRequestId",
        "audienceId",
        "connectionId",
        "receivedAt",
        "record",
    }
    async with client.http.get(f"{url}/_sandbox/ledger") as r:
        assert r.status == 400
    async with client.http.get(f"{url}/_sandbox/log") as r:
        log = await r.json()
    assert log[-1]["method"] == "POST"
    assert log[-1]["path"] == api.RECORDS_PATH
    assert log[-1]["status"] == 202
    async with client.http.post(f"{url}/_sandbox/faults", json={"error_rate": 1.0}) as r:
        assert (await r.json())["error_rate"] == 1.0
    assert (await client.post_records(body()))[0] >= 500
    async with client.http.post(f"{url}/_sandbox/faults", json={"bogus": 1}) as r:
        assert r.status == 400
        assert "bogus" in (await r.json())["message"]
    async with client.http.post(f"{url}/_sandbox/reset") as r:
        assert r.status == 204
    stats = client.sandbox.state.stats()
    assert stats["records"] == {}
    assert stats["requests"] == {}
    assert client.sandbox.state.ledger(CONNECTION) == []
    assert (await client.post_records(body()))[0] == 202  # faults cleared, token still valid


async def test_provide_sets_up_terms_connections_and_audiences_with_given_ids(
    client: Client,
) -> None:
    url, state = client.sandbox.url, client.sandbox.state
    assert not state.terms_accepted
    provided = {
        "terms_accepted": True,
        "connections": [CONNECTION],
        "audiences": [{"audienceId": 347891, "connectionId": CONNECTION, "ttl": 86400}],
    }
    async with client.http.post(f"{url}/_sandbox/provide", json=provided) as r:
        assert r.status == 200
        assert await r.json() == {
            "terms_accepted": True,
            "connections": [CONNECTION],
            "audiences": [347891],
        }
    view = state.audience_view(347891)
    assert view is not None
    assert view["targetResource"] == {"connectionId": CONNECTION}
    assert view["metadata"]["ttl"] == 86400
    again = {"audiences": [{"audienceId": 347891, "connectionId": "other"}]}
    async with client.http.post(f"{url}/_sandbox/provide", json=again) as r:
        assert r.status == 200  # what exists stays as it is
    assert state.audiences[347891]["targetResource"] == {"connectionId": CONNECTION}
    for bad in (
        [],
        {"audiences": [{"audienceId": "x", "connectionId": "c"}]},
        {"audiences": [{"audienceId": 5}]},
        {"connections": [""]},
        {"audiences": [{"audienceId": 6, "connectionId": "c", "ttl": -1}]},
    ):
        async with client.http.post(f"{url}/_sandbox/provide", json=bad) as r:
            assert r.status == 400, bad
    assert sorted(state.audiences) == [347891]


async def test_without_ledger_records_are_only_counted(custom_client: Any) -> None:
    async with custom_client(SandboxSettings(keep_ledger=False)) as c:
        assert (await c.post_records(body([record(i) for i in range(10)])))[0] == 202
        assert c.sandbox.state.ledger(CONNECTION) == []
        assert c.sandbox.state.stats()["records"] == {CONNECTION: 10}


def test_every_setting_is_a_flag() -> None:
    args = build_parser().parse_args(
        [
            "sandbox",
            "--port",
            "0",
            "--job-delay-s",
            "0.5",
            "--rate-per-s",
            "1000",
            "--burst",
            "900",
            "--no-ledger",
            "--reject-over-budget",
            "--window-budget",
            "1000",
            "--records-error-for-audience",
            "347891",
            "--seed",
            "7",
        ]
    )
    assert args.port == 0
    assert settings_from_args(args) == SandboxSettings(
        job_delay_s=0.5,
        rate_per_s=1000.0,
        burst=900,
        keep_ledger=False,
        reject_over_budget=True,
        window_budget=1000,
        records_error_for_audience=347891,
        seed=7,
    )
    defaults = settings_from_args(build_parser().parse_args(["sandbox"]))
    assert defaults == SandboxSettings()


async def test_a_storm_and_a_revoked_refresh_token_can_start_with_the_sandbox() -> None:
    args = build_parser().parse_args(
        ["sandbox", "--throttle-for-s", "30", "--revoke-refresh-token"]
    )
    async with running_sandbox(settings_from_args(args)) as sb, aiohttp.ClientSession() as http:
        client = Client(http, sb)
        status, data = await client.token()
        assert (status, data["error"]) == (400, "invalid_grant")
        sb.state.set_faults({"revoke_refresh_token": False})
        await client.login()
        status, _, headers = await client.post_records(body())
        assert status == 429
        assert 28 <= int(headers["Retry-After"]) <= 30
