"""`syncd sandbox` as a separate process from the console script: token -> add records -> poll
until SUCCEEDED over real HTTP, then SIGTERM exits 0."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import re
import signal
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from syncd.amazon import api

pytestmark = pytest.mark.integration

SYNCD = Path(sys.executable).parent / "syncd"
LISTENING = re.compile(r"^sandbox listening on (http://127\.0\.0\.1:(\d+))$")
CONNECTION = "5a523424-e8b3-4da5-9a32-24a861aea576"
AUDIENCE = 413642381039213536
EXAMPLE_CONFIG = Path(__file__).resolve().parents[2] / "config.example.toml"


@contextlib.asynccontextmanager
async def start_sandbox(*flags: str) -> AsyncIterator[tuple[asyncio.subprocess.Process, str]]:
    """`syncd sandbox --port 0 --rate-per-s 200 *flags` until it listens: (process, URL)."""
    proc = await asyncio.create_subprocess_exec(
        str(SYNCD),
        "sandbox",
        "--port",
        "0",
        "--rate-per-s",
        "200",
        *flags,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert proc.stdout is not None
    try:
        line = (await asyncio.wait_for(proc.stdout.readline(), 30)).decode().rstrip("\n")
        match = LISTENING.match(line)
        assert match, f"unexpected first line {line!r}"
        assert int(match.group(2)) > 0
        yield proc, match.group(1)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


@pytest.fixture
async def sandbox_process() -> AsyncIterator[tuple[asyncio.subprocess.Process, str]]:
    async with start_sandbox("--job-delay-s", "0.3", "--seed", "5") as started:
        yield started


async def login(http: aiohttp.ClientSession, url: str) -> dict[str, str]:
    """Headers of an authorized API call."""
    form = {
        "grant_type": "refresh_token",
        "refresh_token": "sandbox-refresh-token",
        "client_id": "sandbox-client-id",
        "client_secret": "sandbox-client-secret",
    }
    async with http.post(url + api.TOKEN_PATH, data=form) as r:
        assert r.status == 200
        token = (await r.json())["access_token"]
    return {
        "Authorization": f"Bearer {token}",
        api.CLIENT_ID_HEADER: "sandbox-client-id",
        "Content-Type": api.AUDIENCES_MEDIA_TYPE,
        "Accept": api.AUDIENCES_MEDIA_TYPE,
    }


async def test_add_then_poll_until_succeeded(
    sandbox_process: tuple[asyncio.subprocess.Process, str],
) -> None:
    proc, url = sandbox_process
    async with aiohttp.ClientSession() as http:
        headers = await login(http, url)
        records = [member(i) for i in range(100)]
        payload = orjson.dumps(api.records_body(AUDIENCE, CONNECTION, records))
        async with http.post(url + api.RECORDS_PATH, data=payload, headers=headers) as r:
            assert r.status == 202
            job_id = (await r.json(content_type=None))["jobRequestId"]

        states: list[str] = []
        deadline = time.monotonic() + 15
        while not states or states[-1] == "PENDING":
            assert time.monotonic() < deadline, f"job never finished: {states[-3:]}"
            async with http.get(f"{url}{api.RECORDS_PATH}/{job_id}", headers=headers) as r:
                assert r.status == 200
                status = await r.json(content_type=None)
            states.append(status["jobState"])
            if states[-1] == "PENDING":
                await asyncio.sleep(0.05)  # polling cadence against the real process

        assert states[0] == "PENDING"
        assert states[-1] == "SUCCEEDED"
        assert status["audienceSize"]["receivedRecordSize"] == 100
        async with http.get(url + "/_sandbox/stats") as r:
            stats = await r.json()
        assert stats["records"] == {CONNECTION: 100}
        assert stats["posts"] == 1
        assert stats["terminal_polls"] == 0
        async with http.get(url + "/_sandbox/ledger", params={"connectionId": CONNECTION}) as r:
            ledger = await r.json()
        assert [e["record"]["externalUserId"] for e in ledger] == [
            r["externalUserId"] for r in records
        ]
        assert all(e["jobRequestId"] == job_id for e in ledger)

    proc.send_signal(signal.SIGTERM)
    assert await asyncio.wait_for(proc.wait(), 15) == 0
    assert proc.stderr is not None
    assert (await proc.stderr.read()) == b""


def member(i: int, country: str = "US") -> dict[str, Any]:
    return {
        "externalUserId": f"cdp-user-{i}",
        "countryCode": country,
        "action": "CREATE",
        "hashedPII": [{"email": hashlib.sha256(f"u{i}@example.com".encode()).hexdigest()}],
    }


async def test_membership_flags_from_the_command_line() -> None:
    """--strict-audiences, --require-consent and --match-rate as flags of the real process;
    the members control route over HTTP."""
    flags = ("--job-delay-s", "0", "--strict-audiences", "--require-consent", "--match-rate", "0")
    async with start_sandbox(*flags) as (proc, url), aiohttp.ClientSession() as http:
        headers = await login(http, url)
        records = [member(0, "US"), member(1, "DE")]
        payload = orjson.dumps(api.records_body(AUDIENCE, CONNECTION, records))
        async with http.post(url + api.RECORDS_PATH, data=payload, headers=headers) as r:
            assert r.status == 404  # strict: the audience was never created
        audience_body = {
            "name": "membersFlagsTest",
            "targetResource": {"connectionId": CONNECTION},
            "metadata": {"ttl": 86400},
        }
        data = orjson.dumps(audience_body)
        async with http.post(url + api.METADATA_PATH, data=data, headers=headers) as r:
            assert r.status == 201
            audience_id = (await r.json(content_type=None))["audienceId"]
        payload = orjson.dumps(api.records_body(audience_id, CONNECTION, records))
        async with http.post(url + api.RECORDS_PATH, data=payload, headers=headers) as r:
            assert r.status == 202
            job_id = (await r.json(content_type=None))["jobRequestId"]
        async with http.get(f"{url}{api.RECORDS_PATH}/{job_id}", headers=headers) as r:
            status = await r.json(content_type=None)  # --job-delay-s 0: already decided
        assert status["jobState"] == "PARTIALLYSUCCEEDED"
        assert [(i["externalId"], "consent" in i["error"]) for i in status["invalidRecords"]] == [
            ("cdp-user-1", True)
        ]
        assert status["audienceSize"] == {
            "receivedRecordSize": 2,
            "idResolutionCount": 0,  # --match-rate 0
            "dspAudienceSize": 1,
        }
        async with http.get(f"{url}/_sandbox/audiences/{audience_id}/members") as r:
            view = await r.json()
        assert [m["externalUserId"] for m in view["members"]] == ["cdp-user-0"]
        assert view["size"] == 1
        received_at = time.time()
        assert received_at - 60 < view["members"][0]["expiresAt"] - 86400 <= received_at
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 15) == 0


async def test_help_lists_the_membership_flags() -> None:
    proc = await asyncio.create_subprocess_exec(
        str(SYNCD), "sandbox", "--help", stdout=asyncio.subprocess.PIPE
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0
    text = out.decode()
    for flag in ("--match-rate", "--strict-audiences", "--require-consent"):
        assert flag in text


async def test_provide_for_sets_up_what_a_syncd_config_names() -> None:
    """`--provide-for CONFIG` (the local stack's sandbox): the AMC terms accepted, the
    config's connections and audiences there with its ids, tied to their connections, so that
    `syncd run` passes its start-up checks; `--strict-audiences` takes the records."""
    flags = ("--strict-audiences", "--provide-for", str(EXAMPLE_CONFIG))
    async with start_sandbox(*flags) as (_, url), aiohttp.ClientSession() as http:
        headers = await login(http, url)
        connections = {**headers, "Accept": api.CONNECTIONS_MEDIA_TYPE}
        async with http.get(url + api.TERMS_PATH, headers=connections) as r:
            assert r.status == 200
            assert (await r.json(content_type=None))["hasAccepted"] is True
        params = {"connectionId": CONNECTION}
        async with http.get(url + api.CONNECTIONS_PATH, params=params, headers=connections) as r:
            assert r.status == 200
        async with http.get(f"{url}{api.METADATA_PATH}/347891", headers=headers) as r:
            assert r.status == 200
            assert (await r.json(content_type=None))["targetResource"] == params
        payload = orjson.dumps(api.records_body(347891, CONNECTION, [member(0, "US")]))
        async with http.post(url + api.RECORDS_PATH, data=payload, headers=headers) as r:
            assert r.status == 202
