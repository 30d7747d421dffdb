"""EvalJob builders: an EvalJob and its resolved plan in, the exact child objects out."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from factories import ROOT, evj, ftj
from kube_schema import schema_errors
from kubetune.api.evaljob import EvalJob
from kubetune.contract.evalplan import EvalPlan, cluster_base_url, plan, service_name
from kubetune.operator import builders, evalbuilders
from support.shared import kuberay_crd

BEST = "s3://bucket/runs/viggo/best"
GPT4 = {"endpoint": {"url": "https://api.openai.com/v1", "model": "gpt-4",
                     "apiKeySecretRef": {"name": "openai", "key": "api-key"}}}
CHAT_PROMPT = {"template": "Sentence: {ref}\nMeaning representation:", "chat": True}


def resolved(job: EvalJob, model_uris: dict[str, str] | None = None) -> EvalPlan:
    """The plan as the operator resolves it: the FineTuneJob `viggo` succeeded with checkpoint BEST."""
    uris = {c.name: c.model.uri or c.model.name or BEST for c in job.spec.candidates if c.model.served}
    uris.update(model_uris or {})
    urls = {c: cluster_base_url(service_name(job.metadata.name, c), "default") for c in uris}
    return plan(job, uris, {"viggo": ftj("viggo")}, urls)


def services(job: EvalJob) -> list[dict]:
    return [evalbuilders.ray_service(job, p) for p in resolved(job).candidates if p.served]


def service_of(job: EvalJob, candidate: str) -> dict:
    return next(s for s in services(job) if s["metadata"]["labels"][evalbuilders.LABEL_CANDIDATE] == candidate)


def rayjob_of(job: EvalJob) -> dict:
    return evalbuilders.eval_ray_job(job, evalbuilders.children(job), resolved(job))


def workers(service: dict) -> dict:
    return service["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]


def head_spec(obj: dict) -> dict:
    spec = obj["spec"]
    cluster = spec["rayClusterConfig"] if obj["kind"] == "RayService" else spec["rayClusterSpec"]
    return cluster["headGroupSpec"]["template"]["spec"]


def serve_app(service: dict) -> dict:
    (app,) = yaml.safe_load(service["spec"]["serveConfigV2"])["applications"]
    return app


with_gpt4 = {"spec__candidates": [
    {"name": "fine-tuned", "model": {"fineTuneJobRef": {"name": "viggo"}}},
    {"name": "gpt-4", "model": GPT4, "prompt": CHAT_PROMPT},
]}


# -- names -----------------------------------------------------------------------------------------


def test_child_names_are_deterministic() -> None:
    assert evalbuilders.children(evj()) == evalbuilders.children(evj(uid="other"))
    assert evalbuilders.children(evj()).model_dump() == {
        "ray_services": ["viggo-eval-fine-tuned", "viggo-eval-base"], "ray_job": "viggo-eval-eval",
        "config_map": "viggo-eval-eval-config", "service_account": "viggo-eval-evaluator"}


def test_endpoint_candidates_get_no_rayservice() -> None:
    assert evalbuilders.children(evj(**with_gpt4)).ray_services == ["viggo-eval-fine-tuned"]


def test_long_names_fit_kuberay_limits_and_stay_unique() -> None:
    long_a, long_b = "e" * 60 + "abc", "e" * 60 + "abd"
    candidates = [{"name": "c" * 30, "model": {"name": "org/model"}, "prompt": {"template": "{q}"}}]
    names_a = evalbuilders.children(evj(long_a, spec__candidates=candidates))
    names_b = evalbuilders.children(evj(long_b, spec__candidates=candidates))
    assert names_a.ray_job and names_b.ray_job and names_a.ray_job != names_b.ray_job
    assert len(names_a.ray_job) <= builders.MAX_RAYJOB_NAME
    assert names_a.ray_services != names_b.ray_services
    assert all(len(s) <= 40 for s in names_a.ray_services + names_b.ray_services)


# -- RayServices -----------------------------------------------------------------------------------


def test_serve_config_runs_the_kubetune_app_with_the_candidates_model() -> None:
    app = serve_app(service_of(evj(), "fine-tuned"))
    assert {k: app[k] for k in ("name", "import_path", "route_prefix")} == {
        "name": "fine-tuned", "import_path": "kubetune.serving.server:app_builder", "route_prefix": "/"}
    assert app["args"] == {"modelUri": BEST, "servedModelName": "fine-tuned", "engine": "vllm",
                           "maxBatchSize": 32, "numReplicas": 1, "numGpus": 1, "acceleratorType": "A10G"}


def test_serving_spec_reaches_the_serve_args() -> None:
    job = evj(spec__serving={"engine": "transformers", "replicas": 2, "gpusPerReplica": 2, "gpuType": "A100-80GB",
                             "maxBatchSize": 64, "maxModelLen": 4096})
    assert serve_app(service_of(job, "base"))["args"] == {
        "modelUri": "meta-llama/Llama-2-7b-hf", "servedModelName": "base", "engine": "transformers",
        "maxBatchSize": 64, "numReplicas": 2, "numGpus": 2, "acceleratorType": "A100-80G", "maxModelLen": 4096}


def test_gpu_type_ray_does_not_know_is_left_to_the_node_selector() -> None:
    service = service_of(evj(spec__serving={"gpuType": "NVIDIA-RTX-6000"}), "base")
    assert "acceleratorType" not in serve_app(service)["args"]
    assert workers(service)["template"]["spec"]["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-RTX-6000"}


def test_served_model_name_is_what_the_plan_sends() -> None:
    job = evj()
    for planned in resolved(job).candidates:
        assert serve_app(evalbuilders.ray_service(job, planned))["args"]["servedModelName"] == planned.model


def test_workers_request_gpus_on_the_gpu_pool() -> None:
    group = workers(service_of(evj(spec__serving={"replicas": 3, "gpuType": "H100",
                                                  "nodeSelector": {"pool": "serve"}}), "base"))
    pod = group["template"]["spec"]
    assert group["replicas"] == group["minReplicas"] == group["maxReplicas"] == 3
    assert pod["containers"][0]["resources"]["limits"] == {"cpu": "8", "memory": "32Gi", "nvidia.com/gpu": "1"}
    assert pod["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3", "pool": "serve"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]


def test_head_has_no_gpus_and_exposes_the_serve_port() -> None:
    service = service_of(evj(), "base")
    head = service["spec"]["rayClusterConfig"]["headGroupSpec"]
    container = head["template"]["spec"]["containers"][0]
    assert "nvidia.com/gpu" not in container["resources"]["limits"]
    assert (head["rayStartParams"]["num-gpus"], head["rayStartParams"]["num-cpus"]) == ("0", "0")
    assert {"containerPort": 8000, "name": "serve"} in container["ports"]


def test_cpu_serving_asks_for_no_gpu_at_all() -> None:
    service = service_of(evj(spec__serving={"gpusPerReplica": 0, "engine": "transformers"}), "base")
    pod = workers(service)["template"]["spec"]
    assert "nvidia.com/gpu" not in pod["containers"][0]["resources"]["limits"]
    assert pod["nodeSelector"] == {}
    assert "acceleratorType" not in serve_app(service)["args"]


def test_rayservices_are_labelled_and_owned_by_the_evaljob() -> None:
    for service in services(evj()):
        (owner,) = service["metadata"]["ownerReferences"]
        assert owner == {"apiVersion": "kubetune.io/v1alpha1", "kind": "EvalJob", "name": "viggo-eval",
                         "uid": "evj-uid-1", "controller": True, "blockOwnerDeletion": True}
        labels = service["metadata"]["labels"]
        assert labels["kubetune.io/evaljob"] == "viggo-eval"
        assert labels["app.kubernetes.io/managed-by"] == "kubetune-operator"
        assert service["metadata"]["name"] == service_name("viggo-eval", labels["kubetune.io/candidate"])


def test_pvc_model_is_mounted_under_pvc_root_in_every_serving_pod() -> None:
    service = service_of(evj(spec__candidates=[{"name": "local", "model": {"uri": "pvc://models/llama/7b"},
                                                "prompt": {"template": "{ref}"}}]), "local")
    assert serve_app(service)["args"]["modelUri"] == "pvc://models/llama/7b"
    for pod in (head_spec(service), workers(service)["template"]["spec"]):
        assert {"name": "kubetune-pvc-0", "persistentVolumeClaim": {"claimName": "models"}} in pod["volumes"]
        assert {"name": "kubetune-pvc-0", "mountPath": "/mnt/pvc/models"} in pod["containers"][0]["volumeMounts"]
        assert {"name": "KUBETUNE_PVC_ROOT", "value": "/mnt/pvc"} in pod["containers"][0]["env"]


# -- the evaluation RayJob -------------------------------------------------------------------------


def test_evaluation_runs_the_evaluator_with_the_mounted_plan() -> None:
    rayjob = rayjob_of(evj())
    assert rayjob["metadata"]["name"] == "viggo-eval-eval"
    assert rayjob["spec"]["entrypoint"] == "python -m kubetune.serving.evaluate --plan /etc/kubetune/plan.json"
    assert rayjob["spec"]["shutdownAfterJobFinishes"] is True
    pod = head_spec(rayjob)
    assert {"name": "kubetune-config", "configMap": {"name": "viggo-eval-eval-config"}} in pod["volumes"]
    assert {"name": "kubetune-config", "mountPath": "/etc/kubetune", "readOnly": True} in (
        pod["containers"][0]["volumeMounts"])


def test_evaluation_cluster_is_head_only_on_cpu_with_the_serving_image() -> None:
    rayjob = rayjob_of(evj(spec__serving={"image": "registry/kubetune:1", "head": {"cpu": "4", "memory": "16Gi"}}))
    cluster = rayjob["spec"]["rayClusterSpec"]
    assert "workerGroupSpecs" not in cluster
    container = head_spec(rayjob)["containers"][0]
    assert container["image"] == "registry/kubetune:1"
    assert container["resources"]["limits"] == {"cpu": "4", "memory": "16Gi"}


def test_evaluator_reports_to_its_evaljob_as_the_evaljobs_own_account() -> None:
    pod = head_spec(rayjob_of(evj()))
    env = {e["name"]: e for e in pod["containers"][0]["env"]}
    assert pod["serviceAccountName"] == "viggo-eval-evaluator"
    assert "automountServiceAccountToken" not in pod  # it patches the EvalJob's status
    assert env["KUBETUNE_EVALJOB"]["value"] == "viggo-eval"
    assert env["KUBETUNE_NAMESPACE"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.namespace"}}
    assert "HF_TOKEN" not in env


def test_api_key_comes_from_the_secret_into_the_planned_variable() -> None:
    job = evj(**with_gpt4)
    (gpt4,) = [c for c in resolved(job).candidates if c.name == "gpt-4"]
    env = head_spec(rayjob_of(job))["containers"][0]["env"]
    assert gpt4.api_key_env == "KUBETUNE_API_KEY_GPT_4"
    assert {"name": "KUBETUNE_API_KEY_GPT_4",
            "valueFrom": {"secretKeyRef": {"name": "openai", "key": "api-key", "optional": True}}} in env


def test_evaluator_mounts_the_claims_of_dataset_few_shot_and_output() -> None:
    baseline = {"name": "base", "model": {"name": "org/model"},
                "prompt": {"template": "{ref}", "fewShot": {"k": 2, "source": {"uri": "pvc://shots/a"}}}}
    job = evj(spec__dataset__uri="pvc://data/viggo/test.jsonl", spec__output__uri="pvc://runs/eval",
              spec__candidates=[baseline])
    assert evalbuilders.evaluator_claims(job) == ["data", "shots", "runs"]
    mounts = {m["mountPath"] for m in head_spec(rayjob_of(job))["containers"][0]["volumeMounts"]}
    assert {"/mnt/pvc/data", "/mnt/pvc/shots", "/mnt/pvc/runs"} <= mounts


def test_rayjob_is_owned_and_labelled_for_the_evaljob_follower() -> None:
    rayjob = rayjob_of(evj())
    assert rayjob["metadata"]["labels"]["kubetune.io/evaljob"] == "viggo-eval"
    assert builders.LABEL_JOB not in rayjob["metadata"]["labels"]  # the FineTuneJob follower ignores it
    assert rayjob["metadata"]["ownerReferences"][0]["uid"] == "evj-uid-1"


def test_plan_config_map_round_trips_to_the_plan() -> None:
    job = evj()
    expected = resolved(job)
    config = evalbuilders.plan_config_map(job, evalbuilders.children(job), expected)
    assert config["metadata"]["name"] == "viggo-eval-eval-config"
    assert EvalPlan.from_wire(json.loads(config["data"]["plan.json"])) == expected


# -- against the KubeRay CRDs ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def rayservice_crd() -> dict:
    return kuberay_crd("rayservices")


@pytest.fixture(scope="module")
def rayjob_crd() -> dict:
    return kuberay_crd("rayjobs")


SPECS = {
    "defaults": {},
    "h100-x2": {"spec__serving": {"replicas": 2, "gpusPerReplica": 2, "gpuType": "H100", "maxModelLen": 8192}},
    "cpu": {"spec__serving": {"gpusPerReplica": 0, "engine": "transformers"}},
    "pvc": {"spec__candidates": [{"name": "local", "model": {"uri": "pvc://models/llama"},
                                  "prompt": {"template": "{ref}"}}],
            "spec__dataset__uri": "pvc://data/test.jsonl", "spec__output__uri": "pvc://runs/eval"},
    "endpoint": with_gpt4,
    "ttl": {"spec__ttlSecondsAfterFinished": 600},
}


@pytest.mark.parametrize("spec", SPECS.values(), ids=SPECS.keys())
def test_rayservices_validate_against_kuberay_crd(rayservice_crd: dict, spec: dict) -> None:
    for service in services(evj(**spec)):
        assert schema_errors(service, rayservice_crd) == []


@pytest.mark.parametrize("spec", SPECS.values(), ids=SPECS.keys())
def test_evaluation_rayjob_validates_against_kuberay_crd(rayjob_crd: dict, spec: dict) -> None:
    assert schema_errors(rayjob_of(evj(**spec)), rayjob_crd) == []


# -- FineTuneJob.spec.evaluation and the trainer's permissions -------------------------------------


EVALUATION = {"dataset": {"uri": "s3://bucket/viggo/test.jsonl", "reference": "{mr}"}, "scorer": {"name": "viggo"},
              "baselinePrompt": {"template": "Sentence: {ref}\nMeaning representation:",
                                 "fewShot": {"k": 3}},
              "gate": {"candidate": "fine-tuned", "beats": [{"candidate": "base-few-shot"}]}}


def test_evaluation_evaljob_is_owned_by_the_finetunejob_and_valid() -> None:
    owner = ftj(spec__evaluation=EVALUATION)
    manifest = evalbuilders.evaluation_evaljob(owner, "meta-llama/Llama-2-7b-hf")
    assert manifest["metadata"]["name"] == "viggo-eval"
    assert manifest["metadata"]["ownerReferences"] == [builders.owner_reference(owner)]
    assert [c["name"] for c in manifest["spec"]["candidates"]] == ["fine-tuned", "base-few-shot"]
    crd = yaml.safe_load((Path(ROOT) / "crds" / "kubetune.io_evaljobs.yaml").read_text())
    assert schema_errors(manifest, crd) == []



def test_the_evaluator_identity_may_only_read_and_patch_its_own_evaljobs_status() -> None:
    job = evj()
    sa, role, binding = evalbuilders.evaluator_identity(job, evalbuilders.children(job))
    assert sa["metadata"]["name"] == role["metadata"]["name"] == "viggo-eval-evaluator"
    assert role["rules"] == [{"apiGroups": ["kubetune.io"], "resources": ["evaljobs/status"],
                              "resourceNames": ["viggo-eval"], "verbs": ["get", "patch"]}]
    assert binding["subjects"][0]["name"] == "viggo-eval-evaluator"
    assert all(o["metadata"]["ownerReferences"] == [evalbuilders.owner_reference(job)] for o in (sa, role, binding))


def test_serving_pods_run_as_the_evaljobs_account_without_an_api_token() -> None:
    job = evj()
    names = evalbuilders.children(job)
    cluster = services(job)[0]["spec"]["rayClusterConfig"]
    for pod in (cluster["headGroupSpec"]["template"]["spec"], cluster["workerGroupSpecs"][0]["template"]["spec"]):
        assert pod["serviceAccountName"] == names.service_account
        assert pod["automountServiceAccountToken"] is False


def test_a_gated_candidates_token_reaches_its_serving_pods_only() -> None:
    job = evj(**{"spec__candidates[1]__model__tokenSecretRef": {"name": "hf", "key": "token"}})
    token = {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf", "key": "token"}}}
    for service in services(job):
        cluster = service["spec"]["rayClusterConfig"]
        for pod in (cluster["headGroupSpec"]["template"]["spec"], cluster["workerGroupSpecs"][0]["template"]["spec"]):
            gated = service["metadata"]["labels"][evalbuilders.LABEL_CANDIDATE] == "base"
            assert (token in pod["containers"][0]["env"]) is gated
    evaluator = {e["name"] for e in head_spec(rayjob_of(job))["containers"][0]["env"]}
    assert "HF_TOKEN" not in evaluator


def test_a_named_service_account_serves_and_evaluates_and_gets_the_status_role() -> None:
    job = evj(spec__podTemplate={"serviceAccountName": "ml-team-s3"})
    names = evalbuilders.children(job)
    objects = evalbuilders.evaluator_identity(job, names)
    assert [o["kind"] for o in objects] == ["Role", "RoleBinding"]
    assert objects[1]["subjects"][0]["name"] == "ml-team-s3"
    assert head_spec(rayjob_of(job))["serviceAccountName"] == "ml-team-s3"
    cluster = services(job)[0]["spec"]["rayClusterConfig"]
    assert cluster["workerGroupSpecs"][0]["template"]["spec"]["serviceAccountName"] == "ml-team-s3"
