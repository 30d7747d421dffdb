"""The developer's ../shared folder, next to the repository: the real KubeRay CRDs and real datasets.

A clone outside this layout has no ../shared. Tests that need it then skip, saying what is absent and
what is not checked; but where the environment says `CI=true` they fail instead, with the same message:
a CI job must not pass without the KubeRay-schema and real-data tests having run. Every test (and test
helper) that reads ../shared goes through `require` or `available`.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]  # the repository
SHARED = ROOT.parent / "shared"
KUBERAY_CRDS = SHARED / "kuberay-crds"
DATASETS = SHARED / "datasets"

_YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml parses the KubeRay CRDs 10x faster


def in_ci() -> bool:
    """Whether the environment says this is CI (`CI=true`, as GitHub Actions, GitLab CI and others set)."""
    return os.environ.get("CI", "").strip().lower() == "true"


def absent_message(path: Path, what: str) -> str:
    """'../shared/<path> is absent: <what>' (`what`: what cannot be checked without it)."""
    try:
        shown = f"../shared/{path.relative_to(SHARED).as_posix()}"
    except ValueError:
        shown = str(path)
    return f"{shown} is absent: {what}"


def require(path: Path, what: str) -> Path:
    """`path` (under ../shared) where it exists; else skip the calling test, or fail it under `CI=true`.

    Call it from the test (or fixture) that needs the file, never at import time.
    """
    if path.exists():
        return path
    message = absent_message(path, what)
    if in_ci():
        pytest.fail(f"{message} (CI=true: a CI run must have ../shared next to the repository)", pytrace=False)
    pytest.skip(message)


def available(path: Path, what: str) -> bool:
    """Whether `path` (under ../shared) exists, for callers with a fallback; under `CI=true` its absence
    fails the calling test instead (the fallback would hide what CI is there to check)."""
    if path.exists():
        return True
    if in_ci():
        pytest.fail(f"{absent_message(path, what)} (CI=true: no fallback in CI)", pytrace=False)
    return False


def kuberay_crd_path(plural: str) -> Path:
    return SHARED / "kuberay-crds" / f"ray.io_{plural}.yaml"  # SHARED read now: tests point it elsewhere


@functools.cache
def load_yaml(path: Path) -> Any:
    """A YAML file, parsed once per process (the KubeRay CRDs are ~20k lines); shared: never change it."""
    return yaml.load(path.read_text(), Loader=_YAML_LOADER)


def kuberay_crd(plural: str) -> dict[str, Any]:
    """The KubeRay v1.7.0 CRD for `plural` (`rayjobs`, `rayservices`), parsed once per process; skips the
    calling test where ../shared/kuberay-crds is absent (fails it under CI=true). Shared: never change it.
    """
    path = require(kuberay_crd_path(plural), f"objects are not checked against KubeRay's {plural} schema")
    crd: dict[str, Any] = load_yaml(path)
    return crd
