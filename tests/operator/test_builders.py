"""Builders: a FineTuneJob in, the exact child objects out."""

from __future__ import annotations

import pytest
import yaml

from factories import ftj
from kube_schema import schema_errors
from kubetune.api.finetunejob import FineTuneJob
from kubetune.operator import builders
from support.shared import kuberay_crd


@pytest.fixture(scope="module")
def rayjob_crd() -> dict:
    return kuberay_crd("rayjobs")


def worker_group(rayjob: dict) -> dict:
    return rayjob["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]


def test_child_names_are_deterministic() -> None:
    assert builders.children(ftj("viggo")) == builders.children(ftj("viggo", uid="other"))


def test_rayjob_name_fits_kuberay_limit_and_stays_unique() -> None:
    long_a, long_b = "a" * 60 + "xyz", "a" * 60 + "xyw"
    name_a = builders.children(ftj(long_a)).ray_job
    name_b = builders.children(ftj(long_b)).ray_job
    assert name_a and name_b
    assert len(name_a) <= builders.MAX_RAYJOB_NAME and len(name_b) <= builders.MAX_RAYJOB_NAME
    assert name_a != name_b


@pytest.mark.parametrize("spec", [
    {},
    {"resources__workers": 2, "resources__gpusPerWorker": 4, "resources__gpuType": "H100"},
    {"deepspeed__configMapRef": {"name": "ds", "key": "zero3.json"}, "suspend": True,
     "activeDeadlineSeconds": 3600, "preRunningDeadlineSeconds": 600, "backoffLimit": 2,
     "ttlSecondsAfterFinished": 60},
    {"baseModel": {"uri": "pvc://models/llama"}, "output__uri": "pvc://runs/out"},
    {"baseModel": {"name": "meta-llama/Llama-2-7b-hf", "tokenSecretRef": {"name": "hf", "key": "token"}}},
], ids=["defaults", "h100", "everything", "pvc", "gated"])
def test_rayjob_validates_against_kuberay_crd(rayjob_crd: dict, spec: dict) -> None:
    job = ftj(**{f"spec__{k}": v for k, v in spec.items()})
    assert schema_errors(builders.ray_job(job, builders.children(job)), rayjob_crd) == []


def test_worker_group_requests_gpus_on_the_gpu_pool() -> None:
    group = worker_group(builders.ray_job(ftj(), builders.children(ftj())))
    pod = group["template"]["spec"]
    assert group["replicas"] == group["minReplicas"] == group["maxReplicas"] == 16
    assert pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert pod["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-A10G"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]


def test_head_group_has_no_gpus() -> None:
    head = builders.ray_job(ftj(), builders.children(ftj()))["spec"]["rayClusterSpec"]["headGroupSpec"]
    assert "nvidia.com/gpu" not in head["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert head["rayStartParams"]["num-gpus"] == "0"


def test_extra_node_selector_is_merged_with_gpu_label() -> None:
    job = ftj(spec__resources__nodeSelector={"pool": "train"})
    pod = worker_group(builders.ray_job(job, builders.children(job)))["template"]["spec"]
    assert pod["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-A10G", "pool": "train"}


def test_unknown_gpu_type_is_used_as_the_label_value() -> None:
    job = ftj(spec__resources__gpuType="NVIDIA-RTX-6000")
    assert builders.worker_node_selector(job) == {"nvidia.com/gpu.product": "NVIDIA-RTX-6000"}


def test_lifecycle_fields_pass_through_to_the_rayjob() -> None:
    job = ftj(spec__suspend=True, spec__activeDeadlineSeconds=7200, spec__backoffLimit=3,
              spec__preRunningDeadlineSeconds=900, spec__ttlSecondsAfterFinished=120)
    spec = builders.ray_job(job, builders.children(job))["spec"]
    assert spec["suspend"] is True
    assert spec["shutdownAfterJobFinishes"] is True
    assert (spec["activeDeadlineSeconds"], spec["backoffLimit"]) == (7200, 3)
    assert (spec["preRunningDeadlineSeconds"], spec["ttlSecondsAfterFinished"]) == (900, 120)


def test_entrypoint_runs_the_trainer_with_the_mounted_config() -> None:
    rayjob = builders.ray_job(ftj(), builders.children(ftj()))
    assert rayjob["spec"]["entrypoint"] == "python -m kubetune.trainer --config /etc/kubetune/finetunejob.yaml"
    head = rayjob["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    assert {"name": "kubetune-config", "configMap": {"name": "viggo-trainer-config"}} in head["volumes"]


def test_children_are_owned_by_the_finetunejob() -> None:
    job = ftj()
    for child in (builders.ray_job(job, builders.children(job)), builders.config_map(job, builders.children(job))):
        (owner,) = child["metadata"]["ownerReferences"]
        assert owner == {"apiVersion": "kubetune.io/v1alpha1", "kind": "FineTuneJob", "name": "viggo",
                         "uid": "uid-1", "controller": True, "blockOwnerDeletion": True}


def test_config_map_round_trips_to_the_same_spec() -> None:
    job = ftj()
    document = builders.config_map(job, builders.children(job))["data"][builders.CONFIG_KEY]
    assert FineTuneJob.from_body(yaml.safe_load(document)).spec == job.spec


def test_config_map_resolves_finetunejob_ref_to_a_uri() -> None:
    job = ftj(spec__baseModel={"fineTuneJobRef": {"name": "mathqa"}})
    document = builders.config_map(job, builders.children(job), base_model_uri="s3://b/mathqa/best")
    assert yaml.safe_load(document["data"][builders.CONFIG_KEY])["spec"]["baseModel"] == {
        "uri": "s3://b/mathqa/best"}


def test_pvc_uris_become_volumes_mounted_under_pvc_root() -> None:
    job = ftj(spec__baseModel={"uri": "pvc://models/llama-2-7b"}, spec__output__uri="pvc://runs/viggo")
    pod = worker_group(builders.ray_job(job, builders.children(job)))["template"]["spec"]
    claims = {v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"] if "persistentVolumeClaim" in v}
    mounts = {m["mountPath"] for m in pod["containers"][0]["volumeMounts"]}
    assert claims == {"models", "runs"}
    assert {"/mnt/pvc/models", "/mnt/pvc/runs"} <= mounts


def test_gated_model_token_comes_from_the_secret() -> None:
    job = ftj(spec__baseModel={"name": "meta-llama/Llama-2-7b-hf", "tokenSecretRef": {"name": "hf", "key": "t"}})
    env = worker_group(builders.ray_job(job, builders.children(job)))["template"]["spec"]["containers"][0]["env"]
    assert {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf", "key": "t"}}} in env


def test_pods_know_which_job_to_report_progress_to() -> None:
    job = ftj()
    rayjob = builders.ray_job(job, builders.children(job))
    head = rayjob["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    env = {e["name"]: e for e in head["containers"][0]["env"]}
    assert head["serviceAccountName"] == "viggo-trainer"
    assert env["KUBETUNE_FINETUNEJOB"]["value"] == "viggo"
    assert env["KUBETUNE_NAMESPACE"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.namespace"}}


def test_the_trainer_identity_may_only_read_and_patch_its_own_jobs_status() -> None:
    job = ftj(namespace="team-a")
    sa, role, binding = builders.trainer_identity(job, builders.children(job))
    assert sa["kind"] == "ServiceAccount" and sa["metadata"]["name"] == "viggo-trainer"
    assert role["rules"] == [{"apiGroups": ["kubetune.io"], "resources": ["finetunejobs/status"],
                              "resourceNames": ["viggo"], "verbs": ["get", "patch"]}]
    assert binding["roleRef"]["name"] == "viggo-trainer"
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "viggo-trainer", "namespace": "team-a"}]
    assert all(o["metadata"]["ownerReferences"] == [builders.owner_reference(job)] for o in (sa, role, binding))


def test_a_named_service_account_gets_the_status_role_and_no_account_is_created() -> None:
    """A cloud identity (IRSA, Workload Identity) is a ServiceAccount the user made: it is used, never made."""
    job = ftj(spec__podTemplate={"serviceAccountName": "ml-team-s3"})
    names = builders.children(job)
    objects = builders.trainer_identity(job, names)
    assert [o["kind"] for o in objects] == ["Role", "RoleBinding"]
    assert objects[1]["subjects"] == [{"kind": "ServiceAccount", "name": "ml-team-s3", "namespace": "default"}]
    cluster = builders.ray_job(job, names)["spec"]["rayClusterSpec"]
    assert cluster["headGroupSpec"]["template"]["spec"]["serviceAccountName"] == "ml-team-s3"
    assert cluster["workerGroupSpecs"][0]["template"]["spec"]["serviceAccountName"] == "ml-team-s3"
