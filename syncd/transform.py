"""Transform: raw message values -> hashed, encoded records per destination, a chunk at a time.

    decode (canonical / segment) -> route (audience key -> destination) -> hash -> encode

An erase event skips routing: it becomes an `Erase` of the member (every audience is the
caller's to apply it to).

This is where the daemon's CPU goes (Amazon-exact normalization and SHA-256 of every
identifier), and it is pure, so it runs in `[transform] workers` worker processes: the event
loop keeps fetching, batching, sending and storing while the workers hash. `workers = 0` runs it
inline, on the event loop. Chunks come back in the order they were submitted.

Raw PII crosses into a worker inside the message bytes and comes back hashed; nothing is logged
or kept there. What routing counts travels back with each chunk (`RouteCounts`) and is
published by the daemon, whose registry is the one `/metrics` serves.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import multiprocessing
import os
import signal
import sys
from collections.abc import Awaitable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

from syncd.events import DecodeError, decode
from syncd.model import Action, Destination, Erase, MemberRecord
from syncd.routing import RouteCounts, Router, Unusable, external_user_id
from syncd.runtime import tune_process

Outcome = str | list[tuple[int, MemberRecord]] | Erase
"""Per message: a dead-letter reason, (index into `Spec.destinations`, record) per part, or the
erase of a member. Records of an identifiers-only event (`identifiers_only`) name every
destination."""


@dataclass(frozen=True, slots=True)
class Spec:
    """Everything a worker needs to transform (picklable)."""

    destinations: tuple[Destination, ...]
    input_format: str
    max_bytes: int
    strict_reference: bool


class Transform:
    """The pure function, with its tables built once."""

    def __init__(self, spec: Spec) -> None:
        self._spec = spec
        self._router = Router(spec.destinations, strict_reference=spec.strict_reference)
        self._index = {d.audience: i for i, d in enumerate(spec.destinations)}

    def run(self, values: Sequence[bytes | None]) -> tuple[list[Outcome], RouteCounts]:
        spec, route, index = self._spec, self._router.route, self._index
        out: list[Outcome] = []
        for raw in values:
            try:
                change = decode(raw or b"", spec.input_format, max_bytes=spec.max_bytes)
                if change.erase:
                    out.append(Erase(external_user_id(change.profile_id), change.occurred_at))
                    continue
                parts = route(change)
            except (DecodeError, Unusable) as exc:
                out.append(exc.reason)
                continue
            out.append([(index[p.destination.audience], p.record) for p in parts])
        return out, self._router.take_counts()


_worker: Transform | None = None
_PR_SET_PDEATHSIG = 1  # prctl(2)


def _start_worker(spec: Spec, daemon_pid: int) -> None:
    global _worker
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the daemon decides when workers stop
    _die_with(daemon_pid)
    tune_process()
    _worker = Transform(spec)


def _die_with(daemon_pid: int) -> None:
    """A daemon killed outright (SIGKILL, OOM) cannot stop its pool: have the kernel end this
    worker with it (Linux), rather than leave it idle forever."""
    if sys.platform == "linux":
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != daemon_pid:  # the daemon died before the request took effect
        os._exit(1)


_Wire = str | list[tuple[int, str, str, bytes, bytes, float | None, bool, str]] | Erase
_ACTIONS = {action.value: action for action in Action}


def _run_in_worker(values: list[bytes | None]) -> tuple[list[_Wire], RouteCounts]:
    """Records travel back as plain tuples: unpickling them costs the daemon a quarter of what
    dataclass instances cost (its threads that unpickle hold the event loop's GIL)."""
    assert _worker is not None, "worker not initialised"
    outcomes, counts = _worker.run(values)
    wire: list[_Wire] = [
        o
        if isinstance(o, str | Erase)
        else [
            (
                i,
                r.external_user_id,
                r.action.value,
                r.json,
                r.digest,
                r.occurred_at,
                r.identifiers_only,
                r.dead_letter,
            )
            for i, r in o
        ]
        for o in outcomes
    ]
    return wire, counts


def _from_wire(wire: list[_Wire]) -> list[Outcome]:
    return [
        w
        if isinstance(w, str | Erase)
        else [
            (i, MemberRecord(user, _ACTIONS[action], json, digest, at, only, dead_letter))
            for i, user, action, json, digest, at, only, dead_letter in w
        ]
        for w in wire
    ]


PIPE_BYTES = 1 << 20  # Linux's limit for an unprivileged process (/proc/sys/fs/pipe-max-size)


def _widen_pipes(pool: ProcessPoolExecutor) -> None:
    """Give the pool's two pipes 1 MiB instead of 64 KiB. A chunk's results otherwise cross in
    many rounds, and the worker stops at each until the daemon's reader thread gets the CPU and
    the GIL (docs/benchmarks.md). The queues are the executor's private attributes: where they
    or the fcntl are not there, nothing changes."""
    if sys.platform != "linux":
        return
    import fcntl

    for queue in (getattr(pool, "_call_queue", None), getattr(pool, "_result_queue", None)):
        reader = getattr(queue, "_reader", None)
        if reader is not None:
            with contextlib.suppress(OSError):  # a lower pipe-max-size: keep the default
                fcntl.fcntl(reader.fileno(), fcntl.F_SETPIPE_SZ, PIPE_BYTES)


class Transformer:
    """Runs `Transform` on `workers` processes (or inline for 0); `submit` keeps the order."""

    def __init__(self, spec: Spec, workers: int) -> None:
        self._inline = Transform(spec) if workers == 0 else None
        self._pool = (
            ProcessPoolExecutor(
                max_workers=workers,
                mp_context=multiprocessing.get_context("spawn"),  # no fork of a threaded loop
                initializer=_start_worker,
                initargs=(spec, os.getpid()),
            )
            if workers
            else None
        )
        if self._pool is not None:
            _widen_pipes(self._pool)

    def submit(self, values: list[bytes | None]) -> Awaitable[tuple[list[Outcome], RouteCounts]]:
        """Start transforming `values`; await the result (in submission order, if you like)."""
        if self._pool is None:
            assert self._inline is not None
            done: asyncio.Future[tuple[list[Outcome], RouteCounts]] = (
                asyncio.get_running_loop().create_future()
            )
            done.set_result(self._inline.run(values))
            return done
        return asyncio.ensure_future(
            self._from_pool(
                asyncio.get_running_loop().run_in_executor(self._pool, _run_in_worker, values)
            )
        )

    @staticmethod
    async def _from_pool(
        future: asyncio.Future[tuple[list[_Wire], RouteCounts]],
    ) -> tuple[list[Outcome], RouteCounts]:
        wire, counts = await future
        return _from_wire(wire), counts

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
