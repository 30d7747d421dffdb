"""The `runtime` image's Python layers: what can be checked of that target here (`make test-image`).

Its build cannot run here: NVIDIA's CUDA base images, GitHub (where `uv python install` gets CPython) and
nvcc (DeepSpeed's ops) are out of reach. Its runtime-build stage's own `uv pip install` commands, read
from the Dockerfile and resolved together on PyPI for linux/x86-64 (scripts/build_image.py
runtime-layers), show whether the pins it names can be installed together, with the CUDA torch wheel.
Needs PyPI (a registry) and the dev extra's uv.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

import build_image

pytestmark = pytest.mark.image

ROOT = Path(__file__).resolve().parents[2]
CONSTRAINTS = {canonicalize_name(name): version for name, version in
               re.findall(r"(?m)^([A-Za-z0-9_.-]+)==(\S+)$", (ROOT / "constraints.txt").read_text())}


@pytest.fixture(scope="module")
def resolved(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    found = build_image.resolve_runtime_layers(tmp_path_factory.mktemp("runtime-layers"))
    return {canonicalize_name(name): version for name, version in found.items()}


def test_the_runtime_gets_the_cuda_torch_at_the_tested_version(resolved: dict[str, str]) -> None:
    assert resolved["torch"] == CONSTRAINTS["torch"].removesuffix("+cpu")
    assert "+cpu" not in " ".join(resolved.values())
    assert {"nvidia-cublas", "nvidia-cuda-runtime", "nvidia-cudnn-cu13"} & set(resolved), "PyPI's CUDA build"


def test_the_pins_the_dockerfile_names_are_what_installs(resolved: dict[str, str]) -> None:
    named = {}
    for line in build_image.dockerfile_stage("runtime-build"):
        named |= {canonicalize_name(n): v for n, v in re.findall(r'"?([A-Za-z0-9_.-]+)(?:\[[^\]]*\])?==([0-9][^"\s]*)"?', line)}
    assert {"torch", "deepspeed", "vllm", "ray"} <= set(named)
    for name, version in named.items():
        assert resolved[name] == version, name


def test_the_trainer_keeps_its_transformers_over_vllms_cap(resolved: dict[str, str]) -> None:
    assert resolved["transformers"] == CONSTRAINTS["transformers"]


def test_the_trainer_and_serving_requirements_are_met(resolved: dict[str, str]) -> None:
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    for raw in extras["trainer"] + extras["serving"]:
        requirement = Requirement(raw)
        name = canonicalize_name(requirement.name)
        if name == "kubetune":
            continue
        assert name in resolved, name
        assert Version(resolved[name]) in requirement.specifier, f"{name} {resolved[name]} {requirement.specifier}"
