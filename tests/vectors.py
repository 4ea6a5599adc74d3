"""The public normalization vectors. Read from the spec itself (`../shared/spec/`, beside the
checkout in development and CI) when it is there, else from the copy in `tests/data/` that
ships with the repository; `test_pii_vectors.py` checks that the two are the same."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SPEC = ROOT.parent / "shared" / "spec" / "vectors-public.json"
COPY = ROOT / "tests" / "data" / "vectors-public.json"

VECTORS: list[dict[str, Any]] = json.loads(
    (SPEC if SPEC.is_file() else COPY).read_text(encoding="utf-8")
)
