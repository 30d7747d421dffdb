"""spec.podTemplate and the pods' extra resources, merged into the pods the builders make.

Which pods get what: every pod gets labels, annotations, priorityClassName, schedulerName and imagePullSecrets;
the Ray pods (head, workers, serving, evaluator), not the job submitter, get env, envFrom, volumes and mounts;
the worker pods alone get affinity. kubetune's own entries come first and stay as they are. Every pod built
with the whole template is a valid core/v1 Pod (kubernetes-validate, offline), and every Ray object one KubeRay
v1.7.0 accepts. (Pod Security "restricted": tests/examples/test_pod_security.py checks these pods too.)
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import Any

import kubernetes_validate
import pytest

from factories import EXTRA_RESOURCES, evj, ftj, full_pod_template
from kube_schema import schema_errors
from kubetune.api.pods import PRIORITY_CLASS_LABEL, QUEUE_LABEL
from kubetune.contract.evalplan import EvalPlan, cluster_base_url, plan, service_name
from kubetune.operator import builders, evalbuilders
from support.shared import kuberay_crd

Obj = dict[str, Any]
KUBE_VERSIONS = ["1.29.0", "1.35.0"]
TEMPLATE = full_pod_template()


def training(**paths: Any) -> Obj:
    job = ftj(**paths)
    return builders.ray_job(job, builders.children(job))


def resolved(**paths: Any) -> tuple[Any, EvalPlan]:
    job = evj(**paths)
    base_urls = {c.name: cluster_base_url(service_name(job.metadata.name, c.name), "default")
                 for c in job.spec.candidates if c.model.served}
    return job, plan(job, {"fine-tuned": "s3://bucket/runs/viggo/best", "base": "meta-llama/Llama-2-7b-hf"},
                     {"viggo": ftj()}, base_urls)


def evaluation(**paths: Any) -> tuple[list[Obj], Obj]:
    """An EvalJob's RayServices and evaluation RayJob."""
    job, resolved_plan = resolved(**paths)
    services = [evalbuilders.ray_service(job, p) for p in resolved_plan.candidates if p.served]
    return services, evalbuilders.eval_ray_job(job, evalbuilders.children(job), resolved_plan)


def pods(obj: Obj) -> Iterator[tuple[str, Obj]]:
    """(role, PodTemplateSpec) of every pod of a RayJob or RayService: head, worker, submitter."""
    spec = obj["spec"]
    cluster = spec.get("rayClusterSpec") or spec.get("rayClusterConfig")
    yield "head", cluster["headGroupSpec"]["template"]
    for group in cluster.get("workerGroupSpecs", []):
        yield "worker", group["template"]
    if "submitterPodTemplate" in spec:
        yield "submitter", spec["submitterPodTemplate"]


def every_pod(template: Obj | None = None) -> list[tuple[str, str, Obj]]:
    """(which, role, PodTemplateSpec) of every pod a FineTuneJob and an EvalJob with `template` make."""
    paths = {"spec__podTemplate": template} if template is not None else {}
    services, rayjob = evaluation(**paths)
    out = [(f"training {role}", role, pod) for role, pod in pods(training(**paths))]
    out += [(f"serving {service['metadata']['name']} {role}", role, pod) for service in services
            for role, pod in pods(service)]
    out += [(f"evaluation {role}", role, pod) for role, pod in pods(rayjob)]
    return out


WITH = every_pod(TEMPLATE)
WITHOUT = {which: pod for which, _, pod in every_pod()}
IDS = [which for which, _, _ in WITH]


def container(pod: Obj) -> Obj:
    first: Obj = pod["spec"]["containers"][0]
    return first


# -- which pods get what ---------------------------------------------------------------------------


@pytest.mark.parametrize(("which", "role", "pod"), WITH, ids=IDS)
def test_every_pod_gets_the_labels_annotations_priority_scheduler_and_pull_secrets(which: str, role: str,
                                                                                    pod: Obj) -> None:
    assert TEMPLATE["labels"].items() <= pod["metadata"]["labels"].items()
    assert pod["metadata"]["annotations"] == TEMPLATE["annotations"]
    spec = pod["spec"]
    assert (spec["priorityClassName"], spec["schedulerName"]) == ("batch-high", "volcano")
    assert spec["imagePullSecrets"] == [{"name": "registry-creds"}]
    assert spec["serviceAccountName"] == "ml-team-s3"


