"""Process-wide tuning shared by syncd's processes: the daemon, its transform workers, the demo
and the sandbox."""

from __future__ import annotations

import gc
import sys
from pathlib import Path

# The daemon's event loop shares the GIL with aiosqlite's thread, which runs the store's
# statements. A thread that wants the GIL while the loop runs Python code waits for the switch
# interval (5 ms by default); a shorter one keeps it moving (docs/benchmarks.md).
DAEMON_SWITCH_INTERVAL_S = 0.0005


def tune_process(*, daemon: bool = False) -> None:
    """Call once at start-up, after the imports, in every process that handles events.

    Each event (each record, in the sandbox) allocates dozens of short-lived objects, nearly
    all freed by reference counting; at CPython's default thresholds (a collection every 700
    allocations) the cycle collector still takes a sizeable share of the CPU
    (docs/benchmarks.md). So collect young objects less often, yet still run a full collection
    every ~10M allocations so that cyclic garbage cannot pile up over a long run. `freeze`
    exempts the objects of start-up (modules, config) from every later collection.

    `daemon`: the process runs the daemon's event loop (see DAEMON_SWITCH_INTERVAL_S)."""
    gc.freeze()
    gc.set_threshold(50_000, 20, 10)
    if daemon:
        sys.setswitchinterval(DAEMON_SWITCH_INTERVAL_S)


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
