"""Deterministic synthetic CDP traffic: realistic 8-field profiles over mixed countries, as
canonical input events. Used by `syncd demo`, the benchmarks and the integration tests.

All data is invented; phone numbers use the fictional/reserved ranges where a country has them.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import orjson

from syncd.vocabulary import ConsentSignal

_GRANTED = ConsentSignal.GRANTED.value
_FIRST = [
    "James",
    "Mary",
    "José",
    "Zoë",
    "Jürgen",
    "Amélie",
    "Hiro",
    "Priya",
    "Søren",
    "Anne-Marie",
    "O'Neil",
    "Ludwig",
    "Chiara",
    "Carlos",
    "Fatima",
    "Aarav",
    "Yuki",
    "Émile",
]
_LAST = [
    "Smith",
    "Müller",
    "García",
    "Dubois",
    "Rossi",
    "Tanaka",
    "Patel",
    "O'Brien",
    "Nørgaard",
    "Schröder",
    "de la Cruz",
    "Lefèvre",
    "Kowalski",
    "Suzuki",
    "Sharma",
    "MacDonald",
]
_STREET = [
    "Main Street",
    "Oak Avenue",
    "Baker Street",
    "Königstraße",
    "Rue de l'Église",
    "West Boulevard",
    "High Road",
    "Via Roma",
    "Calle Mayor",
    "North Drive",
    "Elm Court",
]


@dataclass(frozen=True)
class _Country:
    code: str
    cities: Sequence[str]
    states: Sequence[str]
    phone: str  # pattern, '#' = random digit
    postal: str  # pattern, '#' = digit, 'A' = letter


_COUNTRIES = [
    _Country(
        "US",
        ["Seattle", "New York City", "Austin"],
        ["Washington", "NY", "Texas"],
        "+1 (206) 555-01##",
        "981##-####",
    ),
    _Country("GB", ["London", "Manchester"], ["England", "Scotland"], "020 7946 0###", "SW1A 1AA"),
    _Country("DE", ["München", "Berlin"], ["Bavaria", "Berlin"], "+49 30 901820##", "10###"),
    _Country("FR", ["Paris", "Lyon"], ["Île-de-France", "Rhône"], "+33 1 09 75 8# ##", "750##"),
    _Country("JP", ["Tokyo", "Osaka"], ["Tokyo", "Osaka"], "03-1234-5###", "100-000#"),
    _Country("IN", ["Mumbai", "Delhi"], ["Maharashtra", "Delhi"], "+91 98765 43###", "4000##"),
]


def _fill(rng: random.Random, pattern: str) -> str:
    return "".join(
        str(rng.randrange(10)) if c == "#" else rng.choice("ABCDEFGHJK") if c == "A" else c
        for c in pattern
    )


def profile(rng: random.Random, profile_id: str) -> tuple[str, dict[str, object]]:
    """(country, identifiers) of one invented person."""
    country = rng.choice(_COUNTRIES)
    first, last = rng.choice(_FIRST), rng.choice(_LAST)
    email = f"{first}.{last}{rng.randrange(1000)}@example.com".replace(" ", "")
    identifiers: dict[str, object] = {
        "email": email if rng.random() > 0.2 else [email, f"{profile_id}@work.example"],
        "phone": _fill(rng, country.phone),
        "first_name": first,
        "last_name": last,
        "address": f"{rng.randrange(1, 999)} {rng.choice(_STREET)}, Apt. {rng.randrange(1, 40)}",
        "city": rng.choice(country.cities),
        "state": rng.choice(country.states),
        "postal_code": _fill(rng, country.postal),
    }
    return country.code, identifiers


def events(
    count: int,
    *,
    seed: int = 0,
    audiences: Sequence[str] = ("vip", "lapsed", "newsletter"),
    profiles: int | None = None,
    remove_ratio: float = 0.2,
    bad_ratio: float = 0.0,
    id_prefix: str = "cdp-user-",
) -> Iterator[tuple[bytes, bytes]]:
    """Yield (key, value) Kafka messages: canonical events about `profiles` people (default:
    one event per person). A `bad_ratio` share is unusable on purpose (not JSON, no profile id,
    unknown audience) to exercise the dead-letter path."""
    rng = random.Random(seed)
    people = profiles or count
    for i in range(count):
        pid = f"{id_prefix}{rng.randrange(people) if profiles else i}"
        if bad_ratio and rng.random() < bad_ratio:
            yield (
                pid.encode(),
                rng.choice(
                    [
                        b"{not json",
                        b'{"identifiers": {"email": "x@example.com"}}',
                        orjson.dumps(
                            {
                                "profile_id": pid,
                                "identifiers": {"email": "a@example.com"},
                                "audiences": {"add": ["no-such-audience"]},
                            }
                        ),
                    ]
                ),
            )
            continue
        country, identifiers = profile(rng, pid)
        audience = rng.choice(list(audiences))
        action = "remove" if rng.random() < remove_ratio else "add"
        event = {
            "event_id": f"evt-{seed}-{i}",
            "profile_id": pid,
            "occurred_at": f"2026-11-22T10:{(i // 60) % 60:02d}:{i % 60:02d}Z",
            "country": country,
            "identifiers": identifiers,
            "audiences": {action: [audience]},
            "consent": {"amzn_user_data": _GRANTED, "amzn_ad_storage": _GRANTED},
        }
        yield pid.encode(), orjson.dumps(event)