@pytest.mark.parametrize(("which", "role", "pod"), WITH, ids=IDS)
def test_the_ray_pods_get_env_volumes_and_mounts_after_kubetunes_own(which: str, role: str, pod: Obj) -> None:
    before = WITHOUT[which]
    if role == "submitter":  # it only calls the Ray job API: no Secrets, no volumes
        assert container(pod).get("env") == container(before).get("env")
        assert "envFrom" not in container(pod) and "volumes" not in pod["spec"]
        assert container(pod).get("volumeMounts") == container(before).get("volumeMounts")
        return
    assert container(pod)["env"] == [*container(before)["env"], *TEMPLATE["env"]]
    assert container(pod)["envFrom"] == TEMPLATE["envFrom"]
    assert pod["spec"]["volumes"] == [*before["spec"]["volumes"], *TEMPLATE["volumes"]]
    assert container(pod)["volumeMounts"] == [*container(before)["volumeMounts"], *TEMPLATE["volumeMounts"]]


@pytest.mark.parametrize(("which", "role", "pod"), WITH, ids=IDS)
def test_affinity_is_the_worker_pods_alone(which: str, role: str, pod: Obj) -> None:
    assert ("affinity" in pod["spec"]) is (role == "worker")
    if role == "worker":
        assert pod["spec"]["affinity"] == TEMPLATE["affinity"]


@pytest.mark.parametrize(("which", "role", "pod"), WITH, ids=IDS)
def test_kubetunes_own_settings_stay_as_they_are(which: str, role: str, pod: Obj) -> None:
    before = WITHOUT[which]
    assert before["metadata"]["labels"].items() <= pod["metadata"]["labels"].items()
    assert pod["spec"]["securityContext"] == before["spec"]["securityContext"]
    for key in ("name", "image", "securityContext", "resources", "ports"):
        assert container(pod).get(key) == container(before).get(key)
    assert pod["spec"].get("nodeSelector") == before["spec"].get("nodeSelector")
    assert pod["spec"].get("tolerations") == before["spec"].get("tolerations")


def test_without_a_pod_template_the_pods_are_as_before() -> None:
    """No template, no trace: none of its fields appear (the builders' output for existing jobs is unchanged)."""
    for which, pod in WITHOUT.items():
        assert not {"priorityClassName", "schedulerName", "imagePullSecrets", "affinity"} & set(pod["spec"]), which
        assert "annotations" not in pod["metadata"] and "envFrom" not in container(pod), which


# -- validity ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("version", KUBE_VERSIONS)
@pytest.mark.parametrize(("which", "role", "pod"), WITH, ids=IDS)
def test_every_pod_with_the_whole_template_is_a_valid_core_v1_pod(which: str, role: str, pod: Obj,
                                                                  version: str) -> None:
    manifest = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p", **copy.deepcopy(pod["metadata"])},
                "spec": pod["spec"]}
    kubernetes_validate.validate(manifest, version, strict=True)


@pytest.fixture(scope="module")
def rayjob_crd() -> Obj:
    return kuberay_crd("rayjobs")


@pytest.fixture(scope="module")
def rayservice_crd() -> Obj:
    return kuberay_crd("rayservices")


def test_ray_objects_with_the_whole_template_are_accepted_by_kuberay(rayjob_crd: Obj, rayservice_crd: Obj) -> None:
    paths = {"spec__podTemplate": TEMPLATE, "spec__queueName": "team-a", "spec__workloadPriorityClassName": "high"}
    assert schema_errors(training(**paths, spec__resources__worker={"cpu": "8", "memory": "48Gi",
                                                                    "extra": EXTRA_RESOURCES}), rayjob_crd) == []
    services, rayjob = evaluation(**paths, spec__serving__worker={"cpu": "8", "memory": "32Gi",
                                                                  "extra": EXTRA_RESOURCES})
    assert schema_errors(rayjob, rayjob_crd) == []
    for service in services:
        assert schema_errors(service, rayservice_crd) == []


# -- extra resources ---------------------------------------------------------------------------------


