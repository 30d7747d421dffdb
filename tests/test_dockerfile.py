"""The Dockerfile, checked without Docker (no engine here): stages, pins, users, and what each image gets."""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import Version

from kubetune.api.finetunejob import ResourcesSpec

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = (ROOT / "Dockerfile").read_text()
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
CONSTRAINTS = {canonicalize_name(name): version for name, version in
               re.findall(r"(?m)^([A-Za-z0-9_.-]+)==(\S+)$", (ROOT / "constraints.txt").read_text())}
ML = {"torch", "ray", "deepspeed", "vllm", "transformers", "accelerate", "tokenizers", "safetensors",
      "triton", "flash-attn"}
# Pinned by vLLM below the development versions; the runtime build drops them from the constraints.
DROPPED_FOR_VLLM = {"numpy", "fastapi", "lark"}


@dataclass
class Stage:
    name: str
    base: str
    lines: list[str] = field(default_factory=list)

    def directives(self, keyword: str) -> list[str]:
        return [line.split(None, 1)[1] for line in self.lines if line.split(None, 1)[0].upper() == keyword]


def logical_lines(text: str) -> list[str]:
    """Dockerfile instructions with continuation lines joined and comments dropped."""
    joined = re.sub(r"\\\n(\s*#.*\n)*", " ", text)
    return [line.strip() for line in joined.splitlines() if line.strip() and not line.strip().startswith("#")]


def expand(text: str, args: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}", lambda m: args.get(m.group(1), m.group(0)), text)


def global_args(lines: list[str]) -> dict[str, str]:
    args = {}
    for line in lines:
        if line.upper().startswith("FROM"):
            break
        if line.upper().startswith("ARG") and "=" in line:
            name, value = line.split(None, 1)[1].split("=", 1)
            args[name] = expand(value.strip('"'), args)  # a default may use the ARGs before it
    return args


def parse_stages(text: str) -> dict[str, Stage]:
    lines = logical_lines(text)
    args = global_args(lines)
    stages: dict[str, Stage] = {}
    current: Stage | None = None
    for line in lines:
        match = re.match(r"(?i)FROM\s+(\S+)\s+AS\s+(\S+)$", line)
        if match:
            current = Stage(match.group(2), expand(match.group(1), args))
            stages[current.name] = current
        elif current is not None:
            current.lines.append(line)
    return stages


STAGES = parse_stages(DOCKERFILE)
GLOBAL_ARGS = global_args(logical_lines(DOCKERFILE))


def stage_args(stage: Stage) -> dict[str, str]:
    out = dict(GLOBAL_ARGS)
    for arg in stage.directives("ARG"):
        if "=" in arg:
            name, value = arg.split("=", 1)
            out[name] = value.strip('"')
    return out


def pins(stage: Stage) -> dict[str, str]:
    """Exact pins in the stage's install commands: "name==version" and "name[extras]==version"."""
    found = {}
    for run in stage.directives("RUN"):
        for name, version in re.findall(r'"?([A-Za-z0-9_.-]+)(?:\[[^\]]*\])?==([0-9][^"\s]*)"?', run):
            found[canonicalize_name(name)] = version
    return found


def stage_chain(name: str) -> list[Stage]:
    """The stage and every stage it copies from."""
    chain, todo = [], [name]
    while todo:
        stage = STAGES[todo.pop()]
        chain.append(stage)
        todo += [m for copy in stage.directives("COPY") for m in re.findall(r"--from=(\S+)", copy) if m in STAGES]
    return chain


# --------------------------------------------------------------------------- stages


def test_operator_and_runtime_targets_exist() -> None:
    assert {"operator", "runtime"} <= set(STAGES)


def test_operator_image_is_slim_python_311() -> None:
    base = STAGES["operator"].base
    assert re.fullmatch(r"python:3\.11\.\d+-slim(-\w+)?", base), base


def test_runtime_image_is_a_cuda_image() -> None:
    assert STAGES["runtime"].base.startswith("nvidia/cuda:")
    assert "-runtime-" in STAGES["runtime"].base
    assert "-devel-" in STAGES["runtime-build"].base, "DeepSpeed's ops are compiled with nvcc in the build stage"


def test_operator_stages_install_only_the_operator_extra() -> None:
    for stage in stage_chain("operator"):
        for run in stage.directives("RUN"):
            if "pip install" in run:
                assert re.search(r'"\.\[operator\]"', run), run
                assert not re.search(r"\.\[[^\]]*(trainer|serving|dev)", run), run
        named = {canonicalize_name(w) for w in re.findall(r"[A-Za-z0-9_.-]+", " ".join(stage.lines))}
        assert not named & ML, f"stage {stage.name} mentions {named & ML}"


def _closure(requirement: str) -> set[str]:
    """Distributions that installing `requirement` pulls in, from the installed metadata."""
    seen: set[str] = set()
    todo = [(Requirement(requirement), ())]
    while todo:
        req, _ = todo.pop()
        name = canonicalize_name(req.name)
        if name in seen:
            continue
        seen.add(name)
        for raw in metadata.requires(req.name) or []:
            dep = Requirement(raw)
            for extra in req.extras or {""}:
                if dep.marker is None or dep.marker.evaluate({"extra": extra}):
                    todo.append((dep, ()))
                    break
    return seen


def test_the_operator_extra_pulls_in_no_ml_package() -> None:
    pulled = _closure("kubetune[operator]")
    assert "kopf" in pulled
    assert not pulled & ML, pulled & ML


def runtime_pins() -> dict[str, str]:
    found: dict[str, str] = {}
    for stage in stage_chain("runtime"):
        found |= pins(stage)
    return found


