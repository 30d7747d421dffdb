"""examples/gitops: the Argo CD Applications and Flux objects are well-formed and point at real things.

No Argo CD or Flux here: the checks are the ones a reviewer would do by hand, made exact. The kinds and
API versions, that every path and chart they reference exists in this repository, that the chart values
they pass are accepted by charts/kubetune/values.schema.json, that the references between the Flux
objects resolve, and that KubeRay is installed first, at a supported version.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
GITOPS = ROOT / "examples" / "gitops"
VALUES_SCHEMA = json.loads((ROOT / "charts" / "kubetune" / "values.schema.json").read_text())
DEFAULT_VALUES = yaml.safe_load((ROOT / "charts" / "kubetune" / "values.yaml").read_text())
KUBERAY_CHART = "https://ray-project.github.io/kuberay-helm/"
MIN_KUBERAY = (1, 5)

Obj = dict[str, Any]


def documents(name: str) -> list[Obj]:
    return [d for d in yaml.safe_load_all((GITOPS / name).read_text()) if d]


ARGO = documents("argocd-applications.yaml")
FLUX = documents("flux.yaml")


def by_name(docs: list[Obj], kind: str) -> dict[str, Obj]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def with_defaults(overrides: Obj, defaults: Obj = DEFAULT_VALUES) -> Obj:
    """The values helm renders with: values.yaml, overridden key by key (maps merge, the rest replace)."""
    merged = dict(defaults)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(defaults.get(key), dict):
            merged[key] = with_defaults(value, defaults[key])
        else:
            merged[key] = value
    return merged


def version_at_least(version: str, minimum: tuple[int, int]) -> bool:
    return tuple(int(x) for x in version.split(".")[:2]) >= minimum


# --------------------------------------------------------------------------- Argo CD


def test_argocd_file_holds_only_applications() -> None:
    assert {(d["apiVersion"], d["kind"]) for d in ARGO} == {("argoproj.io/v1alpha1", "Application")}
    assert set(by_name(ARGO, "Application")) == {"kuberay-operator", "kubetune", "viggo-llama-2-7b"}


def test_argocd_applies_kuberay_then_kubetune_then_the_job() -> None:
    apps = by_name(ARGO, "Application")
    wave = {name: int(app["metadata"]["annotations"]["argocd.argoproj.io/sync-wave"]) for name, app in apps.items()}
    assert wave["kuberay-operator"] < wave["kubetune"] < wave["viggo-llama-2-7b"]


def test_argocd_installs_a_supported_kuberay_server_side() -> None:
    app = by_name(ARGO, "Application")["kuberay-operator"]
    assert (app["spec"]["source"]["repoURL"], app["spec"]["source"]["chart"]) == (KUBERAY_CHART, "kuberay-operator")
    assert version_at_least(app["spec"]["source"]["targetRevision"], MIN_KUBERAY)
    assert "ServerSideApply=true" in app["spec"]["syncPolicy"]["syncOptions"]


def test_argocd_kubetune_app_uses_this_chart_with_valid_values() -> None:
    source = by_name(ARGO, "Application")["kubetune"]["spec"]["source"]
    assert (ROOT / source["path"] / "Chart.yaml").exists()
    jsonschema.validate(with_defaults(source["helm"]["valuesObject"]), VALUES_SCHEMA)


def test_argocd_job_app_points_at_a_finetunejob_and_never_prunes_it() -> None:
    app = by_name(ARGO, "Application")["viggo-llama-2-7b"]
    source = app["spec"]["source"]
    (doc,) = yaml.safe_load_all((ROOT / source["path"] / source["directory"]["include"]).read_text())
    assert doc["kind"] == "FineTuneJob"
    assert app["spec"]["syncPolicy"]["automated"]["prune"] is False


def test_argocd_job_namespace_is_watched_by_the_operator() -> None:
    apps = by_name(ARGO, "Application")
    watched = apps["kubetune"]["spec"]["source"]["helm"]["valuesObject"]["watchNamespaces"]
    assert apps["viggo-llama-2-7b"]["spec"]["destination"]["namespace"] in watched


# --------------------------------------------------------------------------- Flux


FLUX_KINDS = {
    ("source.toolkit.fluxcd.io/v1", "HelmRepository"): 1,
    ("source.toolkit.fluxcd.io/v1", "GitRepository"): 1,
    ("helm.toolkit.fluxcd.io/v2", "HelmRelease"): 2,
    ("kustomize.toolkit.fluxcd.io/v1", "Kustomization"): 1,
}


def test_flux_file_holds_the_expected_kinds() -> None:
    found: dict[tuple[str, str], int] = {}
    for doc in FLUX:
        key = (doc["apiVersion"], doc["kind"])
        found[key] = found.get(key, 0) + 1
    assert found == FLUX_KINDS


def test_flux_source_references_resolve() -> None:
    defined = {(d["kind"], d["metadata"]["name"]) for d in FLUX}
    for doc in FLUX:
        ref = doc["spec"].get("sourceRef") or (doc["spec"].get("chart") or {}).get("spec", {}).get("sourceRef")
        if ref is not None:
            assert (ref["kind"], ref["name"]) in defined, f"{doc['kind']}/{doc['metadata']['name']} -> {ref}"


def test_flux_installs_a_supported_kuberay_before_kubetune() -> None:
    releases = by_name(FLUX, "HelmRelease")
    kuberay = releases["kuberay-operator"]["spec"]["chart"]["spec"]
    assert kuberay["chart"] == "kuberay-operator"
    assert version_at_least(kuberay["version"], MIN_KUBERAY)
    assert by_name(FLUX, "HelmRepository")[kuberay["sourceRef"]["name"]]["spec"]["url"] == KUBERAY_CHART
    assert {"name": "kuberay-operator"} in releases["kubetune"]["spec"]["dependsOn"]


def test_flux_kubetune_release_uses_this_chart_with_valid_values() -> None:
    release = by_name(FLUX, "HelmRelease")["kubetune"]["spec"]
    assert (ROOT / release["chart"]["spec"]["chart"] / "Chart.yaml").exists()
    jsonschema.validate(with_defaults(release["values"]), VALUES_SCHEMA)


def test_flux_kustomization_applies_kubetune_jobs_and_waits_for_them() -> None:
    (kustomization,) = by_name(FLUX, "Kustomization").values()
    folder = ROOT / kustomization["spec"]["path"]
    kinds = {d["kind"] for p in folder.glob("*.yaml") for d in yaml.safe_load_all(p.read_text()) if d}
    assert "FineTuneJob" in kinds
    assert kinds <= {"FineTuneJob", "EvalJob"}
    assert kustomization["spec"]["wait"] is True and kustomization["spec"]["prune"] is False


def test_flux_job_namespace_is_watched_by_the_operator() -> None:
    watched = by_name(FLUX, "HelmRelease")["kubetune"]["spec"]["values"]["watchNamespaces"]
    (kustomization,) = by_name(FLUX, "Kustomization").values()
    assert kustomization["spec"]["targetNamespace"] in watched


@pytest.mark.parametrize("name", ["argocd-applications.yaml", "flux.yaml"])
def test_every_object_is_namespaced_to_its_controller(name: str) -> None:
    expected = "argocd" if name.startswith("argocd") else "flux-system"
    for doc in documents(name):
        assert doc["metadata"]["namespace"] == expected, doc["metadata"]["name"]
