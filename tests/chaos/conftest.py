"""The chaos runs drive the operator with the operator tests' own helpers (how a job is created, what KubeRay
and the evaluator report): tests/operator is importable from here, as it is from its own tests."""

from __future__ import annotations

import sys
from pathlib import Path

OPERATOR_TESTS = str(Path(__file__).resolve().parents[1] / "operator")
if OPERATOR_TESTS not in sys.path:
    sys.path.insert(0, OPERATOR_TESTS)
