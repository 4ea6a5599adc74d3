"""The transform's worker processes (`[transform] workers`): the daemon's side of them.

Each worker is a plain child process (`syncd.transform.serve`) with a pipe each way; nothing of
multiprocessing, so no resource-tracker process beside it. A chunk goes to the worker with the
fewest chunks outstanding, and `submit`'s results come back in submission order per worker;
callers await them in the order they submitted. `workers = 0` runs the transform inline, on the
event loop.

A worker that exits while the daemon runs (OOM-killed, say) breaks the pool for good: its chunks
and every later one fail with `TransformWorkerLost`, the daemon stops with exit code 1, and its
orchestrator restarts it; what was not recorded is read again from Kafka.
"""

from __future__ import annotations

import asyncio
import os
import pickle
import sys
from collections import deque
from collections.abc import Awaitable
from dataclasses import dataclass, field

from syncd.routing import RouteCounts
from syncd.transform import (
    FRAME_HEADER,
    PIPE_BYTES,
    Outcome,
    Spec,
    Transform,
    Wire,
    frame,
    from_wire,
)

WORKER_MAIN = "from syncd.transform import serve; serve()"
STOP_TIMEOUT_S = 10.0  # a worker still running this long after its stdin closed is killed

Result = tuple[list[Outcome], RouteCounts]


class TransformWorkerLost(RuntimeError):
    """A transform worker exited while the daemon ran."""


@dataclass
class _Worker:
    process: asyncio.subprocess.Process
    waiting: deque[asyncio.Future[Result]] = field(default_factory=deque)
    reader: asyncio.Task[None] | None = None


class Transformer:
    """Runs `Transform` on `workers` processes (or inline for 0). `start` before the first
    `submit`; `close` when done."""

    def __init__(self, spec: Spec, workers: int) -> None:
        self._spec = spec
        self._count = workers
        self._inline = Transform(spec) if workers == 0 else None
        self._workers: list[_Worker] = []
        self._lost: TransformWorkerLost | None = None
        self._closing = False

    async def start(self) -> None:
        for _ in range(self._count):
            process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-c",
                WORKER_MAIN,
                str(os.getpid()),
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                limit=PIPE_BYTES,
            )
            worker = _Worker(process)
            self._workers.append(worker)
            self._send(worker, self._spec)
            worker.reader = asyncio.create_task(self._read(worker), name="transform-results")

    def submit(self, values: list[bytes | None]) -> Awaitable[Result]:
        """Start transforming `values`; await the result (in submission order, if you like)."""
        done: asyncio.Future[Result] = asyncio.get_running_loop().create_future()
        if self._inline is not None:
            done.set_result(self._inline.run(values))
        elif self._lost is not None:
            done.set_exception(self._lost)
        else:
            worker = min(self._workers, key=lambda w: len(w.waiting))
            worker.waiting.append(done)
            self._send(worker, values)
        return done

    @staticmethod
    def _send(worker: _Worker, obj: object) -> None:
        stdin = worker.process.stdin
        assert stdin is not None
        for part in frame(obj):
            stdin.write(part)  # buffered by the transport while the pipe is full

    async def _read(self, worker: _Worker) -> None:
        stdout = worker.process.stdout
        assert stdout is not None
        unreadable = ""
        try:
            while True:
                (size,) = FRAME_HEADER.unpack(await stdout.readexactly(FRAME_HEADER.size))
                wire: list[Wire]
                wire, counts = pickle.loads(await stdout.readexactly(size))
                done = worker.waiting.popleft()
                if not done.done():
                    done.set_result((from_wire(wire), counts))
        except asyncio.IncompleteReadError:  # the worker exited
            pass
        except Exception as exc:  # a frame that does not read: end the worker as if it died
            unreadable = f", after a frame that does not read: {type(exc).__name__}"
            worker.process.kill()
        code = await worker.process.wait()
        if self._closing and code == 0:
            return
        self._lost = self._lost or TransformWorkerLost(
            f"transform worker {worker.process.pid} exited ({_exit_status(code)}{unreadable})"
        )
        while worker.waiting:
            done = worker.waiting.popleft()
            if not done.done():
                done.set_exception(self._lost)

    async def close(self) -> None:
        """Stop the workers: each finishes the chunks it has, then exits."""
        self._closing = True
        for worker in self._workers:
            assert worker.process.stdin is not None
            worker.process.stdin.close()
        for worker in self._workers:
            try:
                await asyncio.wait_for(worker.process.wait(), STOP_TIMEOUT_S)
            except TimeoutError:
                worker.process.kill()
                await worker.process.wait()
            if worker.reader is not None:
                await worker.reader


def _exit_status(code: int) -> str:
    return f"killed by signal {-code}" if code < 0 else f"exit code {code}"
