"""spec.podTemplate, the extra resources of a Ray pod and the Kueue fields: what is accepted, and what is rejected
at apply time (by the model and by the CRD, each naming the field) instead of at pod creation.

The same model serves both kinds; every case runs against the FineTuneJob and the EvalJob. What a podTemplate
makes of the pods (merge, precedence, Pod Security) is tests/operator/test_pod_merge.py.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import pydantic
import pytest

from factories import EXTRA_RESOURCES, evj_manifest, ftj_manifest, full_pod_template, get_path, set_path
from kubetune.api.errors import describe_validation_error
from kubetune.api.evaljob import EvalJob
from kubetune.api.finetunejob import FineTuneJob

MANIFESTS = {"FineTuneJob": ftj_manifest, "EvalJob": evj_manifest}
MODELS = {"FineTuneJob": FineTuneJob, "EvalJob": EvalJob}
# Where each kind keeps its Ray pods' CPU, memory and extra resources.
WORKER = {"FineTuneJob": "spec.resources.worker", "EvalJob": "spec.serving.worker"}

FULL = full_pod_template()
EXTRA = EXTRA_RESOURCES


def manifest(kind: str, **paths: Any) -> dict[str, Any]:
    doc = MANIFESTS[kind]()
    for path, value in paths.items():
        set_path(doc, path, value)
    return doc


@pytest.fixture(params=list(MANIFESTS))
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def test_everything_pod_template_offers_is_accepted_everywhere(kind, crd_validator, ftj_crd, evj_crd):
    doc = manifest(kind, **{"spec.podTemplate": FULL, f"{WORKER[kind]}.cpu": "8", f"{WORKER[kind]}.memory": "32Gi",
                            f"{WORKER[kind]}.extra": EXTRA, "spec.queueName": "team-a",
                            "spec.workloadPriorityClassName": "high"})
    job = MODELS[kind].from_body(doc)
    assert job.spec.pod_template is not None and job.spec.pod_template.to_wire() == FULL
    validator = crd_validator(ftj_crd if kind == "FineTuneJob" else evj_crd)
    assert validator.errors(doc) == []
    assert validator.skipped_cel_rules == []  # every rule on the way was evaluated, none skipped


def test_a_pod_template_may_be_as_small_as_one_field(kind, validators):
    doc = manifest(kind, **{"spec.podTemplate": {"serviceAccountName": "ml-team-s3"}})
    assert MODELS[kind].from_body(doc).spec.pod_template.service_account_name == "ml-team-s3"
    assert validators[kind].errors(doc) == []


@dataclass(frozen=True)
class Case:
    id: str
    field: str  # the path both messages must name
    layer: str  # where the apiserver rejects it: schema | unknown-field | cel | list-type
    set: dict[str, Any] = field(default_factory=dict)
    hint: str | None = None


PT = "spec.podTemplate"
ENV = [{"name": "A", "value": "1"}]
SCRATCH = [{"name": "scratch", "emptyDir": {}}]


def mount(path: str, **more: Any) -> dict[str, Any]:
    return {f"{PT}.volumes": SCRATCH, f"{PT}.volumeMounts": [{"name": "scratch", "mountPath": path, **more}]}


def node_requirement(**requirement: Any) -> dict[str, Any]:
    return {f"{PT}.affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
        "nodeSelectorTerms": [{"matchExpressions": [{"key": "pool", **requirement}]}]}}}}


NODE_REQUIREMENT = f"{PT}.affinity.nodeAffinity.requiredDuringSchedulingIgnoredDuringExecution.nodeSelectorTerms[0]" \
                   ".matchExpressions[0]"

CASES = [
    # --- identity, scheduling
    Case("service-account-not-a-dns-subdomain", f"{PT}.serviceAccountName", "schema",
         set={f"{PT}.serviceAccountName": "ML_Team"}),
    Case("priority-class-uppercase", f"{PT}.priorityClassName", "schema", set={f"{PT}.priorityClassName": "High"}),
    Case("priority-class-system", f"{PT}.priorityClassName", "cel", hint="kube-system",
         set={f"{PT}.priorityClassName": "system-cluster-critical"}),
    Case("scheduler-with-space", f"{PT}.schedulerName", "schema", set={f"{PT}.schedulerName": "my scheduler"}),
    Case("image-pull-secret-without-name", f"{PT}.imagePullSecrets[0].name", "schema",
         set={f"{PT}.imagePullSecrets": [{}]}),
    # --- what podTemplate does not offer: kubetune's securityContext and containers always win
    Case("security-context", f"{PT}.securityContext", "unknown-field",
         set={f"{PT}.securityContext": {"runAsUser": 0}}),
    Case("host-network", f"{PT}.hostNetwork", "unknown-field", set={f"{PT}.hostNetwork": True}),
    Case("containers", f"{PT}.containers", "unknown-field", set={f"{PT}.containers": [{"name": "x"}]}),
    Case("node-selector-is-in-resources", f"{PT}.nodeSelector", "unknown-field",
         set={f"{PT}.nodeSelector": {"pool": "gpu"}}),
    # --- labels, annotations
    Case("label-of-kubetune", f"{PT}.labels", "cel", hint="reserved",
         set={f"{PT}.labels": {"app.kubernetes.io/component": "trainer"}}),
    Case("label-of-kubetune-prefix", f"{PT}.labels", "cel", hint="reserved",
         set={f"{PT}.labels": {"kubetune.io/ray-cluster": "other"}}),
    Case("label-of-kueue", f"{PT}.labels", "cel", hint="reserved",
         set={f"{PT}.labels": {"kueue.x-k8s.io/queue-name": "team-a"}}),
    Case("label-key-with-space", f"{PT}.labels", "cel", hint="label key", set={f"{PT}.labels": {"my team": "a"}}),
    Case("label-value-with-slash", f"{PT}.labels.team", "schema", set={f"{PT}.labels": {"team": "a/b"}}),
    Case("annotation-of-ray", f"{PT}.annotations", "cel", hint="reserved",
         set={f"{PT}.annotations": {"ray.io/overwrite-container-cmd": "true"}}),
    Case("annotation-too-long", f"{PT}.annotations.note", "schema", set={f"{PT}.annotations": {"note": "x" * 4000}}),
    # --- env
    Case("env-name-with-space", f"{PT}.env[0].name", "schema", set={f"{PT}.env": [{"name": "MY VAR", "value": "1"}]}),
    Case("env-kubetune-name", f"{PT}.env[0].name", "cel", hint="reserved",
         set={f"{PT}.env": [{"name": "KUBETUNE_CONFIG", "value": "/tmp/other.yaml"}]}),
    Case("env-hf-token", f"{PT}.env[0].name", "cel", hint="reserved",
         set={f"{PT}.env": [{"name": "HF_TOKEN", "value": "hf_x"}]}),
    Case("env-ray-auth", f"{PT}.env[0].name", "cel", hint="reserved",
         set={f"{PT}.env": [{"name": "RAY_AUTH_MODE", "value": "disabled"}]}),
    Case("env-duplicate", f"{PT}.env[1]", "list-type", set={f"{PT}.env": [*ENV, {"name": "A", "value": "2"}]}),
    Case("env-value-and-value-from", f"{PT}.env[0]", "cel", hint="not both",
         set={f"{PT}.env": [{"name": "A", "value": "1", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}]}),
    Case("env-value-from-two-sources", f"{PT}.env[0].valueFrom", "cel", hint="exactly one",
         set={f"{PT}.env": [{"name": "A", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"},
                                                        "secretKeyRef": {"name": "s", "key": "k"}}}]}),
    Case("env-field-path-unknown", f"{PT}.env[0].valueFrom.fieldRef.fieldPath", "schema",
         set={f"{PT}.env": [{"name": "A", "valueFrom": {"fieldRef": {"fieldPath": "spec.containers"}}}]}),
    Case("env-secret-key-with-slash", f"{PT}.env[0].valueFrom.secretKeyRef.key", "schema",
         set={f"{PT}.env": [{"name": "A", "valueFrom": {"secretKeyRef": {"name": "s", "key": "a/b"}}}]}),
    Case("env-from-two-sources", f"{PT}.envFrom[0]", "cel", hint="exactly one",
         set={f"{PT}.envFrom": [{"secretRef": {"name": "a"}, "configMapRef": {"name": "b"}}]}),
    Case("env-from-kubetune-prefix", f"{PT}.envFrom[0].prefix", "cel", hint="reserved",
         set={f"{PT}.envFrom": [{"secretRef": {"name": "a"}, "prefix": "KUBETUNE_"}]}),
    # --- volumes
    Case("volume-host-path", f"{PT}.volumes[0].hostPath", "unknown-field",
         set={f"{PT}.volumes": [{"name": "host", "hostPath": {"path": "/"}}]}),
    Case("volume-nfs", f"{PT}.volumes[0].nfs", "unknown-field",
         set={f"{PT}.volumes": [{"name": "n", "nfs": {"server": "x", "path": "/"}}]}),
    Case("volume-without-source", f"{PT}.volumes[0]", "cel", hint="exactly one",
         set={f"{PT}.volumes": [{"name": "empty"}]}),
    Case("volume-two-sources", f"{PT}.volumes[0]", "cel", hint="exactly one",
         set={f"{PT}.volumes": [{"name": "two", "emptyDir": {}, "secret": {"secretName": "s"}}]}),
    Case("volume-name-uppercase", f"{PT}.volumes[0].name", "schema",
         set={f"{PT}.volumes": [{"name": "Scratch", "emptyDir": {}}]}),
    Case("volume-name-of-kubetune", f"{PT}.volumes", "cel", hint="kubetune",
         set={f"{PT}.volumes": [{"name": "kubetune-config", "emptyDir": {}}]}),
    Case("volume-name-of-kuberay", f"{PT}.volumes", "cel", hint="KubeRay",
         set={f"{PT}.volumes": [{"name": "shared-mem", "emptyDir": {}}]}),
    Case("volume-duplicate", f"{PT}.volumes[1]", "list-type", set={f"{PT}.volumes": SCRATCH * 2}),
    Case("empty-dir-on-disk-medium", f"{PT}.volumes[0].emptyDir.medium", "schema",
         set={f"{PT}.volumes": [{"name": "s", "emptyDir": {"medium": "HugePages"}}]}),
    Case("key-path-escaping", f"{PT}.volumes[0].secret.items[0].path", "cel", hint="'..'",
         set={f"{PT}.volumes": [{"name": "s", "secret": {"secretName": "s", "items": [
             {"key": "k", "path": "../../etc/passwd"}]}}]}),
    Case("file-mode-too-big", f"{PT}.volumes[0].secret.defaultMode", "schema",
         set={f"{PT}.volumes": [{"name": "s", "secret": {"secretName": "s", "defaultMode": 0o4777}}]}),
    Case("token-expiring-too-soon", f"{PT}.volumes[0].projected.sources[0].serviceAccountToken.expirationSeconds",
         "schema", set={f"{PT}.volumes": [{"name": "t", "projected": {"sources": [
             {"serviceAccountToken": {"path": "t", "expirationSeconds": 60}}]}}]}),
    Case("ephemeral-without-size", f"{PT}.volumes[0].ephemeral.volumeClaimTemplate.spec.resources", "schema",
         set={f"{PT}.volumes": [{"name": "c", "ephemeral": {"volumeClaimTemplate": {"spec": {
             "accessModes": ["ReadWriteOnce"]}}}}]}),
    # --- volume mounts
    Case("mount-of-no-volume", f"{PT}.volumeMounts", "cel", hint="volume",
         set={f"{PT}.volumeMounts": [{"name": "nowhere", "mountPath": "/x"}]}),
    Case("mount-over-kubetune-config", f"{PT}.volumeMounts", "cel", hint="kubetune mounts",
         set=mount("/etc/kubetune")),
    Case("mount-under-dev-shm", f"{PT}.volumeMounts", "cel", hint="kubetune mounts", set=mount("/dev/shm/x")),
    Case("mount-above-pvc-root", f"{PT}.volumeMounts", "cel", hint="kubetune mounts", set=mount("/mnt")),
    Case("mount-relative", f"{PT}.volumeMounts[0].mountPath", "schema", set=mount("scratch")),
    Case("mount-root", f"{PT}.volumeMounts[0].mountPath", "schema", set=mount("/")),
    Case("mount-dot-dot", f"{PT}.volumeMounts[0].mountPath", "schema", set=mount("/x/../etc/kubetune")),
    Case("mount-duplicate-path", f"{PT}.volumeMounts[1]", "list-type",
         set={f"{PT}.volumes": SCRATCH, f"{PT}.volumeMounts": [{"name": "scratch", "mountPath": "/s"}] * 2}),
    Case("mount-sub-path-escaping", f"{PT}.volumeMounts[0].subPath", "cel", hint="'..'",
         set=mount("/scratch", subPath="../..")),
    Case("mount-bidirectional", f"{PT}.volumeMounts[0].mountPropagation", "schema",
         set=mount("/scratch", mountPropagation="Bidirectional")),
    # --- affinity
    Case("affinity-in-without-values", NODE_REQUIREMENT, "cel", hint="values", set=node_requirement(operator="In")),
    Case("affinity-exists-with-values", NODE_REQUIREMENT, "cel", hint="values",
         set=node_requirement(operator="Exists", values=["a"])),
    Case("affinity-gt-not-an-integer", NODE_REQUIREMENT, "cel", hint="integer",
         set=node_requirement(operator="Gt", values=["eight"])),
    Case("affinity-unknown-operator", f"{NODE_REQUIREMENT}.operator", "schema",
         set=node_requirement(operator="Like", values=["a"])),
    Case("affinity-empty-term", f"{PT}.affinity.nodeAffinity.requiredDuringSchedulingIgnoredDuringExecution"
         ".nodeSelectorTerms[0]", "cel", hint="at least one",
         set={f"{PT}.affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
             "nodeSelectorTerms": [{}]}}}}),
    Case("affinity-weight-zero", f"{PT}.affinity.nodeAffinity.preferredDuringSchedulingIgnoredDuringExecution[0]"
         ".weight", "schema", set={f"{PT}.affinity": {"nodeAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [
             {"weight": 0, "preference": {"matchExpressions": [{"key": "a", "operator": "Exists"}]}}]}}}),
    Case("pod-affinity-without-topology-key", f"{PT}.affinity.podAntiAffinity"
         ".requiredDuringSchedulingIgnoredDuringExecution[0].topologyKey", "schema",
         set={f"{PT}.affinity": {"podAntiAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": [
             {"labelSelector": {"matchLabels": {"a": "b"}}}]}}}),
    # --- Kueue
    Case("queue-name-uppercase", "spec.queueName", "schema", set={"spec.queueName": "Team-A"}),
    Case("workload-priority-without-queue", "spec.workloadPriorityClassName", "cel", hint="queueName",
         set={"spec.workloadPriorityClassName": "high"}),
]

assert len({c.id for c in CASES}) == len(CASES)


def extra_cases(kind: str) -> list[Case]:
    """The worker pod's extra resources: never CPU, memory or a GPU, only whole extended resources."""
    worker = WORKER[kind]
    base = {f"{worker}.cpu": "8", f"{worker}.memory": "32Gi"}
    return [
        Case("extra-gpu", f"{worker}.extra", "cel", hint="GPU", set={**base, f"{worker}.extra": {"nvidia.com/gpu": 2}}),
        Case("extra-mig", f"{worker}.extra", "cel", hint="GPU",
             set={**base, f"{worker}.extra": {"nvidia.com/mig-1g.10gb": 1}}),
        Case("extra-cpu", f"{worker}.extra", "cel", hint="not cpu", set={**base, f"{worker}.extra": {"cpu": "4"}}),
        Case("extra-kubernetes-io", f"{worker}.extra", "cel", hint="kubernetes.io",
             set={**base, f"{worker}.extra": {"example.kubernetes.io/thing": 1}}),
        Case("extra-fractional-extended", f"{worker}.extra", "cel", hint="whole number",
             set={**base, f"{worker}.extra": {"vpc.amazonaws.com/efa": "1.5"}}),
        Case("extra-not-a-quantity", f"{worker}.extra.ephemeral-storage", "schema",
             set={**base, f"{worker}.extra": {"ephemeral-storage": "lots"}}),
    ]


