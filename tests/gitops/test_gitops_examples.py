"""examples/gitops: the Argo CD Applications and Flux objects are well-formed and point at real things.

No Argo CD or Flux here: the checks are the ones a reviewer would do by hand, made exact. The kinds and
API versions, that every path and chart they reference exists in this repository, that the chart values
they pass are accepted by charts/kubetune/values.schema.json, that the references between the Flux
objects resolve, that KubeRay is installed first, at a supported version, and that the namespaces the
chart is told to watch exist before the chart is installed (it creates a Role in each).
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
ARGO_ROOT = documents("argocd-app-of-apps.yaml")
ARGO_APP_HEALTH = documents("argocd-cm-application-health.yaml")
FLUX = documents("flux.yaml")
WAVE = "argocd.argoproj.io/sync-wave"
ARGO_SYNC_OPTIONS = "argocd.argoproj.io/sync-options"


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


def wave(doc: Obj) -> int:
    """Argo CD's sync wave of a resource: its annotation, 0 without one."""
    return int((doc["metadata"].get("annotations") or {}).get(WAVE, "0"))


def sync_options(doc: Obj) -> set[str]:
    value = (doc["metadata"].get("annotations") or {}).get(ARGO_SYNC_OPTIONS, "")
    return {option.strip() for option in value.split(",") if option.strip()}


# --------------------------------------------------------------------------- Argo CD


def test_argocd_file_holds_the_namespace_and_the_applications() -> None:
    assert {(d["apiVersion"], d["kind"]) for d in ARGO} == {("v1", "Namespace"), ("argoproj.io/v1alpha1", "Application")}
    assert set(by_name(ARGO, "Application")) == {"kuberay-operator", "kubetune", "viggo-llama-2-7b"}
    assert set(by_name(ARGO, "Namespace")) == {"ml-team"}


def test_argocd_applies_kuberay_then_kubetune_then_the_job() -> None:
    apps = by_name(ARGO, "Application")
    waves = {name: int(app["metadata"]["annotations"][WAVE]) for name, app in apps.items()}
    assert waves["kuberay-operator"] < waves["kubetune"] < waves["viggo-llama-2-7b"]


def test_argocd_waves_are_ordered_by_a_parent_application() -> None:
    """Sync waves order the resources of one sync: the Applications must be resources of a parent app."""
    (root,) = ARGO_ROOT
    assert (root["apiVersion"], root["kind"]) == ("argoproj.io/v1alpha1", "Application")
    assert WAVE not in (root["metadata"].get("annotations") or {})
    source = root["spec"]["source"]
    kubetune = by_name(ARGO, "Application")["kubetune"]["spec"]["source"]
    assert (source["repoURL"], source["targetRevision"]) == (kubetune["repoURL"], kubetune["targetRevision"])
    folder = ROOT / source["path"]
    assert [p.name for p in folder.glob(source["directory"]["include"])] == ["argocd-applications.yaml"]
    assert not source["directory"].get("recurse")
    # The children are Applications: they must land in Argo CD's namespace, where they are declared.
    assert root["spec"]["destination"] == {"server": "https://kubernetes.default.svc", "namespace": "argocd"}
    assert root["spec"]["syncPolicy"]["automated"]["prune"] is False


def test_argocd_creates_every_watched_namespace_in_a_wave_before_the_chart() -> None:
    """The chart creates a Role in each watched namespace: the Namespace is synced in an earlier wave."""
    apps = by_name(ARGO, "Application")
    namespaces = by_name(ARGO, "Namespace")
    watched = apps["kubetune"]["spec"]["source"]["helm"]["valuesObject"]["watchNamespaces"]
    assert watched
    for name in watched:
        assert name in namespaces, f"{name} is watched but not created before the chart"
        assert wave(namespaces[name]) < wave(apps["kubetune"])
        assert wave(namespaces[name]) < min(wave(app) for app in apps.values())
        # Deleting the namespace deletes every job in it.
        assert {"Delete=false", "Prune=false"} <= sync_options(namespaces[name])
    # In file order too, for `kubectl apply -f` without the parent.
    kinds = [d["kind"] for d in ARGO]
    assert kinds.index("Namespace") < kinds.index("Application")


def test_argocd_application_health_check_is_a_lua_argocd_cm_patch() -> None:
    (patch,) = ARGO_APP_HEALTH
    assert (patch["kind"], patch["metadata"]["name"], patch["metadata"]["namespace"]) == (
        "ConfigMap", "argocd-cm", "argocd")
    assert set(patch["data"]) == {"resource.customizations.health.argoproj.io_Application"}


