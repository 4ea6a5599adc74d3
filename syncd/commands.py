"""`syncd run` (the daemon, until SIGTERM or SIGINT) and `syncd check-config` (the effective
config; with --online, the start-up checks against Amazon). The daemon itself is syncd/app.py."""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from collections.abc import Callable
from typing import Any

import orjson

from syncd import config as config_mod
from syncd.amazon.client import AmazonClient
from syncd.app import Daemon
from syncd.config import Config
from syncd.observability.logging import configure as configure_logging
from syncd.preflight import AmazonUnreachableError, Finding, check_client_config, check_online
from syncd.runtime import tune_process


def add_parser(sub: Any) -> None:
    run = sub.add_parser("run", help="run the daemon")
    run.add_argument("--config", required=True, help="TOML config file")
    run.set_defaults(func=_cmd_run)
    check = sub.add_parser("check-config", help="validate and print the effective config")
    check.add_argument("--config", required=True, help="TOML config file")
    check.add_argument(
        "--online",
        action="store_true",
        help="also check credentials, terms, connections and audiences against Amazon",
    )
    check.set_defaults(func=_cmd_check_config)


def _cmd_check_config(args: argparse.Namespace) -> int:
    cfg = config_mod.load(args.config)
    config_mod.require_credentials(cfg)  # what `syncd run` refuses to start without
    config_mod.require_destinations(cfg)
    sys.stdout.write(orjson.dumps(config_mod.masked(cfg), option=orjson.OPT_INDENT_2).decode())
    sys.stdout.write("\n")
    return asyncio.run(_check_online(cfg)) if args.online else 0


async def _check_online(cfg: Config) -> int:
    """Report each online check on stderr; 2 naming the first failed item, 1 unreachable."""
    first_failure: Finding | None = None
    async with AmazonClient(check_client_config(cfg.amazon)) as client:
        try:
            async for finding in check_online(cfg, client):
                print(
                    f"{'ok  ' if finding.ok else 'FAIL'} {finding.item}: {finding.detail}",
                    file=sys.stderr,
                )
                if not finding.ok and first_failure is None:
                    first_failure = finding
        except AmazonUnreachableError as exc:
            print(f"syncd: amazon could not be checked: {exc}", file=sys.stderr)
            return 1
    if first_failure is not None:
        print(
            f"syncd: check-config --online: {first_failure.item}: {first_failure.detail}",
            file=sys.stderr,
        )
        return 2
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    cfg = config_mod.load(args.config)
    configure_logging(cfg.log.level)
    tune_process(daemon=True)
    return asyncio.run(run_until_signalled(cfg))


async def run_until_signalled(
    cfg: Config, on_started: Callable[[Daemon], None] | None = None
) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    daemon = Daemon(cfg)
    if on_started is not None:
        on_started(daemon)
    return await daemon.run(stop)
