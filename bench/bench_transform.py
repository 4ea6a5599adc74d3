"""Throughput of the transform stage on one core: decode (canonical JSON -> ProfileChange), route
(ProfileChange -> hashed MemberRecords, `Router.route`) and both, over `syncd.synth` events
(8 identifier fields, mixed countries, non-ASCII names and addresses).

    .venv/bin/python bench/bench_transform.py [--events N] [--seed S]
"""

from __future__ import annotations

import argparse
import platform
import time
from collections.abc import Callable
from pathlib import Path

from syncd import runtime, synth
from syncd.events import decode
from syncd.model import Destination
from syncd.routing import Router

AUDIENCES = ("vip", "lapsed", "newsletter")  # synth.events' default audiences: every event routes
DESTINATIONS = [
    Destination("vip", "5a523424-e8b3-4da5-9a32-24a861aea576", 413642381039213536, "US"),
    Destination("lapsed", "5a523424-e8b3-4da5-9a32-24a861aea576", 347891, "US"),
    Destination("newsletter", "0b7e6f52-3c1d-4b8e-9f0a-8d2c4e6a1b3c", 555, "GB"),
]


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def best_of(repeats: int, work: Callable[[], object]) -> float:
    """The fastest of `repeats` runs of `work`, in seconds of this process's CPU time (steadier
    than wall time on a shared machine; the work is single-threaded and does no I/O)."""
    times = []
    for _ in range(repeats):
        start = time.process_time()
        work()
        times.append(time.process_time() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--events", type=int, default=50_000, help="events to transform")
    parser.add_argument("--seed", type=int, default=1, help="seed of the synthetic data")
    parser.add_argument("--repeats", type=int, default=5, help="runs per stage (best is kept)")
    args = parser.parse_args()

    raws = [
        value
        for _, value in synth.events(
            args.events, seed=args.seed, audiences=AUDIENCES, remove_ratio=0.2
        )
    ]
    router = Router(DESTINATIONS, strict_reference=False)
    changes = [decode(raw, "canonical") for raw in raws]
    records = sum(len(router.route(change)) for change in changes)  # warm-up, and a check

    def decode_all() -> None:
        for raw in raws:
            decode(raw, "canonical")

    def route_all() -> None:
        route = router.route
        for change in changes:
            route(change)

    def both() -> None:
        route = router.route
        for raw in raws:
            route(decode(raw, "canonical"))

    n = len(raws)
    decode_s = best_of(args.repeats, decode_all)
    route_s = best_of(args.repeats, route_all)
    both_s = best_of(args.repeats, both)
    print(
        f"machine:  {cpu_model()}, Python {platform.python_version()}, one core"
        f" (compiled: {'yes' if runtime.compiled() else 'no'})"
    )
    print(f"events:   {n:,} (seed {args.seed}), {records:,} records")
    for name, seconds in (("decode", decode_s), ("route", route_s), ("both", both_s)):
        print(f"{name + ':':9} {n / seconds:10,.0f} events/s  {seconds / n * 1e6:6.1f} us/event")


if __name__ == "__main__":
    main()
