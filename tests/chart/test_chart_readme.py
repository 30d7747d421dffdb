"""The README's install instructions match the chart: every value it sets or names exists, and renders."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml
from helmchart import CHART, helm, requires_helm

ROOT = Path(__file__).resolve().parents[2]
# The project README and the chart's own README (`helm show readme`).
READMES = [ROOT / "README.md", CHART / "README.md"]
# In the project README only the sections about installing are about the chart (`metrics.jsonl` is not).
CHART_SECTIONS = re.compile(r"install|helm|chart|gitops|upgrade", re.IGNORECASE)
VALUES = yaml.safe_load((CHART / "values.yaml").read_text())
SCHEMA = json.loads((CHART / "values.schema.json").read_text())
MIN_KUBERAY = (1, 5)

pytestmark = requires_helm


def shell_commands(markdown: str) -> list[list[str]]:
    """Every command line in the fenced code blocks, continuation lines joined, split like a shell."""
    commands = []
    for block in re.findall(r"```[a-z]*\n(.*?)```", markdown, flags=re.DOTALL):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.removeprefix("$ ").split(" #", 1)[0].strip()
            if line and not line.startswith("#"):
                try:
                    commands.append(shlex.split(line))
                except ValueError:
                    continue
    return commands


def chart_installs(markdown: str) -> list[list[str]]:
    return [c for c in shell_commands(markdown)
            if c[:2] in (["helm", "install"], ["helm", "upgrade"]) and any("charts/kubetune" in a or
                                                                           a.endswith("/kubetune") for a in c)]


def set_flags(command: list[str]) -> list[tuple[str, str]]:
    """(key, value) of every --set/--set-string/--set-json, in both `--set k=v` and `--set=k=v` forms."""
    found = []
    for i, arg in enumerate(command):
        flag, _, inline = arg.partition("=")
        if flag in ("--set", "--set-string", "--set-json"):
            assignment = inline if inline else command[i + 1]
            for part in re.split(r",(?![^{]*})", assignment):
                key, _, value = part.partition("=")
                found.append((key, value))
    return found


def value_exists(path: str) -> bool:
    """`path` is a value of the chart: declared in values.schema.json, or a key of a map value (labels)."""
    node: Any = SCHEMA
    for part in re.sub(r"\[\d+\]", "", path).split("."):
        if part in (node.get("properties") or {}):
            node = node["properties"][part]
        elif isinstance(node.get("additionalProperties"), dict):
            node = node["additionalProperties"]
        else:
            return False
        node = node.get("items", node) if node.get("type") == "array" else node
    return True


@pytest.fixture(params=READMES, ids=[str(p.relative_to(ROOT)) for p in READMES])
def readme(request: pytest.FixtureRequest) -> str:
    path: Path = request.param
    if not path.exists():
        pytest.fail(f"{path.relative_to(ROOT)} is missing")
    text = path.read_text()
    return text if path.parent == CHART else chart_sections(text)


def chart_sections(markdown: str) -> str:
    """The sections whose heading mentions installing, Helm, the chart or GitOps."""
    parts = re.split(r"(?m)^(?=#{1,6} )", markdown)
    return "".join(p for p in parts if CHART_SECTIONS.search(p.split("\n", 1)[0]))


def test_readme_installs_kuberay_at_a_supported_version_first(readme: str) -> None:
    text = readme
    kuberay = [c for c in shell_commands(text) if c[:2] == ["helm", "install"] and "kuberay/kuberay-operator" in c]
    assert kuberay, "README must show `helm install kuberay-operator kuberay/kuberay-operator --version ...`"
    version = kuberay[0][kuberay[0].index("--version") + 1]
    assert tuple(int(x) for x in version.split(".")[:2]) >= MIN_KUBERAY
    installs = chart_installs(text)
    assert installs, "README must show `helm install ... charts/kubetune`"
    assert text.index("kuberay/kuberay-operator") < text.index(shlex.join(installs[0][:3]))


def test_every_value_the_readme_sets_exists_in_values_yaml(readme: str) -> None:
    flags = [key for command in chart_installs(readme) for key, _ in set_flags(command)]
    assert flags, "README's helm install shows no --set (e.g. watchNamespaces, crds.keep)"
    assert [key for key in flags if not value_exists(key)] == []


def test_every_readme_helm_install_renders(readme: str) -> None:
    """The commands as written pass values.schema.json (run as `helm template`, offline)."""
    for command in chart_installs(readme):
        sets = [arg for i, arg in enumerate(command)
                if arg.startswith("--set") or (i and command[i - 1].startswith("--set") and "=" not in command[i - 1])]
        result = helm("template", "kt", str(CHART), *sets)
        assert result.returncode == 0, f"{shlex.join(command)}\n{result.stderr}"


def test_every_chart_value_the_readme_names_exists(readme: str) -> None:
    """Backquoted names such as `crds.keep` or `metrics.serviceMonitor.enabled` are real values."""
    top = "|".join(re.escape(k) for k in VALUES)
    named = set(re.findall(rf"`((?:{top})(?:\.[A-Za-z][A-Za-z0-9]*)+)`", readme))
    assert [name for name in sorted(named) if not value_exists(name)] == []
