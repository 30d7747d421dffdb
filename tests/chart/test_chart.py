"""charts/kubetune: lints, renders for every supported value set, and every object validates offline."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from helmchart import (
    CHART,
    FULLNAME,
    NAMESPACE,
    SCENARIOS,
    Obj,
    helm,
    of_kind,
    one,
    render,
    requires_helm,
    template,
)

pytestmark = requires_helm

ROOT = Path(__file__).resolve().parents[2]
CRD_DIR = ROOT / "crds"
CHART_CRD_DIR = CHART / "files" / "crds"
# The oldest Kubernetes the chart supports (Chart.yaml kubeVersion) and the newest schema on hand.
KUBE_VERSIONS = ["1.29.0", "1.35.0"]
KEEP = "helm.sh/resource-policy"
# Argo CD does not prune on Helm's resource policy: crds.keep also tells it not to delete or prune the CRDs.
ARGOCD_SYNC_OPTIONS = "argocd.argoproj.io/sync-options"

# The fields of monitoring.coreos.com/v1 ServiceMonitor the chart uses, as prometheus-operator's CRD
# types them; anything else in the rendered object is an error (prometheus-operator's CRDs are not
# on this machine).
SERVICE_MONITOR_SCHEMA: Obj = {
    "type": "object",
    "additionalProperties": False,
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "ServiceMonitor"},
        "metadata": {"type": "object"},
        "spec": {
            "type": "object",
            "additionalProperties": False,
            "required": ["selector", "endpoints"],
            "properties": {
                "selector": {"type": "object", "additionalProperties": False, "properties": {
                    "matchLabels": {"type": "object", "additionalProperties": {"type": "string"}}}},
                "namespaceSelector": {"type": "object", "additionalProperties": False, "properties": {
                    "any": {"type": "boolean"},
                    "matchNames": {"type": "array", "items": {"type": "string"}}}},
                "endpoints": {"type": "array", "minItems": 1, "items": {
                    "type": "object", "additionalProperties": False, "properties": {
                        "port": {"type": "string"},
                        "path": {"type": "string"},
                        "interval": {"type": "string", "pattern": "^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?"
                                     "(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$"},
                        "scrapeTimeout": {"type": "string", "pattern": "^(0|(([0-9]+)y)?(([0-9]+)w)?"
                                          "(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$"},
                    }}},
            },
        },
    },
}


def builtin(objs: list[Obj]) -> list[Obj]:
    return [o for o in objs if o["apiVersion"] != "monitoring.coreos.com/v1"]


# --------------------------------------------------------------------------- lint and render


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_helm_lint_strict_passes(name: str) -> None:
    result = helm("lint", "--strict", str(CHART), "--namespace", NAMESPACE, values=SCENARIOS[name])
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("version", KUBE_VERSIONS)
def test_every_builtin_object_validates_against_the_kubernetes_schema(rendered: list[Obj], version: str) -> None:
    """Strict: a field the Kubernetes schema does not know is an error too."""
    for obj in builtin(rendered):
        kubernetes_validate.validate(obj, version, strict=True)


def test_service_monitor_matches_prometheus_operator_fields() -> None:
    monitor = one(render("service-monitor"), "ServiceMonitor")
    jsonschema.validate(monitor, SERVICE_MONITOR_SCHEMA)


def test_service_monitor_scrapes_the_metrics_service() -> None:
    objs = render("service-monitor")
    monitor, service = one(objs, "ServiceMonitor"), one(objs, "Service")
    assert monitor["metadata"]["labels"]["release"] == "prom"
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert monitor["spec"]["namespaceSelector"]["matchNames"] == [NAMESPACE]
    assert [e["port"] for e in monitor["spec"]["endpoints"]] == [p["name"] for p in service["spec"]["ports"]]
    assert monitor["spec"]["endpoints"][0]["path"] == "/metrics"


def test_no_service_monitor_by_default() -> None:
    assert of_kind(render("default"), "ServiceMonitor") == []


def test_service_monitor_without_the_service_is_refused_with_a_reason() -> None:
    result = template({"metrics": {"service": {"enabled": False}, "serviceMonitor": {"enabled": True}}})
    assert result.returncode != 0
    assert "metrics.service.enabled" in result.stderr


def test_every_namespaced_object_goes_to_its_namespace(rendered: list[Obj]) -> None:
    cluster_scoped = {"CustomResourceDefinition", "ClusterRole", "ClusterRoleBinding"}
    for obj in rendered:
        namespace = obj["metadata"].get("namespace")
        if obj["kind"] in cluster_scoped:
            assert namespace is None, f"{obj['kind']} is cluster-scoped"
        else:
            assert namespace, f"{obj['kind']}/{obj['metadata']['name']} has no namespace"


# --------------------------------------------------------------------------- values schema


@pytest.mark.parametrize("values", [
    {"unknownTopLevel": 1},
    {"image": {"registry": "docker.io"}},
    {"crds": {"install": True}},
    {"metrics": {"serviceMonitor": {"namespace": "monitoring"}}},
    {"securityContext": {"privileged": True}},
    {"operator": {"extraEnv": [{"name": "X", "value": "1", "bogus": 1}]}},
], ids=["top-level", "image", "crds", "serviceMonitor", "securityContext", "extraEnv-item"])
def test_values_schema_rejects_an_unknown_key(values: Obj) -> None:
    result = template(values)
    assert result.returncode != 0
    assert "additional properties" in result.stderr


@pytest.mark.parametrize("values", [
    {"watchNamespaces": ["Not_A_Namespace"]},
    {"watchNamespaces": ["a", "a"]},
    {"image": {"pullPolicy": "Sometimes"}},
    {"securityContext": {"runAsUser": 0}},
    {"metrics": {"port": 0}},
], ids=["namespace-name", "duplicate-namespace", "pull-policy", "root-uid", "port"])
def test_values_schema_rejects_a_bad_value(values: Obj) -> None:
    assert template(values).returncode != 0


def _object_nodes(schema: Any, path: str = "") -> list[tuple[str, Obj]]:
    if not isinstance(schema, dict):
        return []
    found = [(path, schema)] if schema.get("type") == "object" else []
    for name, sub in (schema.get("properties") or {}).items():
        found += _object_nodes(sub, f"{path}.{name}")
    for key in ("items", "additionalProperties"):
        found += _object_nodes(schema.get(key), f"{path}[{key}]")
    for sub in schema.get("oneOf", []):
        found += _object_nodes(sub, path)
    return found


def test_values_schema_closes_every_object() -> None:
    """Each object either lists its properties with additionalProperties false, or is a typed map.

    The exceptions are Kubernetes structures passed through as-is (affinity terms, valueFrom, global),
    which the rendered objects' own schema validation covers.
    """
    schema = json.loads((CHART / "values.schema.json").read_text())
    open_nodes = [path for path, node in _object_nodes(schema)
                  if "properties" in node and node.get("additionalProperties") is not False]
    untyped_maps = [path for path, node in _object_nodes(schema)
                    if "properties" not in node and not isinstance(node.get("additionalProperties"), dict)]
    assert open_nodes == []
    assert sorted(untyped_maps) == [".affinity.nodeAffinity", ".affinity.podAffinity",
                                    ".affinity.podAntiAffinity", ".global",
                                    ".operator.extraEnv[items].valueFrom"]


def test_every_value_in_values_yaml_is_declared_in_the_schema() -> None:
    """The schema is not looser than the defaults suggest: values.yaml uses only declared keys."""
    schema = json.loads((CHART / "values.schema.json").read_text())
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    jsonschema.Draft7Validator(schema).validate(values)
    assert set(values) <= set(schema["properties"])


# --------------------------------------------------------------------------- the operator Deployment


def _pod(objs: list[Obj]) -> Obj:
    return one(objs, "Deployment")["spec"]["template"]["spec"]  # type: ignore[no-any-return]


def test_one_replica_replaced_with_recreate(rendered: list[Obj]) -> None:
    spec = one(rendered, "Deployment")["spec"]
    assert spec["replicas"] == 1
    assert spec["strategy"] == {"type": "Recreate"}


def test_pod_runs_under_the_restricted_pod_security_standard(rendered: list[Obj]) -> None:
    pod = _pod(rendered)
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["securityContext"].get("runAsUser", 1) != 0
    for key in ("hostNetwork", "hostPID", "hostIPC"):
        assert not pod.get(key)
    assert all("hostPath" not in v for v in pod.get("volumes", []))
    for container in pod["containers"] + pod.get("initContainers", []):
        ctx = container["securityContext"]
        assert ctx["allowPrivilegeEscalation"] is False
        assert ctx["readOnlyRootFilesystem"] is True
        assert ctx["runAsNonRoot"] is True
        assert ctx["capabilities"] == {"drop": ["ALL"]}
        assert ctx["seccompProfile"] == {"type": "RuntimeDefault"}
        assert not ctx.get("privileged")
        assert all("hostPort" not in p for p in container.get("ports", []))


def test_default_pod_runs_as_the_image_user() -> None:
    ctx = _pod(render("default"))["securityContext"]
    assert (ctx["runAsUser"], ctx["runAsGroup"]) == (10001, 10001)


def test_ids_can_be_left_to_the_platform() -> None:
    ctx = _pod(render("customised"))["securityContext"]
    assert "runAsUser" not in ctx and "runAsGroup" not in ctx
    assert ctx["runAsNonRoot"] is True


def test_container_has_requests_and_limits(rendered: list[Obj]) -> None:
    (container,) = _pod(rendered)["containers"]
    assert {"cpu", "memory"} <= set(container["resources"]["requests"])
    assert "memory" in container["resources"]["limits"]


def test_probes_call_kopfs_health_endpoint(rendered: list[Obj]) -> None:
    (container,) = _pod(rendered)["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    health = next(a for a in container["args"] if a.startswith("--liveness="))
    for probe in ("livenessProbe", "readinessProbe"):
        assert container[probe]["httpGet"] == {"path": "/healthz", "port": "http-health"}
    assert health == f"--liveness=http://0.0.0.0:{ports['http-health']}/healthz"


def test_metrics_port_is_served_and_exposed(rendered: list[Obj]) -> None:
    (container,) = _pod(rendered)["containers"]
    port = next(p for p in container["ports"] if p["name"] == "http-metrics")["containerPort"]
    assert f"--metrics-port={port}" in container["args"]
    service = one(rendered, "Service")
    assert service["spec"]["ports"][0]["targetPort"] == "http-metrics"
    assert service["spec"]["selector"].items() <= one(rendered, "Deployment")["spec"]["template"][
        "metadata"]["labels"].items()


def test_cluster_wide_mode_passes_no_namespace() -> None:
    (container,) = _pod(render("default"))["containers"]
    assert not [a for a in container["args"] if a.startswith("--namespace")]


def test_namespaced_mode_passes_each_namespace() -> None:
    (container,) = _pod(render("namespaced"))["containers"]
    assert [a for a in container["args"] if a.startswith("--namespace")] == [
        "--namespace=team-a", "--namespace=team-b"]


def test_operator_knobs_become_its_environment() -> None:
    (container,) = _pod(render("customised"))["containers"]
    env = {e["name"]: e for e in container["env"]}
    assert env["KUBETUNE_WAIT_DELAY"]["value"] == "10"
    assert env["KUBETUNE_TIMER_INTERVAL"]["value"] == "30"
    assert env["KUBETUNE_SECRET_WAIT_SECONDS"]["value"] == "0"
    assert env["KUBETUNE_BATCH_WINDOW"]["value"] == "0.1"
    assert env["HTTPS_PROXY"]["valueFrom"]["secretKeyRef"] == {"name": "proxy", "key": "url"}
    assert "--verbose" in container["args"]


def test_image_defaults_to_the_app_version_and_takes_a_digest() -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    (default,) = _pod(render("default"))["containers"]
    assert default["image"] == f"ghcr.io/kubetune/kubetune-operator:{chart['appVersion']}"
    (pinned,) = _pod(render("customised"))["containers"]
    assert pinned["image"] == "registry.example.com/kubetune/operator@sha256:" + "ab" * 32


def test_existing_service_account_is_used_and_not_created() -> None:
    objs = render("customised")
    assert of_kind(objs, "ServiceAccount") == []
    assert _pod(objs)["serviceAccountName"] == "existing-sa"


def test_default_names_follow_the_release() -> None:
    objs = render("default")
    assert one(objs, "Deployment")["metadata"]["name"] == FULLNAME
    assert _pod(objs)["serviceAccountName"] == FULLNAME


# --------------------------------------------------------------------------- CRDs


def test_chart_crd_files_are_byte_identical_to_crds() -> None:
    ours = sorted(p.name for p in CHART_CRD_DIR.glob("*.yaml"))
    assert ours == sorted(p.name for p in CRD_DIR.glob("*.yaml")), "run `make crds`"
    for name in ours:
        assert (CHART_CRD_DIR / name).read_bytes() == (CRD_DIR / name).read_bytes(), (
            f"charts/kubetune/files/crds/{name} differs from crds/{name}: run `make crds`")


def _crds(scenario: str) -> dict[str, Obj]:
    return {c["metadata"]["name"]: c for c in of_kind(render(scenario), "CustomResourceDefinition")}


def _generated_crds() -> dict[str, Obj]:
    docs = [yaml.safe_load(p.read_text()) for p in sorted(CRD_DIR.glob("*.yaml"))]
    return {d["metadata"]["name"]: d for d in docs}


@pytest.mark.parametrize("scenario_name", ["default", "crds-not-kept"])
def test_rendered_crds_are_the_generated_crds_plus_the_keep_annotation(scenario_name: str) -> None:
    rendered = _crds(scenario_name)
    assert set(rendered) == set(_generated_crds())
    for name, crd in rendered.items():
        crd["metadata"].pop("annotations", None)
        assert crd == _generated_crds()[name]


def test_crds_are_kept_on_uninstall_by_default() -> None:
    """crds.keep=true (the default): Helm and Flux keep them on uninstall, Argo CD never deletes or prunes them."""
    crds = _crds("default")
    assert crds
    for crd in crds.values():
        assert crd["metadata"]["annotations"] == {KEEP: "keep", ARGOCD_SYNC_OPTIONS: "Delete=false,Prune=false"}


def test_argocd_sync_options_keep_the_crds_on_app_deletion_and_prune() -> None:
    """Argo CD's comma-separated option list holds exactly Delete=false and Prune=false."""
    for crd in _crds("default").values():
        options = [o.strip() for o in crd["metadata"]["annotations"][ARGOCD_SYNC_OPTIONS].split(",")]
        assert sorted(options) == ["Delete=false", "Prune=false"]


