"""Transform: raw message values -> hashed, encoded records per destination, a chunk at a time.

    decode (canonical / segment) -> route (audience key -> destination) -> hash -> encode

An erase event skips routing: it becomes an `Erase` of the member (every audience is the
caller's to apply it to).

This is where the daemon's CPU goes (Amazon-exact normalization and SHA-256 of every
identifier), and it is pure, so it runs in `[transform] workers` worker processes
(`transform_pool.py` starts them and hands them the chunks): the event loop keeps fetching,
batching, sending and storing while the workers hash. A worker (`serve`) imports this module
and what it needs to transform, nothing of the daemon's.

Raw PII crosses into a worker inside the message bytes and comes back hashed; nothing is logged
or kept there. What routing counts travels back with each chunk (`RouteCounts`) and is
published by the daemon, whose registry is the one `/metrics` serves.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import pickle
import signal
import struct
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, BinaryIO, NamedTuple

from syncd.events import DecodeError, decode
from syncd.model import Action, Destination, Erase, MemberRecord
from syncd.routing import RouteCounts, Router, Unusable, external_user_id
from syncd.runtime import tune_process


class Refused(NamedTuple):
    """An unusable event: its dead-letter reason and a detail naming the field (never data)."""

    reason: str
    detail: str = ""


Outcome = Refused | list[tuple[int, MemberRecord]] | Erase
"""Per message: why it is unusable, (index into `Spec.destinations`, record) per part (none: a
null value, a compacted topic's tombstone, has nothing to do), or the erase of a member.
Records of an identifiers-only event (`identifiers_only`) name every destination."""


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
        tombstones = 0
        for raw in values:
            if raw is None:  # a null value: a compacted topic's deleted key, not an event
                out.append([])
                tombstones += 1
                continue
            try:
                change = decode(raw, spec.input_format, max_bytes=spec.max_bytes)
                if change.erase:
                    out.append(Erase(external_user_id(change.profile_id), change.occurred_at))
                    continue
                parts = route(change)
            except DecodeError as exc:
                out.append(Refused(exc.reason, exc.detail))
                continue
            except Unusable as exc:
                out.append(Refused(exc.reason))
                continue
            out.append([(index[p.destination.audience], p.record) for p in parts])
        counts = self._router.take_counts()
        if tombstones:
            counts.filtered["tombstone"] += tombstones
        return out, counts


# -- the worker process ---------------------------------------------------------------------------
# A worker reads frames from its stdin, the spec first and then one chunk of message values per
# frame, and writes one frame of results per chunk to its stdout, in order, until stdin closes.
# A frame is a pickle behind its length.
FRAME_HEADER = struct.Struct("!Q")
PIPE_BYTES = 1 << 20  # Linux's limit for an unprivileged process (/proc/sys/fs/pipe-max-size)
_PR_SET_PDEATHSIG = 1  # prctl(2)


def frame(obj: object) -> tuple[bytes, bytes]:
    """The header and the body of `obj`'s frame."""
    body = pickle.dumps(obj, pickle.HIGHEST_PROTOCOL)
    return FRAME_HEADER.pack(len(body)), body


def serve() -> None:
    """A transform worker's main: `python -c "from syncd.transform import serve; serve()" PID`,
    where PID is the daemon's. Exits when its stdin closes."""
    daemon_pid = int(sys.argv[1])
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the daemon decides when workers stop
    _die_with(daemon_pid)
    source = sys.stdin.buffer
    sink = os.fdopen(os.dup(1), "wb")  # frames only: anything printed goes to stderr
    os.dup2(2, 1)
    for fd in (source.fileno(), sink.fileno()):
        _widen_pipe(fd)
    spec = _receive(source)
    if not isinstance(spec, Spec):
        raise SystemExit("syncd transform worker: no spec received")
    transform = Transform(spec)
    tune_process()
    try:
        while (values := _receive(source)) is not None:
            for part in frame(_run(transform, values)):
                sink.write(part)
            sink.flush()
    except Exception as exc:  # a bug: say where, never what (the message may quote PII)
        tb = exc.__traceback__
        while tb is not None and tb.tb_next is not None:
            tb = tb.tb_next
        where = f" at {tb.tb_frame.f_code.co_filename}:{tb.tb_lineno}" if tb else ""
        sys.stderr.write(f"syncd transform worker: {type(exc).__name__}{where}\n")
        raise SystemExit(1) from None


def _receive(source: BinaryIO) -> Any:
    """The next frame's object; None once the daemon closed the pipe."""
    header = source.read(FRAME_HEADER.size)
    if len(header) < FRAME_HEADER.size:
        return None
    (size,) = FRAME_HEADER.unpack(header)
    return pickle.loads(source.read(size))


def _widen_pipe(fd: int) -> None:
    """1 MiB instead of 64 KiB: a chunk's results (~1.7 MB) otherwise cross in many rounds, and
    the worker stops at each until the daemon reads (docs/benchmarks.md). Where the fcntl is
    refused (a lower pipe-max-size), the pipe keeps its size."""
    if sys.platform != "linux":
        return
    import fcntl

    with contextlib.suppress(OSError):
        fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, PIPE_BYTES)


def _die_with(daemon_pid: int) -> None:
    """A daemon killed outright (SIGKILL, OOM) cannot stop its workers: have the kernel end this
    worker with it (Linux), rather than leave it idle forever."""
    if sys.platform == "linux":
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != daemon_pid:  # the daemon died before the request took effect
        os._exit(1)


Wire = Refused | list[tuple[int, str, str, bytes, bytes, float | None, bool, str]] | Erase
_ACTIONS = {action.value: action for action in Action}


def _run(transform: Transform, values: list[bytes | None]) -> tuple[list[Wire], RouteCounts]:
    """Records travel back as plain tuples: unpickling them costs the daemon a quarter of what
    dataclass instances cost."""
    outcomes, counts = transform.run(values)
    wire: list[Wire] = [
        o
        if isinstance(o, Refused | Erase)
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


def from_wire(wire: list[Wire]) -> list[Outcome]:
    return [
        w
        if isinstance(w, Refused | Erase)
        else [
            (i, MemberRecord(user, _ACTIONS[action], json, digest, at, only, dead_letter))
            for i, user, action, json, digest, at, only, dead_letter in w
        ]
        for w in wire
    ]