def test_extra_resources_are_requested_and_limited_beside_cpu_memory_and_gpus() -> None:
    rayjob = training(spec__resources__worker={"cpu": "8", "memory": "48Gi", "extra": EXTRA_RESOURCES},
                      spec__resources__gpusPerWorker=4)
    roles = dict(pods(rayjob))
    worker = container(roles["worker"])["resources"]
    expected = {"cpu": "8", "memory": "48Gi", "nvidia.com/gpu": "4", "ephemeral-storage": "200Gi",
                "hugepages-2Mi": "1Gi", "vpc.amazonaws.com/efa": "4"}
    assert worker == {"requests": expected, "limits": expected}
    assert container(roles["head"])["resources"]["limits"] == {"cpu": "4", "memory": "16Gi"}  # the head's own
    assert "ephemeral-storage" not in container(roles["submitter"])["resources"]["limits"]


def test_serving_and_evaluator_pods_take_their_extra_resources_from_serving() -> None:
    extra = {"ephemeral-storage": "50Gi"}
    services, rayjob = evaluation(spec__serving__head={"cpu": "2", "memory": "8Gi", "extra": extra})
    for service in services:
        assert container(dict(pods(service))["head"])["resources"]["limits"]["ephemeral-storage"] == "50Gi"
        assert "ephemeral-storage" not in container(dict(pods(service))["worker"])["resources"]["limits"]
    assert container(dict(pods(rayjob))["head"])["resources"]["requests"]["ephemeral-storage"] == "50Gi"


# -- identity ------------------------------------------------------------------------------------------


def test_the_named_service_account_is_the_evaluators_and_gets_the_status_role() -> None:
    job = evj(spec__podTemplate={"serviceAccountName": "ml-team-s3"})
    objects = evalbuilders.evaluator_identity(job, evalbuilders.children(job))
    assert [o["kind"] for o in objects] == ["Role", "RoleBinding"]
    assert objects[1]["subjects"] == [{"kind": "ServiceAccount", "name": "ml-team-s3", "namespace": "default"}]


# -- Kueue ---------------------------------------------------------------------------------------------


def test_a_queued_rayjob_is_created_suspended_with_kueues_labels() -> None:
    rayjob = training(spec__queueName="team-a", spec__workloadPriorityClassName="high")
    assert rayjob["spec"]["suspend"] is True
    assert rayjob["spec"]["shutdownAfterJobFinishes"] is True  # Kueue's webhook requires it
    labels = rayjob["metadata"]["labels"]
    assert (labels[QUEUE_LABEL], labels[PRIORITY_CLASS_LABEL]) == ("team-a", "high")
    for _, pod in pods(rayjob):  # the pods are the RayJob's: Kueue admits them as one workload
        assert not any(key.startswith("kueue.x-k8s.io/") for key in pod["metadata"]["labels"])


def test_a_rayjob_without_a_queue_has_no_kueue_labels_and_follows_spec_suspend() -> None:
    assert not any(k.startswith("kueue.x-k8s.io/") for k in training()["metadata"]["labels"])
    assert training()["spec"]["suspend"] is False
    assert training(spec__suspend=True)["spec"]["suspend"] is True


def test_the_evaluation_rayjob_is_queued_and_the_rayservices_are_not() -> None:
    services, rayjob = evaluation(spec__queueName="team-a")
    assert rayjob["spec"]["suspend"] is True and rayjob["metadata"]["labels"][QUEUE_LABEL] == "team-a"
    for service in services:
        assert not any(k.startswith("kueue.x-k8s.io/") for k in service["metadata"]["labels"])
    assert "suspend" not in evaluation()[1]["spec"]


def test_the_evaluation_of_a_finetunejob_gets_its_pod_template_and_queue() -> None:
    job = ftj(spec__podTemplate={"serviceAccountName": "ml-team-s3"}, spec__queueName="team-a",
              spec__workloadPriorityClassName="high",
              spec__evaluation={"dataset": {"uri": "s3://b/test.jsonl", "reference": "{mr}"},
                                "scorer": {"name": "viggo"}, "baselinePrompt": {"template": "{ref}"}})
    spec = evalbuilders.evaluation_evaljob(job, "meta-llama/Llama-2-7b-hf")["spec"]
    assert spec["podTemplate"] == {"serviceAccountName": "ml-team-s3"}
    assert (spec["queueName"], spec["workloadPriorityClassName"]) == ("team-a", "high")
