"""Throughput of the PII engine on realistic 8-field records (one core).

Prints records/s of `build_hashed_pii` and how many times slower it is than bare
`hashlib.sha256` over the same normalized values, measured in the same run.

    .venv/bin/python bench/bench_pii.py [--records N] [--seed S]
"""

from __future__ import annotations

import argparse
import hashlib
import random
import time
from collections.abc import Callable

from syncd import runtime
from syncd.pii import build_hashed_pii, normalize
from syncd.vocabulary import PII_KEYS

Record = tuple[str, dict[str, str]]

FIRST = ["Mary-Jane", "José", "Jörg", "Aiko", "Priya", "Olivier", "Siobhan", "Zoë", "Hiro", "Sam"]
LAST = ["O'Brien", "Müller", "Yamada", "Sharma", "Dubois", "Smith", "García", "Østergaard"]
STREETS = ["Main Street", "Oak Avenue", "Baker Street", "Königstraße", "Rue de l'Église", "MG Road"]
PLACES = {
    "US": (["Seattle", "New York City", "Austin"], ["California", "Texas", "N.Y.", "WA"]),
    "GB": (["London", "Manchester", "Leeds"], ["England", "Scotland", "Wales"]),
    "DE": (["München", "Berlin", "Köln"], ["Bavaria", "Berlin", "Baden-Württemberg"]),
    "FR": (["Paris", "Lyon", "Marseille"], ["Île-de-France", "Brittany", "Alsace"]),
    "JP": (["Tokyo", "Osaka", "Kyoto"], ["Tokyo", "Osaka", "Hokkaido"]),
    "IN": (["Mumbai", "Delhi", "Bengaluru"], ["Maharashtra", "Delhi", "Karnataka"]),
}


def _phone(rng: random.Random, country: str) -> str:
    n = rng.randrange
    return {
        "US": f"+1 ({n(201, 990)}) {n(200, 999)}-{n(10000):04d}",
        "GB": f"07{n(100, 999)} {n(100000, 999999)}",
        "DE": f"030 {n(1000000, 99999999)}",
        "FR": f"+33 6 {n(10, 99)} {n(10, 99)} {n(10, 99)} {n(10, 99)}",
        "JP": f"090-{n(1000, 9999)}-{n(1000, 9999)}",
        "IN": f"+91 9{n(100000000, 999999999)}",
    }[country]


def _postal(rng: random.Random, country: str) -> str:
    n = rng.randrange
    letter = rng.choice("ABCDEFGHJKLMNPRSTUWYZ")
    return {
        "US": f"{n(10000, 99999)}-{n(10000):04d}",
        "GB": f"{letter}{n(1, 99)} {n(10)}{letter}{letter}",
        "DE": f"{n(10000, 99999)}",
        "FR": f"{n(10000, 99999)}",
        "JP": f"{n(100, 999)}-{n(10000):04d}",
        "IN": f"{n(100000, 999999)}",
    }[country]


def make_records(count: int, seed: int) -> list[Record]:
    rng = random.Random(seed)
    countries = list(PLACES)
    records: list[Record] = []
    for i in range(count):
        country = countries[i % len(countries)]
        cities, states = PLACES[country]
        first, last = rng.choice(FIRST), rng.choice(LAST)
        records.append(
            (
                country,
                {
                    "email": f" {first}.{last}{i}+news@Example.com ",
                    "phone": _phone(rng, country),
                    "firstname": first,
                    "lastname": last,
                    "address": f"{rng.randrange(1, 999)} {rng.choice(STREETS)}, Apt. {i % 50}",
                    "city": rng.choice(cities),
                    "state": rng.choice(states),
                    "postal": _postal(rng, country),
                },
            )
        )
    return records


def _timed(work: Callable[[], object]) -> float:
    start = time.perf_counter()
    work()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=60_000, help="records to hash")
    parser.add_argument("--seed", type=int, default=7, help="seed of the synthetic data")
    args = parser.parse_args()

    records = make_records(args.records, args.seed)
    normalized = [
        text.encode()
        for country, identifiers in records
        for key in PII_KEYS
        if (text := normalize(key, identifiers[key], country)) is not None
    ]
    build_hashed_pii(records[0][1], records[0][0])  # warm-up: data files, lazy tables

    def engine() -> None:
        for country, identifiers in records:
            build_hashed_pii(identifiers, country)

    def bare() -> None:
        sha256 = hashlib.sha256
        for value in normalized:
            sha256(value).hexdigest()

    engine_s = min(_timed(engine) for _ in range(3))
    bare_s = min(_timed(bare) for _ in range(3))
    print(f"compiled (mypyc):      {'yes' if runtime.compiled() else 'no'}")
    print(f"records:               {len(records):,} (countries {' '.join(PLACES)})")
    print(f"hashed values:         {len(normalized):,}")
    print(f"engine:                {len(records) / engine_s:,.0f} records/s (one core)")
    print(f"bare hashlib.sha256:   {len(records) / bare_s:,.0f} records/s (same values)")
    print(f"engine / bare sha256:  {engine_s / bare_s:.1f}x the time")


if __name__ == "__main__":
    main()
