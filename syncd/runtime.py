"""Process-wide tuning shared by syncd's processes: the daemon, its transform workers, the demo
and the sandbox."""

from __future__ import annotations

import gc
from pathlib import Path


def tune_process() -> None:
    """Call once at start-up, after the imports, in every process that handles events.

    Each event (each record, in the sandbox) allocates dozens of short-lived objects; with
    CPython's default thresholds (a collection every 700 allocations) the cycle collector took
    6.1 s of a 34 s run of bench/bench_e2e.py. Reference counting frees nearly all of them, so
    collect young objects less often (0.9 s in the same run), yet still run a full collection
    every ~10M allocations so that cyclic garbage cannot pile up over a long run. `freeze`
    exempts the objects of start-up (modules, config) from every later collection."""
    gc.freeze()
    gc.set_threshold(50_000, 20, 10)


def compiled() -> bool:
    """Whether the transform's hot modules run compiled by mypyc (setup.py) or interpreted."""
    from syncd import routing

    return not routing.__file__.endswith(".py")


def stale_compiled_modules() -> list[str]:
    """Sources newer than their compiled module beside them (an editable install): Python
    would import the old compiled code. `make` rebuilds then; a test session refuses to run."""
    package = Path(__file__).resolve().parent
    return [
        str(source.relative_to(package.parent))
        for built in package.rglob("*.so")
        if (source := built.with_name(built.name.split(".")[0] + ".py")).exists()
        and source.stat().st_mtime > built.stat().st_mtime
    ]
