"""`syncd hash`: normalize and hash identifiers streamed as JSON lines on stdin.

Input, one object per line: `{"field": "email", "country": "US", "value": "..."}` (`country`
null or absent = no country rules). Output, one line per input line, in order:
`{"normalized": str | null, "sha256": str | null}`; both null = the value is omitted,
`normalized` null with a `sha256` = the value already was a hash. A line that cannot be read
yields `{"error": "..."}` naming the problem (never the value) and the stream goes on; the exit
code is then 1 (0 when every line was read).
"""

from __future__ import annotations

import argparse
import sys
from typing import IO, Any

import orjson

from syncd.pii.hashing import hash_field
from syncd.pii.normalize import FIELDS, normalize_country
from syncd.vocabulary import PII_KEYS

_OMITTED = orjson.dumps({"normalized": None, "sha256": None}) + b"\n"
_FIELD_ERROR = "field must be one of: " + " ".join(PII_KEYS)


class _BadLine(Exception):
    """The line cannot be hashed; the message names the problem and carries no input data."""


def add_parser(sub: argparse._SubParsersAction[Any]) -> None:
    parser = sub.add_parser(
        "hash",
        help="normalize and SHA-256 identifiers read as JSON lines on stdin",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--strict-reference",
        action="store_true",
        help="apply the AWS reference behaviour (docs/normalization.md D2..D8 off; D1 stays)",
    )
    parser.set_defaults(func=_command)


def _command(args: argparse.Namespace) -> int:
    return run(sys.stdin.buffer, sys.stdout.buffer, strict_reference=args.strict_reference)


def run(source: IO[bytes], sink: IO[bytes], *, strict_reference: bool = False) -> int:
    """Answer every line of `source` on `sink`, flushing each answer. 1 if any line was bad."""
    code = 0
    for line in source:
        try:
            answer = _answer(line, strict_reference)
        except _BadLine as exc:
            answer = orjson.dumps({"error": str(exc)}) + b"\n"
            code = 1
        sink.write(answer)
        sink.flush()
    return code


def _answer(line: bytes, strict_reference: bool) -> bytes:
    try:
        request = orjson.loads(line)
    except orjson.JSONDecodeError:
        raise _BadLine("line is not valid UTF-8 JSON") from None
    if not isinstance(request, dict):
        raise _BadLine("line is not a JSON object")
    field = request.get("field")
    if not isinstance(field, str) or field not in FIELDS:  # a list or an object: unhashable
        raise _BadLine(_FIELD_ERROR)
    country = request.get("country")
    if isinstance(country, str) and not country.strip():
        country = None  # blank: no country, as in an event
    if country is not None:
        if not isinstance(country, str):
            raise _BadLine("country must be a string or null")
        country = normalize_country(country)
        if country is None:
            raise _BadLine("country is not an ISO 3166-1 alpha-2 code")
    value = request.get("value")
    if value is None:
        return _OMITTED
    if not isinstance(value, str):
        raise _BadLine("value must be a string or null")
    result = hash_field(field, value, country, strict_reference=strict_reference)
    if result is None:
        return _OMITTED
    normalized, digest = result
    # A normalized value never equals its own SHA-256: equality means the input was a hash.
    shown = None if normalized == digest else normalized
    return orjson.dumps({"normalized": shown, "sha256": digest}) + b"\n"
