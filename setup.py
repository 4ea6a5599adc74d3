"""The transform's hot path compiled to C with mypyc (it type-checks --strict already): less
CPU per event than interpreted (docs/benchmarks.md). Everything else stays pure Python.

SYNCD_PURE_PYTHON=1 installs without compiling (no C compiler needed); so does a build whose
compile step fails, with a warning. Either way the modules behave the same."""

from __future__ import annotations

import os
import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

COMPILED = [
    "syncd/pii/normalize.py",
    "syncd/pii/hashing.py",
    "syncd/pii/phone.py",
    "syncd/events/canonical.py",
    "syncd/routing.py",
]


class OptionalBuildExt(build_ext):
    """Falls back to the pure-Python modules when the C compiler is missing or fails: all of
    them, as a compiled module needs the group's shared library (`syncd__mypyc`)."""

    def run(self) -> None:
        self.force = True  # a compiled module always ends up newer than its source (Makefile)
        try:
            super().run()
        except Exception as exc:  # the compiler's and distutils' errors share no other base
            for built in self.get_outputs():
                if os.path.exists(built):
                    os.remove(built)
            print(f"syncd: not compiled ({exc}); the modules stay pure Python", file=sys.stderr)


def extensions() -> list[Extension]:
    if os.environ.get("SYNCD_PURE_PYTHON"):
        return []
    from mypyc.build import mypycify

    # The build environment has none of syncd's dependencies: their types count as Any here
    # (mypy --strict in `make check` checks them for real).
    try:
        return list(
            mypycify(["--ignore-missing-imports", *COMPILED], group_name="syncd", opt_level="3")
        )
    except (Exception, SystemExit) as exc:  # mypyc exits on a type error of its own
        print(f"syncd: not compiled ({exc!r}); the modules stay pure Python", file=sys.stderr)
        return []


setup(ext_modules=extensions(), cmdclass={"build_ext": OptionalBuildExt})
