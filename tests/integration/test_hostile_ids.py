"""Profile ids outside Amazon's externalUserId pattern, through `syncd run`: each one is mapped
to its SHA-256 hex and delivered; none can make Amazon answer 400 or stop syncd."""

from __future__ import annotations

import hashlib
import uuid
from pathlib import Path
from typing import Any

import orjson
import pytest

from syncd.localstack import CONNECTION, DaemonProcess, produce, sqlite_daemon_config, wait_for

pytestmark = pytest.mark.integration

# (profile id, kept as the externalUserId: it fits ^[0-9a-zA-Z_-]{1,128}$ as a whole string)
HOSTILE_IDS = [
    ("cdp-user-1\n", False),  # `re.match` with `$` accepts a trailing newline
    ("cdp-user-2\r\n", False),
    ('cdp-"user"-3', False),
    ("cdp\\user\\4", False),
    ('cdp-user-5","countryCode":"US', False),  # an attempt to inject a field
    ("cdp\x00user\x01\x1f\x7f6", False),
    ("cdp\tuser 7", False),
    ("cdp-user-8-\U0001f600-é", False),  # non-ASCII, a non-BMP character
    ("\u2028cdp-user-9", False),  # a JSON-legal line separator
    ("a" * 128, True),
    ("b" * 129, False),
    ("cdp-user-10", True),  # a plain id, in the same batches
]


def expected_external_id(profile_id: str, kept: bool) -> str:
    return profile_id if kept else hashlib.sha256(profile_id.encode()).hexdigest()


async def test_hostile_profile_ids_are_mapped_and_delivered_without_a_400(
    kafka: Any, sandbox: Any, tmp_path: Path
) -> None:
    topic = f"ids-{uuid.uuid4().hex[:8]}"
    await kafka.create_topic(topic, partitions=1)
    events = [
        (
            f"k{i}".encode(),
            orjson.dumps(
                {
                    "profile_id": pid,
                    "identifiers": {"email": f"person{i}@example.com"},
                    "audiences": {"add": ["vip"]},
                }
            ),
        )
        for i, (pid, _) in enumerate(HOSTILE_IDS)
    ]
    await produce(kafka.bootstrap, topic, events)
    daemon = DaemonProcess(
        tmp_path, sqlite_daemon_config(kafka.bootstrap, sandbox, topic, tmp_path)
    )
    daemon.start()
    want = {expected_external_id(pid, kept) for pid, kept in HOSTILE_IDS}

    def received() -> set[str]:
        return {e["record"]["externalUserId"] for e in sandbox.state.ledger(CONNECTION)}

    async def all_delivered() -> bool:
        daemon.check_alive()
        return want <= received()

    await wait_for(all_delivered, 60, "every hostile id delivered")
    rejected = {k: n for k, n in sandbox.state.stats()["requests"].items() if k.endswith(" 400")}
    assert rejected == {}
    assert received() == want
    assert await daemon.terminate() == 0
