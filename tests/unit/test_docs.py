"""The README is the front door: its metrics table lists every metric syncd exports."""

from __future__ import annotations

import re
from pathlib import Path

from syncd.observability.metrics import REGISTRY

README = Path(__file__).resolve().parents[2] / "README.md"


def exported_names() -> set[str]:
    return {m.name + ("_total" if m.type == "counter" else "") for m in REGISTRY.collect()}


def test_readme_metrics_table_lists_exactly_the_exported_metrics() -> None:
    table = set(re.findall(r"^\| `(syncd_[a-z_]+)` \|", README.read_text(), flags=re.M))
    assert table == exported_names()
