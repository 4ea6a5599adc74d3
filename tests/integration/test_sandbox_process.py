"""`syncd sandbox` as a separate process from the console script: token -> add records -> poll
until SUCCEEDED over real HTTP, then SIGTERM exits 0."""

from __future__ import annotations

import asyncio
import hashlib
import re
import signal
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import orjson
import pytest

from syncd.amazon import api

pytestmark = pytest.mark.integration

SYNCD = Path(sys.executable).parent / "syncd"
LISTENING = re.compile(r"^sandbox listening on (http://127\.0\.0\.1:(\d+))$")
CONNECTION = "5a523424-e8b3-4da5-9a32-24a861aea576"
AUDIENCE = 413642381039213536


@pytest.fixture
async def sandbox_process() -> AsyncIterator[tuple[asyncio.subprocess.Process, str]]:
    proc = await asyncio.create_subprocess_exec(
        str(SYNCD),
        "sandbox",
        "--port",
        "0",
        "--job-delay-s",
        "0.3",
        "--rate-per-s",
        "200",
        "--seed",
        "5",
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


async def test_add_then_poll_until_succeeded(
    sandbox_process: tuple[asyncio.subprocess.Process, str],
) -> None:
    proc, url = sandbox_process
    async with aiohttp.ClientSession() as http:
        form = {
            "grant_type": "refresh_token",
            "refresh_token": "sandbox-refresh-token",
            "client_id": "sandbox-client-id",
            "client_secret": "sandbox-client-secret",
        }
        async with http.post(url + api.TOKEN_PATH, data=form) as r:
            assert r.status == 200
            token = (await r.json())["access_token"]
        headers = {
            "Authorization": f"Bearer {token}",
            api.CLIENT_ID_HEADER: "sandbox-client-id",
            "Content-Type": api.AUDIENCES_MEDIA_TYPE,
            "Accept": api.AUDIENCES_MEDIA_TYPE,
        }
        records = [
            {
                "externalUserId": f"cdp-user-{i}",
                "countryCode": "US",
                "action": "CREATE",
                "hashedPII": [{"email": hashlib.sha256(f"u{i}@example.com".encode()).hexdigest()}],
            }
            for i in range(100)
        ]
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
