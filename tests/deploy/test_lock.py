"""deploy/requirements.lock (runtime) and deploy/build-requirements.lock (build backend), made
by `make lock` (pip-compile --generate-hashes from pyproject.toml): the image installs exactly
these files. A lock older than pyproject.toml fails here."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
RUNTIME = ROOT / "deploy" / "requirements.lock"
BUILD = ROOT / "deploy" / "build-requirements.lock"
DIRECT = re.compile(r"#\s+(via\s+)?syncd \(pyproject\.toml(::build-system\.requires)?\)")
ENTRY = re.compile(r"^([A-Za-z0-9._-]+)==(\S+) \\$", re.M)


def pins(lock: Path) -> dict[str, str]:
    return {canonicalize_name(n): v for n, v in ENTRY.findall(lock.read_text())}


def direct(lock: Path) -> set[str]:
    """Entries pip-compile marks as asked for by pyproject.toml itself."""
    out: set[str] = set()
    for block in re.split(r"\n(?=[A-Za-z0-9])", lock.read_text()):
        match = ENTRY.match(block)
        if match and DIRECT.search(block):
            out.add(canonicalize_name(match[1]))
    return out


@pytest.mark.parametrize(
    ("lock", "requirements"),
    [
        (RUNTIME, PYPROJECT["project"]["dependencies"]),
        (BUILD, PYPROJECT["build-system"]["requires"]),
    ],
    ids=["runtime", "build"],
)
def test_lock_holds_exactly_what_pyproject_asks_for(lock: Path, requirements: list[str]) -> None:
    wanted = {canonicalize_name(Requirement(r).name): Requirement(r) for r in requirements}
    locked = pins(lock)
    assert direct(lock) == set(wanted), "stale lock: run `make lock`"
    for name, requirement in wanted.items():
        assert requirement.specifier.contains(locked[name], prereleases=True), (
            f"{name}=={locked[name]} does not satisfy {requirement}: run `make lock`"
        )


@pytest.mark.parametrize("lock", [RUNTIME, BUILD], ids=["runtime", "build"])
def test_every_locked_file_is_pinned_with_hashes(lock: Path) -> None:
    text = lock.read_text()
    blocks = [b for b in re.split(r"\n(?=[A-Za-z0-9])", text) if ENTRY.match(b)]
    assert len(blocks) == len(pins(lock)) > 0
    for block in blocks:
        assert re.search(r"--hash=sha256:[0-9a-f]{64}", block), block.splitlines()[0]
    # nothing that points pip elsewhere or loosens a pin
    assert not re.search(r"^(-i|--index-url|--extra-index-url|-f|--find-links|-e)\b", text, re.M)


def test_the_runtime_lock_holds_no_development_tool() -> None:
    dev = {
        canonicalize_name(Requirement(r).name)
        for r in PYPROJECT["project"]["optional-dependencies"]["dev"]
    }
    assert not dev & set(pins(RUNTIME))
