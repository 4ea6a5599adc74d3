"""The strict consent policy against real processes (broker, sandbox, `syncd run`): an EU add
without consent is never POSTed and becomes a `consent_missing` member dead letter; a DENIED add
removes a member Amazon holds; a destination under "pass" sends what the events carry; an
identifiers-only event is kept back only where the profile is a member."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from syncd.localstack import (
    CONNECTION,
    DaemonProcess,
    produce,
    running_sandbox,
    sqlite_daemon_config,
    wait_for,
)
from syncd.sandbox.state import SandboxSettings
from tests.harness import read_topic

pytestmark = [pytest.mark.integration, pytest.mark.slow]

STRICT = {
    "audience": "eu",
    "connection_id": CONNECTION,
    "audience_id": 424242424242,
    "country_code": "DE",
    "consent_policy": "strict",
}
OPEN = {**STRICT, "audience": "open", "audience_id": 535353535353, "consent_policy": "pass"}


def event(profile_id: str, user_data: str | None, audience: str = "eu") -> tuple[bytes, bytes]:
    body: dict[str, Any] = {
        "profile_id": profile_id,
        "identifiers": {"email": f"{profile_id}@example.com"},
        "audiences": {"add": [audience]},
    }
    if user_data is not None:
        body["consent"] = {"amzn_user_data": user_data}
    return profile_id.encode(), orjson.dumps(body)


def identifiers_only(profile_id: str) -> tuple[bytes, bytes]:
    body = {"profile_id": profile_id, "identifiers": {"email": f"new.{profile_id}@example.com"}}
    return profile_id.encode(), orjson.dumps(body)


async def members_at(sandbox: Any, audience_id: int) -> set[str]:
    """The audience's live members, as the sandbox's control API shows them."""
    url = f"{sandbox.url}/_sandbox/audiences/{audience_id}/members"
    async with aiohttp.ClientSession() as http, http.get(url) as resp:
        if resp.status == 404:
            return set()
        view = await resp.json()
    return {m["externalUserId"] for m in view["members"]}


def sent(sandbox: Any) -> list[tuple[str, str]]:
    return [
        (e["record"]["externalUserId"], e["record"]["action"])
        for e in sandbox.state.ledger(CONNECTION)
    ]


async def test_strict_consent_dead_letters_unanswered_eu_adds_and_removes_on_denied(
    kafka: Any, tmp_path: Path
) -> None:
    topic, dlq = f"consent-{uuid.uuid4().hex[:8]}", f"dlq-{uuid.uuid4().hex[:8]}"
    await kafka.create_topic(topic, partitions=1)
    await kafka.create_topic(dlq, partitions=1)
    settings = SandboxSettings(job_delay_s=0.1, rate_per_s=1000, burst=1000)
    async with running_sandbox(settings) as sb:
        raw = sqlite_daemon_config(
            kafka.bootstrap, sb, topic, tmp_path, destinations=[STRICT, OPEN]
        )
        raw["kafka"]["dead_letter_topic"] = dlq
        daemon = DaemonProcess(tmp_path, raw).start()
        await produce(
            kafka.bootstrap,
            topic,
            [
                event("granted-1", "GRANTED"),
                event("later-denied", "GRANTED"),
                event("no-consent", None),  # DE (the destination's default) without consent
                event("unknown-consent", "UNKNOWN"),
                event("open-no-consent", None, audience="open"),  # "pass": sent as it is
            ],
        )

        async def members_added() -> bool:
            daemon.check_alive()
            return {"granted-1", "later-denied"} <= await members_at(sb, STRICT["audience_id"])

        await wait_for(members_added, 60, "the consented members in the strict audience")
        dead = await read_topic(kafka.bootstrap, dlq, 2)
        assert {orjson.loads(m.value)["externalUserId"] for m in dead} == {
            "no-consent",
            "unknown-consent",
        }
        for m in dead:
            headers = dict(m.headers)
            assert headers["syncd-kind"] == b"member"
            assert headers["syncd-reason"] == b"consent_missing"
            value = orjson.loads(m.value)
            assert set(value) == {"audience", "audience_id", "externalUserId", "action", "record"}
            assert (value["audience"], value["audience_id"]) == ("eu", STRICT["audience_id"])
            assert value["action"] == value["record"]["action"] == "CREATE"
            assert value["record"]["countryCode"] == "DE"
            assert b"@example.com" not in m.value  # hashed
        assert (
            await daemon.metric("syncd_events_dead_lettered_total", {"reason": "consent_missing"})
            == 2
        )

        await produce(kafka.bootstrap, topic, [event("later-denied", "DENIED")])

        async def removed() -> bool:
            daemon.check_alive()
            return "later-denied" not in await members_at(sb, STRICT["audience_id"])

        await wait_for(removed, 60, "the member who denied consent removed")
        assert await members_at(sb, STRICT["audience_id"]) == {"granted-1"}
        assert "open-no-consent" in await members_at(sb, OPEN["audience_id"])
        ids = {user for user, _ in sent(sb)}
        assert not ids & {"no-consent", "unknown-consent"}  # never POSTed
        assert ("later-denied", "DELETE") in sent(sb)

        # Identifiers only, without consent (DE): kept back where the profile is a member of
        # the strict audience; a profile that is a member nowhere has nothing to do (filtered).
        await produce(
            kafka.bootstrap,
            topic,
            [identifiers_only("stranger"), identifiers_only("granted-1")],
        )

        async def settled() -> bool:
            daemon.check_alive()
            filtered = {"reason": "not_member"}
            dead = {"reason": "consent_missing"}
            return (
                await daemon.metric("syncd_events_filtered_total", filtered) == 1
                and await daemon.metric("syncd_events_dead_lettered_total", dead) >= 3
            )

        await wait_for(settled, 60, "the identifiers-only events handled")
        dead = await read_topic(kafka.bootstrap, dlq, 3)
        assert sorted(orjson.loads(m.value)["externalUserId"] for m in dead) == [
            "granted-1",
            "no-consent",
            "unknown-consent",
        ]
        assert await daemon.terminate() == 0