def all_cases(kind: str) -> list[Case]:
    return [*CASES, *extra_cases(kind)]


PARAMS = [pytest.param(kind, case, id=f"{kind}-{case.id}") for kind in MANIFESTS for case in all_cases(kind)]


@pytest.mark.parametrize(("kind", "case"), PARAMS)
def test_model_rejects(kind, case):
    with pytest.raises(pydantic.ValidationError) as info:
        MODELS[kind].from_body(manifest(kind, **case.set))
    message = describe_validation_error(info.value)
    assert case.field in message, message
    assert case.hint is None or case.hint in message, message


@pytest.mark.parametrize(("kind", "case"), PARAMS)
def test_crd_rejects(request, validators, kind, case):
    if case.layer == "cel":
        request.getfixturevalue("requires_cel")
    errors = validators[kind].errors(manifest(kind, **case.set))
    report = "\n".join(map(str, errors)) or "(accepted)"
    named = [e for e in errors if e.layer == case.layer and case.field in str(e)
             and (case.hint is None or case.hint in str(e))]
    assert named, f"expected a {case.layer} error naming {case.field}, got:\n{report}"


def test_annotations_fit_the_apiservers_limit_by_their_bounds_alone(ftj_crd):
    """64 annotations at their longest keys and values stay under the apiserver's 256 KiB per object."""
    annotations = get_path(ftj_crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"],
                           "properties.spec.properties.podTemplate.properties.annotations")
    assert annotations["maxProperties"] * (317 + annotations["additionalProperties"]["maxLength"]) < 256 * 1024