def test_runtime_installs_trainer_serving_and_pins_the_ml_stack() -> None:
    runs = " ".join(s for stage in stage_chain("runtime") for s in stage.directives("RUN"))
    assert '".[trainer,serving]"' in runs
    assert {"torch", "deepspeed", "vllm", "ray", "transformers"} <= set(runtime_pins())


# --------------------------------------------------------------------------- versions


def test_python_versions_agree() -> None:
    runtime_python = stage_args(STAGES["runtime-build"])["PYTHON_VERSION"]
    operator_python = re.match(r"python:(\d+\.\d+\.\d+)", STAGES["operator"].base).group(1)  # type: ignore[union-attr]
    assert runtime_python == operator_python
    required = PYPROJECT["project"]["requires-python"]
    assert Version(runtime_python) in SpecifierSet(required)


def test_runtime_pins_agree_with_constraints() -> None:
    runtime = runtime_pins()
    for name, version in runtime.items():
        if name in CONSTRAINTS:
            assert version == CONSTRAINTS[name].removesuffix("+cpu"), (
                f"Dockerfile pins {name}=={version}, constraints.txt has {CONSTRAINTS[name]}")
    assert runtime["torch"] == CONSTRAINTS["torch"].removesuffix("+cpu")
    assert runtime["transformers"] == CONSTRAINTS["transformers"]


def test_runtime_pins_satisfy_pyproject_extras() -> None:
    runtime = runtime_pins()
    extras = PYPROJECT["project"]["optional-dependencies"]
    for raw in extras["trainer"] + extras["serving"]:
        req = Requirement(raw)
        name = canonicalize_name(req.name)
        if name in runtime:
            assert Version(runtime[name]) in SpecifierSet(str(req.specifier)), f"{name}: {req.specifier}"


def test_constraints_dropped_for_vllm_are_still_in_constraints() -> None:
    """The runtime drops a few pins that vLLM overrules; the list must not go stale."""
    dropped = set(re.findall(r"grep -vE '\^\(([^)]*)\)==", DOCKERFILE)[0].split("|"))
    assert dropped == DROPPED_FOR_VLLM
    assert dropped <= set(CONSTRAINTS)


def test_ray_version_matches_the_default_in_the_api() -> None:
    runtime = runtime_pins()
    assert runtime["ray"] == ResourcesSpec().ray_version == CONSTRAINTS["ray"]


def test_image_names_line_up_with_the_chart_and_the_api() -> None:
    version = PYPROJECT["project"]["version"]
    chart = yaml.safe_load((ROOT / "charts" / "kubetune" / "Chart.yaml").read_text())
    values = yaml.safe_load((ROOT / "charts" / "kubetune" / "values.yaml").read_text())
    assert chart["appVersion"] == version
    assert values["image"]["repository"] == "ghcr.io/kubetune/kubetune-operator"
    assert ResourcesSpec().image == f"ghcr.io/kubetune/kubetune-runtime:{version}"


def test_every_base_image_is_a_build_argument() -> None:
    """A registry mirror, or the stand-ins scripts/build_image.py makes, replace them without editing the file."""
    raw_froms = re.findall(r"(?im)^FROM\s+(\S+)\s+AS\s+(\S+)$", DOCKERFILE)
    earlier: set[str] = set()
    for base, name in raw_froms:
        assert re.fullmatch(r"\$\{\w+\}", base) or base in earlier, f"stage {name}: FROM {base}"
        earlier.add(name)
    assert not re.findall(r"--from=\S*[/:]", DOCKERFILE), "COPY --from names a stage, not an image"


def test_the_uv_image_is_the_uv_the_tests_resolve_with() -> None:
    """tests/image resolves the runtime's Python layers with the uv of constraints.txt."""
    assert GLOBAL_ARGS["UV_IMAGE"] == f"ghcr.io/astral-sh/uv:{CONSTRAINTS['uv']}"


# --------------------------------------------------------------------------- hygiene


@pytest.mark.parametrize("target", ["operator", "runtime"])
def test_final_images_run_as_a_non_root_user(target: str) -> None:
    users = STAGES[target].directives("USER")
    assert users, f"{target} sets no USER"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0")
    assert user.isdigit(), "a numeric UID lets runAsNonRoot be verified by the kubelet"


def test_no_latest_and_no_untagged_images() -> None:
    images = [stage.base for stage in STAGES.values()]
    images += re.findall(r"--from=(\S+/\S+)", DOCKERFILE)
    for image in images:
        assert ":" in image.rsplit("/", 1)[-1], f"{image} has no tag"
        assert not image.endswith(":latest"), image
    assert "latest" not in DOCKERFILE


def test_operator_entrypoint_is_the_projects_script() -> None:
    (entrypoint,) = STAGES["operator"].directives("ENTRYPOINT")
    assert entrypoint == '["kubetune-operator"]'
    assert "kubetune-operator" in PYPROJECT["project"]["scripts"]


def test_dockerignore_admits_every_copied_path_and_nothing_heavy() -> None:
    rules = [line for line in (ROOT / ".dockerignore").read_text().splitlines() if line and not line.startswith("#")]
    assert rules[0] == "*", ".dockerignore is an allow-list"
    allowed = {rule[1:].rstrip("/") for rule in rules if rule.startswith("!")}
    for copy in (c for s in STAGES.values() for c in s.directives("COPY") if "--from" not in c):
        *sources, _ = copy.split()
        assert {src.rstrip("/") for src in sources} <= allowed, copy
    assert allowed.isdisjoint({".venv", ".tools", "runs", "tests", ".git"})
