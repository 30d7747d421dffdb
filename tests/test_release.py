"""The release workflow (.github/workflows/release.yml), checked offline: GitHub's workflow schema, what it
publishes where, least privilege, and that the tag, pyproject.toml and the chart carry one version."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

import release_version
from test_dockerfile import STAGES

ROOT = Path(__file__).resolve().parents[1]
WORKFLOW_PATH = ROOT / ".github" / "workflows" / "release.yml"
# PyYAML reads the key `on` as True (YAML 1.1); BaseLoader keeps every scalar a string.
WORKFLOW: dict[str, Any] = yaml.load(WORKFLOW_PATH.read_text(), Loader=yaml.BaseLoader)
JOBS: dict[str, Any] = WORKFLOW["jobs"]
CHART = ROOT / "charts" / "kubetune"
VALUES = yaml.safe_load((CHART / "Chart.yaml").parent.joinpath("values.yaml").read_text())
CHART_YAML = yaml.safe_load((CHART / "Chart.yaml").read_text())
# The organisation the chart's defaults name; a fork's release rewrites it to its own (the chart job).
OWNER = "kubetune"


def steps(job: str) -> list[dict[str, Any]]:
    return list(JOBS[job]["steps"])


def uses(job: str, action: str) -> dict[str, Any]:
    """The job's step that uses `action` (any version)."""
    (step,) = [s for s in steps(job) if s.get("uses", "").split("@")[0] == action]
    return step


def scripts(job: str) -> str:
    return "\n".join(s.get("run", "") for s in steps(job))


def expand(text: str, **values: str) -> str:
    """Replace the workflow's `${{ <expression> }}` by values keyed by the expression's last name."""
    return re.sub(r"\$\{\{\s*([\w.-]+)\s*\}\}", lambda m: values[m.group(1).rsplit(".", 1)[-1]], text)


# -- the file --------------------------------------------------------------------------------------


