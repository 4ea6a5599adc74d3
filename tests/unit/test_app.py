"""The daemon's verdicts: on a failed task (refused credentials keep it up, unready, however the
task that met them wrapped the error) and on start-up checks that fail on their own (nothing is
blocked, the daemon starts)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, cast

import pytest
from structlog.testing import capture_logs

from syncd import config as config_mod
from syncd.amazon.api import Audience
from syncd.amazon.client import AmazonClient
from syncd.app import Daemon, refused_credentials
from syncd.deliver import ConnectionSender
from syncd.errors import AmazonError, AuthError
from syncd.source import KafkaSource
from syncd.store import Store
from tests.unit.test_preflight import DESTINATIONS, FakeAmazon


def test_refused_credentials_are_found_inside_a_task_groups_exception_group() -> None:
    auth = AuthError("LwA token request failed (HTTP 400): invalid_grant")
    assert refused_credentials(auth) is auth
    # a sender's workers meeting the refused token at once: its TaskGroup raises a group
    group = ExceptionGroup("unhandled errors in a TaskGroup", [auth, AuthError("again")])
    assert refused_credentials(group) is auth
    nested = ExceptionGroup("outer", [ExceptionGroup("inner", [auth])])
    assert refused_credentials(nested) is auth
    # anything else in the group is a failure of its own: the daemon exits for a restart
    mixed = ExceptionGroup("unhandled errors in a TaskGroup", [auth, RuntimeError("bug")])
    assert refused_credentials(mixed) is None
    assert refused_credentials(RuntimeError("bug")) is None
    assert refused_credentials(None) is None


@dataclass
class OddAmazon(FakeAmazon):
    """Answers an audience's metadata in a shape the checks do not expect: no object at all
    (a string targetResource is read as naming no connection since aeae8e6)."""

    async def get_audience(self, audience_id: int) -> Audience:
        return Audience(audience_id, cast(dict[str, Any], ["not", "an", "object"]))


@dataclass
class Sender:
    """Records the connections the start-up checks block."""

    blocks: list[str] = field(default_factory=list)

    def block(self, cause: str, exc: AmazonError, check: Any) -> Callable[[], Awaitable[None]]:
        self.blocks.append(cause)

        async def probe() -> None:
            pass

        return probe


@pytest.mark.parametrize(
    ("amazon", "error_type"),
    [
        (FakeAmazon(terms=ValueError("unexpected answer")), "ValueError"),
        (OddAmazon(), "AttributeError"),
    ],
    ids=["client-raises-valueerror", "unexpected-answer"],
)
async def test_a_start_up_check_that_fails_on_its_own_blocks_nothing_and_syncd_goes_on(
    amazon: FakeAmazon, error_type: str
) -> None:
    """A failure of the start-up checks themselves (a bug, an answer they do not expect) is no
    verdict, as Amazon unreachable is: nothing is blocked, the daemon starts (a records POST
    finds any fault), and a warning names the error. A single answer must never stop syncd."""
    cfg = config_mod.from_mapping({"destinations": DESTINATIONS})
    senders = {conn: Sender() for conn in sorted({d.connection_id for d in cfg.destinations})}
    with capture_logs() as logs:
        probes = await Daemon(cfg)._check_setup(
            cfg,
            cast(AmazonClient, amazon),
            cast(dict[str, ConnectionSender], senders),
            list(cfg.destinations),
        )
    assert probes == {}
    assert all(s.blocks == [] for s in senders.values())
    [warning] = [e for e in logs if e["log_level"] == "warning"]
    assert "nothing blocked" in warning["event"]
    assert error_type in warning["error"]


@dataclass
class HealthProbes:
    """The store's and the broker's answers to the daemon's health loop."""

    halt: asyncio.Event
    flowing: bool = True
    probes: int = 0

    async def ping(self) -> bool:
        return True

    takes_writes = True

    async def reachable(self) -> bool:
        self.probes += 1
        if self.probes >= 2:
            self.halt.set()  # two rounds: the loop stops after the second
        return True

    @property
    def dead_letters_flowing(self) -> bool:
        return self.flowing


@pytest.mark.parametrize("flowing", [True, False])
async def test_readiness_kafka_is_false_while_dead_letters_do_not_flow(flowing: bool) -> None:
    """/readyz's `kafka` check: the brokers answer and the dead-letter topic takes what is sent
    (a dead letter failing for long holds its partition's commits)."""
    halt = asyncio.Event()
    probes = HealthProbes(halt, flowing=flowing)
    daemon = Daemon(config_mod.Config(destinations=DESTINATIONS))
    await daemon._health_loop(cast(Store, probes), cast(KafkaSource, probes), halt)
    assert daemon.readiness()["kafka"] is flowing
    assert daemon.readiness()["store"] is True
