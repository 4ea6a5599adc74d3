"""The `syncd` command line. Each stage module owns its subcommand: it registers a parser with
`add_parser(subparsers)` and sets `func(args) -> int`. Exit codes: 0 ok, 2 config/usage, 1 else.
"""

from __future__ import annotations

import argparse
import importlib
import os
import select
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

from syncd.errors import ConfigError, SchemaOutdatedError, SyncdError, UsageError
from syncd.observability.logging import for_commands as logs_for_commands

if TYPE_CHECKING:
    from rich.console import Console

# Modules that contribute subcommands, in the order `syncd --help` lists them.
COMMAND_MODULES = (
    "syncd.commands",  # run, check-config
    "syncd.demo",  # demo
    "syncd.sandbox.server",  # sandbox
    "syncd.pii.stream",  # hash
    "syncd.store.commands",  # jobs, db upgrade
    "syncd.amazon.onboarding",  # terms, connections, audiences (status: syncd.operate)
    "syncd.operate",  # members
    "syncd.reconcile",  # reconcile
)


def data_console(*, stderr: bool = False) -> Console:
    """A console for tables of stored data (profile ids, audience keys, Amazon's reasons): their
    text is shown as it is, never read as rich markup (`[/b]` raised) or emoji codes."""
    from rich.console import Console

    return Console(stderr=stderr, markup=False, emoji=False)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{self.prog}: {message}")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="syncd", description=__doc__.splitlines()[0] if __doc__ else None)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for name in COMMAND_MODULES:
        importlib.import_module(name).add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    logs_for_commands()  # `syncd run` and `syncd demo` configure their own
    try:
        args = build_parser().parse_args(argv)
        code: int = args.func(args)
        return code
    except UsageError as exc:
        print(f"syncd: usage error: {exc}", file=sys.stderr)
        return 2
    except ConfigError as exc:
        print(f"syncd: {exc}", file=sys.stderr)
        return 2
    except SchemaOutdatedError as exc:
        print(f"syncd: {exc}", file=sys.stderr)
        return 1
    except SyncdError as exc:
        print(f"syncd: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        if not _stdout_closed():
            raise
        # stdout's reader went away (`syncd hash < big | head -1`): stop quietly, as a pipeline
        # expects; stdout goes to /dev/null so that the interpreter's last flush is quiet too
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


def _stdout_closed() -> bool:
    """Whether stdout is a pipe whose reader has gone (not a socket of the command's own)."""
    try:
        poll = select.poll()
        poll.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & select.POLLERR for _, events in poll.poll(0))
    except (OSError, ValueError):
        return False
