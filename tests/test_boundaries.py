"""Package boundaries: the operator image stays free of ML frameworks; trainer and serving never need kopf."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ML = {"torch", "ray", "deepspeed", "vllm", "transformers"}


def imported_top_levels(folder: Path) -> set[str]:
    names: set[str] = set()
    for path in folder.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names.add(node.module.split(".")[0])
    return names


def test_importing_the_operator_loads_no_ml_framework() -> None:
    code = ("import sys, kubetune.operator.handlers, kubetune.operator.__main__, kubetune.cli; "
            f"print(sorted(m for m in sys.modules if m.split('.')[0] in {sorted(ML)!r}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]"


def test_operator_sources_never_import_ml_frameworks() -> None:
    assert imported_top_levels(ROOT / "operator") & ML == set()


@pytest.mark.parametrize("component", ["trainer", "serving"])
def test_trainer_and_serving_never_import_kopf(component: str) -> None:
    assert "kopf" not in imported_top_levels(ROOT / component)


def test_no_top_level_package_shadows_the_stdlib_operator_module() -> None:
    assert not (ROOT / "operator" / "__init__.py").exists()
    out = subprocess.run([sys.executable, "-c", "import operator; print(operator.__file__)"],
                         capture_output=True, text=True, check=True, cwd=ROOT)
    assert str(ROOT) not in out.stdout