def test_pod_template_schema_is_bounded(ftj_crd):
    """Every string, list and map under podTemplate has a maximum: the apiserver estimates the cost of the CEL
    rules (and of the immutability rule comparing the whole podTemplate) from these bounds, and refuses a CRD
    whose estimate is unbounded."""
    from kube_schema import iter_schema_nodes

    root = get_path(ftj_crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"], "properties.spec.properties")
    unbounded = []
    for name in ("podTemplate", "resources"):
        for path, node in iter_schema_nodes(root[name], name):
            kind = node.get("type")
            bounded = {"string": "maxLength" in node or "enum" in node, "array": "maxItems" in node,
                       "object": "additionalProperties" not in node or "maxProperties" in node}.get(kind, True)
            if not bounded:
                unbounded.append(path)
    assert unbounded == []


def test_finetunejob_evaluation_has_no_pod_template_of_its_own():
    """The EvalJob of spec.evaluation gets the FineTuneJob's podTemplate and queue (contract.evaljob_for)."""
    doc = set_path(ftj_manifest(), "spec.evaluation", {
        "dataset": {"uri": "s3://b/test.jsonl", "reference": "{mr}"}, "scorer": {"name": "viggo"},
        "baselinePrompt": {"template": "{ref}"}, "podTemplate": {"serviceAccountName": "x"}})
    with pytest.raises(pydantic.ValidationError) as info:
        FineTuneJob.from_body(copy.deepcopy(doc))
    assert "spec.evaluation.podTemplate" in describe_validation_error(info.value)