@pytest.mark.parametrize(("status", "expected"), [
    (None, ("Progressing", "")),
    ({"health": {"status": "Progressing"}}, ("Progressing", "")),
    ({"health": {"status": "Healthy"}}, ("Healthy", "")),
    ({"health": {"status": "Degraded", "message": "Back-off pulling image"}}, ("Degraded", "Back-off pulling image")),
], ids=["no-status", "progressing", "healthy", "degraded"])
def test_argocd_application_health_check_reports_the_childs_health(status: Obj | None, expected: tuple) -> None:
    lua51 = pytest.importorskip("lupa.lua51", reason="lupa (with its Lua 5.1 runtime) is a dev dependency")
    runtime = lua51.LuaRuntime(unpack_returned_tuples=True)
    obj: Obj = {"apiVersion": "argoproj.io/v1alpha1", "kind": "Application", "metadata": {"name": "child"}}
    if status is not None:
        obj["status"] = status
    runtime.globals().obj = runtime.table_from(obj, recursive=True)
    (script,) = ARGO_APP_HEALTH[0]["data"].values()
    hs = runtime.execute(script)
    assert (hs["status"], hs["message"]) == expected


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


def test_argocd_kubetune_app_keeps_the_crds() -> None:
    """With prune on, only crds.keep (Delete=false,Prune=false on the CRDs) keeps the jobs' CRDs."""
    app = by_name(ARGO, "Application")["kubetune"]
    assert app["spec"]["source"]["helm"]["valuesObject"]["crds"]["keep"] is True


# --------------------------------------------------------------------------- Flux


FLUX_KINDS = {
    ("v1", "Namespace"): 1,
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
        spec = doc.get("spec") or {}
        ref = spec.get("sourceRef") or (spec.get("chart") or {}).get("spec", {}).get("sourceRef")
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


def test_flux_creates_every_watched_namespace_before_the_chart_release() -> None:
    """The Namespace is in the same object set, ahead of the HelmRelease: kustomize-controller applies
    Namespaces (and CRDs) first and waits for them, and `kubectl apply -f` goes in file order, so it
    exists before helm-controller sees the HelmRelease (whose dependsOn names only HelmReleases)."""
    release = by_name(FLUX, "HelmRelease")["kubetune"]
    watched = release["spec"]["values"]["watchNamespaces"]
    namespaces = by_name(FLUX, "Namespace")
    assert watched
    position = {(d["kind"], d["metadata"]["name"]): i for i, d in enumerate(FLUX)}
    for name in watched:
        assert name in namespaces, f"{name} is watched but not created before the chart"
        assert position[("Namespace", name)] < position[("HelmRelease", "kubetune")]
        # Never pruned by the Kustomization that applies this file: that would delete every job in it.
        assert namespaces[name]["metadata"]["annotations"]["kustomize.toolkit.fluxcd.io/prune"] == "disabled"
    # install.createNamespace creates the release's namespace only, which is not a watched one.
    assert release["spec"]["targetNamespace"] not in watched


def test_flux_readme_names_the_secrets_the_applied_jobs_read() -> None:
    """The Kustomization applies the viggo jobs as they are: every Secret they name is documented."""
    (kustomization,) = by_name(FLUX, "Kustomization").values()
    folder = ROOT / kustomization["spec"]["path"]
    docs = [d for p in sorted(folder.glob("*.yaml")) for d in yaml.safe_load_all(p.read_text()) if d]
    refs = set()
    for doc in docs:
        token = doc["spec"].get("baseModel", {}).get("tokenSecretRef")
        if token:
            refs.add((token["name"], token["key"]))
        for candidate in doc["spec"].get("candidates", []):
            key = (candidate["model"].get("endpoint") or {}).get("apiKeySecretRef")
            if key:
                refs.add((key["name"], key["key"]))
    assert ("openai", "api-key") in refs
    readme = (GITOPS / "README.md").read_text()
    for name, key in refs:
        assert f"| `{name}` | `{key}` |" in readme, f"README.md does not document Secret {name} (key {key})"


@pytest.mark.parametrize("name", ["argocd-applications.yaml", "argocd-app-of-apps.yaml", "flux.yaml"])
def test_every_object_is_namespaced_to_its_controller(name: str) -> None:
    expected = "argocd" if name.startswith("argocd") else "flux-system"
    for doc in documents(name):
        if doc["kind"] == "Namespace":  # cluster-scoped
            assert "namespace" not in doc["metadata"]
            continue
        assert doc["metadata"]["namespace"] == expected, doc["metadata"]["name"]