def test_crds_keep_false_leaves_no_keep_annotation() -> None:
    crds = _crds("crds-not-kept")
    assert crds
    for crd in crds.values():
        annotations = crd["metadata"].get("annotations") or {}
        assert KEEP not in annotations
        assert ARGOCD_SYNC_OPTIONS not in annotations


def test_crds_disabled_renders_no_crd() -> None:
    assert _crds("crds-disabled") == {}


def test_crds_enabled_renders_both_kinds() -> None:
    kinds = {c["spec"]["names"]["kind"] for c in _crds("default").values()}
    assert kinds == {"FineTuneJob", "EvalJob"}


# --------------------------------------------------------------------------- NOTES.txt


def test_notes_tell_how_to_apply_an_example_and_watch_it() -> None:
    result = helm("install", "kt", str(CHART), "--dry-run=client", "--namespace", NAMESPACE,
                  values={"watchNamespaces": ["team-a"]})
    assert result.returncode == 0, result.stderr
    notes = result.stdout.split("NOTES:", 1)[1]
    assert "kubectl -n team-a apply -f examples/viggo/finetunejob.yaml" in notes
    assert "kubectl -n team-a get ftj -w" in notes
    assert "--for=condition=Succeeded" in notes
    assert "kuberay-operator" in notes


# --------------------------------------------------------------------------- tied to the operator's CLI


@pytest.mark.parametrize("scenario_name", ["default", "namespaced", "customised"])
def test_operator_accepts_the_rendered_arguments(scenario_name: str) -> None:
    from kubetune.operator.__main__ import parse_args

    (container,) = _pod(render(scenario_name))["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    args = parse_args(container["args"])
    assert args.namespace == (SCENARIOS[scenario_name].get("watchNamespaces") or None)
    assert args.metrics_port == ports["http-metrics"]
    assert args.liveness == f"http://0.0.0.0:{ports['http-health']}/healthz"


def test_every_kubetune_variable_the_chart_sets_is_read_by_the_operator() -> None:
    sources = "\n".join(p.read_text() for p in (ROOT / "operator" / "kubetune" / "operator").glob("*.py"))
    for scenario_name in ("default", "customised"):
        (container,) = _pod(render(scenario_name))["containers"]
        for name in (e["name"] for e in container["env"] if e["name"].startswith("KUBETUNE_")):
            assert f'"{name}"' in sources, f"the operator never reads {name}"
