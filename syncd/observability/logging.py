"""Logs: structlog JSON on stdout for the daemon (`syncd run`); for every other command,
warnings as plain lines on stderr, so that stdout holds only the command's output (JSON for
scripts). Log ids, counts, offsets: never identifiers or their hashes. Whatever a line carries
(an exception's text, say) comes out with URL secrets masked and PostgreSQL's DETAIL line (the
values of the row at fault) hidden."""

from __future__ import annotations

import logging
import re
import sys

import structlog
from structlog.typing import EventDict, WrappedLogger

from syncd.config import mask_urls

# PostgreSQL's DETAIL line, up to its end (a newline, or an escaped one in a repr)
_DB_DETAIL = re.compile(r"DETAIL:(?:(?!\\n)[^\n])*")

_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}


def configure(level: str = "info", *, json: bool = True, stderr: bool = False) -> None:
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            _mask_secrets,
            structlog.processors.JSONRenderer()
            if json
            else structlog.dev.ConsoleRenderer(colors=False),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        # the stream is looked up at each line: a replaced sys.stdout/err (a test's capture)
        # is followed, never written to after it was closed
        logger_factory=lambda *_: structlog.PrintLogger(sys.stderr if stderr else sys.stdout),
        cache_logger_on_first_use=False,
    )


def for_commands() -> None:
    """The default of every command but `syncd run`: warnings, plain, on stderr."""
    configure("warning", json=False, stderr=True)


def _mask_secrets(_logger: WrappedLogger, _method: str, event: EventDict) -> EventDict:
    """A store URL's password, or a failing row's values, may turn up in any value (an
    exception's text, say): mask them."""
    return {key: _masked(value) for key, value in event.items()}


def _masked(value: object) -> object:
    if isinstance(value, str):
        return _DB_DETAIL.sub("DETAIL: [hidden]", mask_urls(value))
    if isinstance(value, dict):
        return {k: _masked(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_masked(v) for v in value]
    return value


def get_logger(name: str) -> structlog.stdlib.BoundLogger:
    logger: structlog.stdlib.BoundLogger = structlog.get_logger(name)
    return logger
