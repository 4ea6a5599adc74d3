"""`setup_faults`, the start-up checks of `syncd run` (those of `check-config --online`) as
blocked connections, against a fake Amazon: which connection each failed check blocks, and why."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest

from syncd import config as config_mod
from syncd.amazon.api import Audience, Connection, Terms
from syncd.errors import AuthError, RejectedError, RetryableError
from syncd.preflight import AmazonUnreachableError, check_online, setup_faults

A, B = "conn-a", "conn-b"
DESTINATIONS = [
    {"audience": "vip", "connection_id": A, "audience_id": 1, "country_code": "US"},
    {"audience": "lapsed", "connection_id": A, "audience_id": 2, "country_code": "US"},
    {"audience": "newsletter", "connection_id": B, "audience_id": 3, "country_code": "GB"},
]


@dataclass
class FakeAmazon:
    terms: bool | Exception = True
    connections: set[str] = field(default_factory=lambda: {A, B})
    audiences: dict[int, str] = field(default_factory=lambda: {1: A, 2: A, 3: B})
    token: Exception | None = None
    refuse_audience: dict[int, Exception] = field(default_factory=dict)
    metadata: dict[int, dict[str, Any]] = field(default_factory=dict)

    async def ensure_token(self) -> str:
        if self.token is not None:
            raise self.token
        return "token"

    async def get_terms(self) -> Terms:
        if isinstance(self.terms, Exception):
            raise self.terms
        return Terms("", "t", self.terms)

    async def list_connections(self, connection_id: str | None = None) -> list[Connection]:
        if connection_id not in self.connections:
            raise RejectedError("HTTP 404: connection not found", status=404)
        return [Connection(connection_id, {})]

    async def get_audience(self, audience_id: int) -> Audience:
        if audience_id in self.refuse_audience:
            raise self.refuse_audience[audience_id]
        if audience_id not in self.audiences:
            raise RejectedError(f"HTTP 404: audience {audience_id} not found", status=404)
        raw: dict[str, Any] = {"targetResource": {"connectionId": self.audiences[audience_id]}}
        if audience_id in self.metadata:
            raw["metadata"] = self.metadata[audience_id]
        return Audience(audience_id, raw)


async def faults(amazon: FakeAmazon) -> dict[str, tuple[str, int | None, str]]:
    cfg = config_mod.from_mapping({"destinations": DESTINATIONS})
    found = await setup_faults(cfg, amazon)  # type: ignore[arg-type]
    return {c: (f.cause, f.status, f.item) for c, f in found.items()}


async def test_a_good_setup_blocks_nothing() -> None:
    assert await faults(FakeAmazon()) == {}


async def test_terms_not_accepted_block_every_connection() -> None:
    assert await faults(FakeAmazon(terms=False)) == {
        A: ("forbidden", None, f"AMC terms for connection {A}"),
        B: ("forbidden", None, f"AMC terms for connection {A}"),
    }


async def test_a_missing_connection_blocks_it_alone() -> None:
    assert await faults(FakeAmazon(connections={A})) == {B: ("not_found", 404, f"connection {B}")}


async def test_a_missing_or_forbidden_audience_blocks_its_connection() -> None:
    lacking = FakeAmazon(audiences={1: A, 3: B})
    assert await faults(lacking) == {A: ("not_found", 404, "destination 'lapsed' (audience_id 2)")}
    forbidden = FakeAmazon(refuse_audience={3: RejectedError("HTTP 403", status=403)})
    assert await faults(forbidden) == {
        B: ("forbidden", 403, "destination 'newsletter' (audience_id 3)")
    }


async def test_an_audience_tied_to_another_connection_is_a_bad_request() -> None:
    assert await faults(FakeAmazon(audiences={1: A, 2: A, 3: A})) == {
        B: ("bad_request", None, "destination 'newsletter' (audience_id 3)")
    }


async def test_refused_credentials_block_no_connection() -> None:
    refused = AuthError("invalid_grant", status=400)
    assert await faults(FakeAmazon(token=refused)) == {}
    assert await faults(FakeAmazon(terms=refused)) == {}


async def test_no_verdict_raises_instead_of_blocking() -> None:
    with pytest.raises(AmazonUnreachableError):
        await faults(FakeAmazon(terms=RetryableError("HTTP 503", status=503)))


@pytest.mark.parametrize(
    ("ttl", "shown"),
    [
        (34_300_800, "ttl 34300800 s"),  # Amazon's default, the most common ttl
        (1_234_567, "ttl 1234567 s"),
        (86_400, "ttl 86400 s"),
        (60.0, "ttl 60 s"),
        (1.5, "ttl 1.5 s"),
        (0, "ttl 0 s"),
    ],
)
async def test_check_online_shows_each_ttl_as_the_number_of_seconds_it_is(
    ttl: float, shown: str
) -> None:
    """`check-config --online` printed a ttl of a million seconds or more in exponent notation,
    six digits kept: the default 34300800 as `3.43008e+07`, 1234567 as `1.23457e+06`."""
    cfg = config_mod.from_mapping({"destinations": DESTINATIONS[:1]})
    amazon = FakeAmazon(metadata={1: {"ttl": ttl}})
    findings = [f async for f in check_online(cfg, amazon)]  # type: ignore[arg-type]
    assert findings[-1].ok
    assert findings[-1].detail == f"readable; {shown}"
