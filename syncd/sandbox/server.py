"""Running the sandbox: `running_sandbox` (in-process, for tests and the demo) and the
`syncd sandbox` subcommand (a standalone server until SIGTERM/SIGINT).

Every `SandboxSettings` field is a flag: `--job-delay-s 0.5`, `--rate-per-s 1000`,
`--reject-over-budget`, `--no-ledger`, `--seed 7`, ...
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import signal
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from syncd.amazon.api import TOKEN_PATH
from syncd.errors import ListenError, SyncdError
from syncd.observability.http import listen
from syncd.runtime import tune_process
from syncd.sandbox.app import SANDBOX_STATE, create_app
from syncd.sandbox.state import SandboxSettings, SandboxState

SHUTDOWN_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class RunningSandbox:
    url: str  # API base URL, e.g. http://127.0.0.1:41234
    token_url: str  # LwA token URL on the same server
    state: SandboxState


@contextlib.asynccontextmanager
async def running_sandbox(
    settings: SandboxSettings | None = None,
    host: str = "127.0.0.1",
    port: int = 0,
    clock: Callable[[], float] = time.time,
) -> AsyncIterator[RunningSandbox]:
    """Serve a sandbox on host:port (0 = a free port) for the duration of the block; `clock`
    is its wall clock (tests move a fake one to expire members without sleeping)."""
    app = create_app(settings, clock)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=SHUTDOWN_TIMEOUT_S)
    await runner.setup()
    try:
        await listen(runner, host, port)
        bound_port = runner.addresses[0][1]
        url = f"http://{f'[{host}]' if ':' in host else host}:{bound_port}"
        yield RunningSandbox(url=url, token_url=url + TOKEN_PATH, state=app[SANDBOX_STATE])
    finally:
        await runner.cleanup()


# -- command line ------------------------------------------------------------------------------

_TYPES: dict[str, Callable[[str], Any]] = {
    "str": str,
    "int": int,
    "float": float,
    "int | None": int,
}


def _port(text: str) -> int:
    if not (text.isascii() and text.isdigit() and int(text) <= 65535):
        raise argparse.ArgumentTypeError(f"must be a port, 0..65535, got {text!r}")
    return int(text)


def add_parser(sub: Any) -> None:
    parser = sub.add_parser(
        "sandbox",
        help="run the local Amazon Ads audiences API emulator",
        description="A strict local emulator of the Amazon Ads Advertiser audiences API.",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=_port, default=8080, help="port to bind (0: a free port)")
    for f in dataclasses.fields(SandboxSettings):
        help_text = f.metadata.get("help", "")
        if f.type == "bool":
            name = f.metadata.get("flag", f.name).replace("_", "-")
            if f.default:
                parser.add_argument(
                    f"--no-{name}", dest=f.name, action="store_false", help=f"do not {help_text}"
                )
            else:
                parser.add_argument(f"--{name}", dest=f.name, action="store_true", help=help_text)
            continue
        parser.add_argument(
            f"--{f.name.replace('_', '-')}",
            dest=f.name,
            type=_TYPES[str(f.type)],
            default=f.default,
            help=f"{help_text} (default {f.default})",
        )
    parser.set_defaults(func=run)


def settings_from_args(args: argparse.Namespace) -> SandboxSettings:
    return SandboxSettings(
        **{f.name: getattr(args, f.name) for f in dataclasses.fields(SandboxSettings)}
    )


def run(args: argparse.Namespace) -> int:
    """`syncd sandbox`: serve until SIGTERM or SIGINT, then exit 0."""
    tune_process()
    try:
        asyncio.run(serve(settings_from_args(args), args.host, args.port))
    except ListenError as exc:
        raise SyncdError(f"--port {args.port}: {exc}") from None
    return 0


async def serve(settings: SandboxSettings, host: str, port: int) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    async with running_sandbox(settings, host, port) as sandbox:
        print(f"sandbox listening on {sandbox.url}", flush=True)
        await stop.wait()