def test_the_workflow_matches_githubs_workflow_schema() -> None:
    checker = Path(sys.executable).parent / "check-jsonschema"
    result = subprocess.run([str(checker), "--builtin-schema", "vendor.github-workflows", str(WORKFLOW_PATH)],
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_it_runs_on_version_tags_only() -> None:
    assert WORKFLOW["on"] == {"push": {"tags": ["v*"]}}


def test_every_job_needs_the_version_check() -> None:
    for name, job in JOBS.items():
        if name != "versions":
            needs = job["needs"] if isinstance(job["needs"], list) else [job["needs"]]
            assert "versions" in needs, name


# -- what it publishes -----------------------------------------------------------------------------


def test_both_images_are_built_from_the_dockerfile_and_pushed_to_ghcr() -> None:
    matrix = JOBS["images"]["strategy"]["matrix"]["include"]
    assert {entry["target"] for entry in matrix} == {"operator", "runtime"} <= set(STAGES)
    build = uses("images", "docker/build-push-action")["with"]
    assert (build["push"], build["file"], build["target"]) == ("true", "Dockerfile", "${{ matrix.target }}")
    assert expand(JOBS["images"]["env"]["IMAGE"], owner=OWNER, target="operator") == \
        "ghcr.io/kubetune/kubetune-operator"
    assert expand(uses("images", "docker/metadata-action")["with"]["tags"], VERSION="0.1.0") == \
        "type=raw,value=0.1.0"
    assert uses("images", "docker/login-action")["with"]["registry"] == "ghcr.io"


def test_only_the_operator_image_is_multi_arch() -> None:
    platforms = {e["target"]: e["platforms"].split(",") for e in JOBS["images"]["strategy"]["matrix"]["include"]}
    assert platforms == {"operator": ["linux/amd64", "linux/arm64"], "runtime": ["linux/amd64"]}


def test_the_charts_default_image_is_the_released_operator_image_at_app_version() -> None:
    released = expand(JOBS["images"]["env"]["IMAGE"], owner=OWNER, target="operator")
    assert VALUES["image"]["repository"] == released
    assert VALUES["image"]["tag"] == "" and VALUES["image"]["digest"] == "", "the tag defaults to appVersion"
    (listed,) = yaml.safe_load(CHART_YAML["annotations"]["artifacthub.io/images"])
    assert listed["image"] == f"{released}:{CHART_YAML['appVersion']}"


def test_a_forks_release_points_its_chart_at_its_own_images() -> None:
    rewrite = next(s["run"] for s in steps("chart") if "sed" in s.get("run", ""))
    assert f"ghcr.io/{OWNER}/" in rewrite and "values.yaml" in rewrite and "Chart.yaml" in rewrite


def test_the_chart_is_pushed_as_an_oci_artifact_after_the_images() -> None:
    assert "images" in JOBS["chart"]["needs"]
    run = scripts("chart")
    assert "helm lint --strict charts/kubetune" in run
    assert re.search(r'helm push "dist/kubetune-\$\{VERSION\}\.tgz" "oci://ghcr\.io/\$\{OWNER\}/charts"', run)


def test_the_chart_job_uses_the_helm_the_chart_tests_use() -> None:
    helm = ROOT / ".tools" / "bin" / "helm"
    if not helm.exists() or shutil.which(str(helm)) is None:
        pytest.skip("no .tools/bin/helm (make tools)")
    local = subprocess.run([str(helm), "version", "--short"], capture_output=True, text=True, check=True).stdout
    assert local.split("+")[0].strip() == uses("chart", "azure/setup-helm")["with"]["version"]


def test_the_wheel_goes_to_pypi_by_trusted_publishing_last() -> None:
    job = JOBS["pypi"]
    assert set(job["needs"]) == {"versions", "wheel", "images", "chart"}
    assert job["permissions"] == {"id-token": "write"}
    assert job["environment"]["name"] == "pypi"
    publish = uses("pypi", "pypa/gh-action-pypi-publish")
    assert not {"password", "user", "repository-url"} & set(publish.get("with", {})), "no token: OIDC"
    assert "secrets." not in yaml.safe_dump(job)


def test_the_chart_readme_installs_the_released_chart_at_its_version() -> None:
    readme = (CHART / "README.md").read_text().replace("\\\n", " ")
    (command,) = re.findall(r"helm install \S+ (oci://\S+) --version (\S+)", readme)
    assert command == (f"oci://ghcr.io/{OWNER}/charts/kubetune", CHART_YAML["version"])


def test_the_wheel_built_is_the_tags_version() -> None:
    assert 'ls "dist/kubetune-${VERSION}-py3-none-any.whl"' in scripts("wheel")


# -- least privilege -------------------------------------------------------------------------------


def test_permissions_are_granted_per_job_and_only_what_each_needs() -> None:
    assert WORKFLOW["permissions"] == {}
    granted = {name: job["permissions"] for name, job in JOBS.items()}
    assert granted == {
        "versions": {"contents": "read"},
        "wheel": {"contents": "read"},
        "images": {"contents": "read", "packages": "write"},
        "chart": {"contents": "read", "packages": "write"},
        "pypi": {"id-token": "write"},
    }


def test_checkouts_keep_no_credentials() -> None:
    for name in JOBS:
        for step in steps(name):
            if step.get("uses", "").startswith("actions/checkout@"):
                assert step["with"]["persist-credentials"] == "false", name


def test_no_expression_is_expanded_inside_a_script() -> None:
    """`${{ }}` in `run:` is pasted into the shell before it runs (script injection from a tag name): values
    reach scripts through `env:`."""
    for name in JOBS:
        for step in steps(name):
            assert "${{" not in step.get("run", ""), f"{name}: {step.get('name', step['run'][:40])}"


# -- one version -----------------------------------------------------------------------------------


def test_the_repository_carries_one_version() -> None:
    found = release_version.versions()
    assert len(set(found.values())) == 1, found
    assert release_version.problems(f"v{found['pyproject.toml version']}") == []


def test_a_tag_that_differs_from_pyproject_and_the_chart_is_refused() -> None:
    version = release_version.versions()["pyproject.toml version"]
    major, minor, patch = version.split(".")
    other = f"v{major}.{minor}.{int(patch) + 1}"
    assert release_version.problems(other) == [
        f"pyproject.toml version is '{version}', the tag says '{other[1:]}'",
        f"Chart.yaml version is '{version}', the tag says '{other[1:]}'",
        f"Chart.yaml appVersion is '{version}', the tag says '{other[1:]}'",
    ]


@pytest.mark.parametrize(("where", "old", "new"), [
    ("pyproject.toml", 'version = "{v}"', 'version = "9.9.9"'),
    ("charts/kubetune/Chart.yaml", "version: {v}", "version: 9.9.9"),
    ("charts/kubetune/Chart.yaml", 'appVersion: "{v}"', 'appVersion: "9.9.9"'),
], ids=["pyproject", "chart-version", "chart-appVersion"])
def test_one_file_out_of_step_is_named(tmp_path: Path, where: str, old: str, new: str) -> None:
    version = release_version.versions()["pyproject.toml version"]
    for name in ("pyproject.toml", "charts/kubetune/Chart.yaml"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / name, tmp_path / name)
    text = (tmp_path / where).read_text()
    assert old.format(v=version) in text
    (tmp_path / where).write_text(text.replace(old.format(v=version), new, 1))
    (problem,) = release_version.problems(f"v{version}", tmp_path)
    assert "9.9.9" in problem and problem.startswith(("pyproject.toml version", "Chart.yaml version",
                                                      "Chart.yaml appVersion"))


@pytest.mark.parametrize("tag", ["0.1.0", "v0.1", "v0.1.0.post1", "v01.1.0"])
def test_a_tag_that_is_not_v_semver_is_refused(tag: str) -> None:
    assert release_version.problems(tag)


def test_the_script_prints_the_version_for_github_output() -> None:
    version = release_version.versions()["pyproject.toml version"]
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "release_version.py"), f"v{version}"],
                            capture_output=True, text=True, check=False)
    assert (result.returncode, result.stdout) == (0, f"version={version}\n")
    refused = subprocess.run([sys.executable, str(ROOT / "scripts" / "release_version.py"), "v0.0.0-nope"],
                             capture_output=True, text=True, check=False)
    assert refused.returncode == 1 and "the tag says" in refused.stderr
