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
import contextlib
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
MAX_FRAME_BYTES = 1 << 30  # a results frame larger than this is corrupt

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
    `submit`, `close` when done (or `async with`)."""

    def __init__(self, spec: Spec, workers: int) -> None:
        self._spec = spec
        self._count = workers
        self._inline = Transform(spec) if workers == 0 else None
        self._workers: list[_Worker] = []
        self._lost: TransformWorkerLost | None = None
        self._closing = False

    async def __aenter__(self) -> Transformer:
        try:
            await self.start()
        except BaseException:  # the workers started before the failure are stopped too
            await self.close()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def start(self) -> None:
        # -P and the daemon's own sys.path: the worker imports the daemon's syncd, never one
        # from its working directory
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
        for _ in range(self._count):
            process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-P",
                "-c",
                WORKER_MAIN,
                str(os.getpid()),
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                env=env,
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
        elif self._lost is not None or self._closing:
            done.set_exception(self._lost or TransformWorkerLost("transform workers closed"))
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
        """Hand each results frame to the chunk it answers, in order, until the worker exits;
        then fail whatever still waits on it."""
        stdout = worker.process.stdout
        assert stdout is not None
        unreadable = ""
        try:
            while True:
                (size,) = FRAME_HEADER.unpack(await stdout.readexactly(FRAME_HEADER.size))
                if size > MAX_FRAME_BYTES:
                    raise ValueError(f"a frame of {size} bytes")
                wire: list[Wire]
                wire, counts = pickle.loads(await stdout.readexactly(size))
                done = worker.waiting.popleft()
                if not done.done():
                    done.set_result((from_wire(wire), counts))
        except asyncio.IncompleteReadError:  # the worker exited
            pass
        except Exception as exc:  # a frame that does not read: end the worker as if it died
            unreadable = f", after a frame that does not read: {type(exc).__name__}"
            with contextlib.suppress(ProcessLookupError):
                worker.process.kill()
            while await stdout.read(PIPE_BYTES):  # to the end: `wait` returns once it is read
                pass
        code = await worker.process.wait()
        if not (self._closing and code == 0 and not unreadable):
            self._lost = self._lost or TransformWorkerLost(
                f"transform worker {worker.process.pid} exited ({_exit_status(code)}{unreadable})"
            )
        while worker.waiting:
            done = worker.waiting.popleft()
            if not done.done():
                done.set_exception(self._lost or TransformWorkerLost("transform workers closed"))

    async def close(self) -> None:
        """Stop the workers: each finishes the chunks it has, then exits (or is killed after
        STOP_TIMEOUT_S)."""
        self._closing = True
        await asyncio.gather(*(self._stop(worker) for worker in self._workers))

    @staticmethod
    async def _stop(worker: _Worker) -> None:
        assert worker.process.stdin is not None
        worker.process.stdin.close()
        try:
            await asyncio.wait_for(worker.process.wait(), STOP_TIMEOUT_S)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                worker.process.kill()
        if worker.reader is not None:
            await worker.reader  # reads to the end, then waits for the exit


def _exit_status(code: int) -> str:
    return f"killed by signal {-code}" if code < 0 else f"exit code {code}"
