"""`syncd hash`, run as the installed console script."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.vectors import VECTORS

pytestmark = pytest.mark.integration

SYNCD = Path(sys.executable).parent / "syncd"


def run_hash(stdin: bytes, *args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [str(SYNCD), "hash", *args], input=stdin, capture_output=True, timeout=60, check=False
    )


def lines(output: bytes) -> list[dict[str, Any]]:
    return [json.loads(line) for line in output.decode().splitlines()]


def test_every_public_vector() -> None:
    stdin = "".join(
        json.dumps({"field": v["field"], "country": v["country"], "value": v["input"]}) + "\n"
        for v in VECTORS
    ).encode()
    done = run_hash(stdin)
    assert done.returncode == 0, done.stderr
    assert lines(done.stdout) == [
        {"normalized": v["normalized"], "sha256": v["sha256"]} for v in VECTORS
    ]


def test_bad_lines_are_answered_in_place_without_the_value() -> None:
    secret = "jane.secret@example.com"
    stdin = b"\n".join(
        [
            json.dumps({"field": "email", "value": secret}).encode(),  # country absent
            b"{not json",
            json.dumps([secret]).encode(),
            json.dumps({"field": "ssn", "value": secret}).encode(),
            json.dumps({"field": "email", "country": "XX", "value": secret}).encode(),
            json.dumps({"field": "email", "value": 42}).encode(),
            json.dumps({"field": "email", "country": None, "value": None}).encode(),
            b"",
            b"\xff\xfe",
            json.dumps({"field": "postal", "country": "uk", "value": "sw1a 1aa"}).encode(),
        ]
    )
    done = run_hash(stdin + b"\n")
    assert done.returncode == 1
    answers = lines(done.stdout)
    assert len(answers) == 10
    assert secret.encode() not in done.stderr
    assert all(secret not in json.dumps(answer) for answer in answers[1:])
    assert answers[0]["normalized"] == secret
    errors = [a.get("error") for a in answers]
    assert errors[1] == errors[7] == errors[8] == "line is not valid UTF-8 JSON"
    assert errors[2] == "line is not a JSON object"
    assert (
        errors[3]
        == "field must be one of: email phone firstname lastname address city state postal"
    )
    assert errors[4] == "country is not an ISO 3166-1 alpha-2 code"
    assert errors[5] == "value must be a string or null"
    assert answers[6] == {"normalized": None, "sha256": None}
    assert answers[9]["normalized"] == "SW1A1AA"


def test_a_field_or_country_of_any_json_type_is_a_bad_line_not_a_crash() -> None:
    """A list or an object where a name is expected (unhashable: `in FIELDS` raised) is an
    error line, and the lines after it are answered."""
    stdin = b"".join(
        json.dumps(doc).encode() + b"\n"
        for doc in (
            {"field": ["email"], "value": "a@example.com"},
            {"field": {"email": 1}, "value": "a@example.com"},
            {"field": "email", "country": ["US"], "value": "a@example.com"},
            {"field": "city", "value": "Oslo"},
        )
    )
    done = run_hash(stdin)
    assert done.returncode == 1
    assert b"Traceback" not in done.stderr
    errors = [a.get("error") for a in lines(done.stdout)]
    field_error = "field must be one of: email phone firstname lastname address city state postal"
    assert errors[0] == errors[1] == field_error
    assert errors[2] == "country must be a string or null"
    assert errors[3] is None


def test_a_reader_that_stops_reading_ends_it_quietly() -> None:
    """`syncd hash < big | head -1`: once stdout's reader is gone, it stops without a
    traceback (a BrokenPipeError was one), exit 1."""
    line = json.dumps({"field": "city", "value": "Oslo"}).encode() + b"\n"
    with subprocess.Popen(
        [str(SYNCD), "hash"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    ) as proc:
        assert proc.stdin is not None
        assert proc.stdout is not None
        assert proc.stderr is not None
        proc.stdin.write(line)
        proc.stdin.flush()
        assert json.loads(proc.stdout.readline())["normalized"] == "oslo"
        proc.stdout.close()  # as head does after its line
        try:
            proc.stdin.write(line * 1000)
            proc.stdin.close()
        except BrokenPipeError:
            pass  # it stopped reading: what the test wants
        assert proc.wait(timeout=60) == 1
        assert proc.stderr.read() == b""


def test_a_blank_country_is_an_absent_one() -> None:
    """As in an event: a country that is empty or blank is no country."""
    stdin = b"".join(
        json.dumps({"field": "phone", "value": "206-266-1000", **extra}).encode() + b"\n"
        for extra in ({}, {"country": None}, {"country": ""}, {"country": "  "})
    )
    done = run_hash(stdin)
    assert done.returncode == 0, done.stdout
    answers = lines(done.stdout)
    assert answers[1:] == answers[:1] * 3


@pytest.mark.parametrize(
    ("country", "state", "default", "strict"),
    [
        ("CA", "Québec", "qc", "qu"),  # D5: accent folding
        ("DE", "Baden-Württemberg", "bw", "ba"),  # D5: the six letter replacements
    ],
)
def test_strict_reference_flag(country: str, state: str, default: str, strict: str) -> None:
    stdin = json.dumps({"field": "state", "country": country, "value": state}).encode() + b"\n"
    by_default = run_hash(stdin)
    by_reference = run_hash(stdin, "--strict-reference")
    assert by_default.returncode == by_reference.returncode == 0
    assert lines(by_default.stdout)[0]["normalized"] == default
    assert lines(by_reference.stdout)[0]["normalized"] == strict


def test_answers_stream_line_by_line() -> None:
    """Each answer is written before the next line is read: usable as a co-process."""
    with subprocess.Popen(
        [str(SYNCD), "hash"], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    ) as proc:
        assert proc.stdin is not None
        assert proc.stdout is not None
        for city in ("Oslo", "Bergen"):
            proc.stdin.write(json.dumps({"field": "city", "value": city}).encode() + b"\n")
            proc.stdin.flush()
            assert json.loads(proc.stdout.readline())["normalized"] == city.lower()
        proc.stdin.close()
        assert proc.wait(timeout=60) == 0


def test_unknown_flag_is_a_usage_error() -> None:
    done = run_hash(b"", "--no-such-flag")
    assert done.returncode == 2
    assert b"--no-such-flag" in done.stderr
