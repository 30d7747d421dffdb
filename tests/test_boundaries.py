"""Package boundaries at run time. The static ones (layers, forbidden imports) are import-linter contracts in
pyproject.toml, checked by `make lint`; these check what a process really loads."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ML = {"torch", "ray", "deepspeed", "vllm", "transformers"}


def test_importing_the_operator_loads_no_ml_framework() -> None:
    code = ("import sys, kubetune.operator.handlers, kubetune.operator.__main__, kubetune.cli; "
            f"print(sorted(m for m in sys.modules if m.split('.')[0] in {sorted(ML)!r}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]"


def test_no_top_level_package_shadows_the_stdlib_operator_module() -> None:
    assert not (ROOT / "operator" / "__init__.py").exists()
    out = subprocess.run([sys.executable, "-c", "import operator; print(operator.__file__)"],
                         capture_output=True, text=True, check=True, cwd=ROOT)
    assert str(ROOT) not in out.stdout
