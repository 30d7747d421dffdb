"""What ships: the wheel holds the package's six subpackages and nothing test-, fake- or demo-only."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path, PurePosixPath

import pytest

ROOT = Path(__file__).resolve().parents[1]
SUBPACKAGES = ("api", "contract", "operator", "trainer", "serving", "cli")
# Module names that mark test, fake-API or demo code, wherever they would sit in the wheel.
NOT_SHIPPED = re.compile(r"(^|_)(test|tests|testing|conftest|fake\w*|harness|demo|smollm2|viggo_like|workspace)$")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> zipfile.ZipFile:
    # Built from a copy of the sources: setuptools' build/ in the checkout keeps modules deleted since.
    src, out = tmp_path_factory.mktemp("src"), tmp_path_factory.mktemp("wheel")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for sub in SUBPACKAGES:
        shutil.copytree(ROOT / sub, src / sub, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(out), str(src)], check=True, capture_output=True, cwd=out)
    (built,) = out.glob("kubetune-*.whl")
    return zipfile.ZipFile(built)


def package_files(wheel: zipfile.ZipFile) -> list[PurePosixPath]:
    return [PurePosixPath(n) for n in wheel.namelist() if not n.split("/")[0].endswith(".dist-info")]


def test_the_wheel_holds_only_the_kubetune_subpackages(wheel: zipfile.ZipFile) -> None:
    files = package_files(wheel)
    assert {f.parts[0] for f in files} == {"kubetune"}
    assert {f.parts[1] for f in files} == set(SUBPACKAGES)
    assert not [f for f in files if f.parts[-1] == "__init__.py" and len(f.parts) == 2]  # a namespace package


def test_no_test_fake_or_demo_module_is_shipped(wheel: zipfile.ZipFile) -> None:
    shipped = [f for f in package_files(wheel) if NOT_SHIPPED.search(f.stem) or NOT_SHIPPED.search(f.parent.name)]
    assert shipped == []


def test_no_shipped_module_reads_the_development_checkout(wheel: zipfile.ZipFile) -> None:
    """Nothing in the wheel points at ../shared, tests/ or scripts/ of a source checkout."""
    offending = []
    for name in wheel.namelist():
        if name.endswith(".py"):
            text = wheel.read(name).decode()
            if re.search(r"\.\./shared|\"shared\"|tests/support|scripts/", text):
                offending.append(name)
    assert offending == []


def test_every_source_module_is_shipped_and_typed(wheel: zipfile.ZipFile) -> None:
    shipped = {str(f) for f in package_files(wheel)}
    for sub in SUBPACKAGES:
        root = ROOT / sub / "kubetune" / sub
        sources = {f"kubetune/{sub}/{p.relative_to(root).as_posix()}" for p in root.rglob("*.py")
                   if "__pycache__" not in p.parts}
        assert sources <= shipped, sources - shipped
        assert {f"kubetune/{sub}/__init__.py", f"kubetune/{sub}/py.typed"} <= shipped
