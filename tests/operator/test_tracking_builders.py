"""spec.tracking in the children the operator builds: the credentials reach the pods that log (Ray head and
workers of the training, the evaluator) as secretKeyRefs, never as values, and every object still validates
against KubeRay's and kubetune's CRDs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from factories import ROOT, evj, ftj
from kube_schema import schema_errors
from kubetune.contract.evalplan import cluster_base_url, plan, service_name
from kubetune.operator import builders, evalbuilders
from support.shared import kuberay_crd

TRACKING = {
    "mlflow": {"trackingUri": "https://mlflow.example.com",
               "credentialsSecretRef": {"name": "mlflow-creds", "usernameKey": "user", "passwordKey": "pass"}},
    "wandb": {"project": "kubetune", "apiKeySecretRef": {"name": "wandb", "key": "api-key"}},
    "tensorboard": {"logUri": "pvc://tensorboard/runs"},
}
EXPECTED_ENV = [
    {"name": "MLFLOW_TRACKING_USERNAME",
     "valueFrom": {"secretKeyRef": {"name": "mlflow-creds", "key": "user", "optional": True}}},
    {"name": "MLFLOW_TRACKING_PASSWORD",
     "valueFrom": {"secretKeyRef": {"name": "mlflow-creds", "key": "pass", "optional": True}}},
    {"name": "WANDB_API_KEY", "valueFrom": {"secretKeyRef": {"name": "wandb", "key": "api-key", "optional": True}}},
]
TRACKING_ENVS = {e["name"] for e in EXPECTED_ENV} | {"MLFLOW_TRACKING_TOKEN"}


@pytest.fixture(scope="module")
def rayjob_crd() -> dict[str, Any]:
    return kuberay_crd("rayjobs")


def training_pods(rayjob: dict[str, Any]) -> dict[str, dict[str, Any]]:
    cluster = rayjob["spec"]["rayClusterSpec"]
    return {"head": cluster["headGroupSpec"]["template"]["spec"],
            "worker": cluster["workerGroupSpecs"][0]["template"]["spec"],
            "submitter": rayjob["spec"]["submitterPodTemplate"]["spec"]}


def tracking_env(pod: dict[str, Any]) -> list[dict[str, Any]]:
    (container,) = pod["containers"]
    return [e for e in container.get("env", []) if e["name"] in TRACKING_ENVS]


def tracked_rayjob() -> dict[str, Any]:
    job = ftj(spec__tracking=TRACKING)
    return builders.ray_job(job, builders.children(job))


@pytest.mark.parametrize("pod", ["head", "worker"])
def test_training_pods_get_the_credentials_from_the_secrets(pod: str) -> None:
    assert tracking_env(training_pods(tracked_rayjob())[pod]) == EXPECTED_ENV


def test_the_submitter_gets_no_credentials() -> None:
    assert tracking_env(training_pods(tracked_rayjob())["submitter"]) == []


def test_a_token_secret_becomes_the_mlflow_token() -> None:
    job = ftj(spec__tracking={"mlflow": {"trackingUri": "databricks",
                                         "credentialsSecretRef": {"name": "dbx", "tokenKey": "token"}}})
    head = training_pods(builders.ray_job(job, builders.children(job)))["head"]
    assert tracking_env(head) == [{"name": "MLFLOW_TRACKING_TOKEN",
                                   "valueFrom": {"secretKeyRef": {"name": "dbx", "key": "token", "optional": True}}}]


def test_no_tracking_no_credentials() -> None:
    job = ftj()
    assert all(tracking_env(p) == [] for p in training_pods(builders.ray_job(job, builders.children(job))).values())


def test_the_tensorboard_claim_is_mounted_where_pvc_uris_resolve() -> None:
    worker = training_pods(tracked_rayjob())["worker"]
    claims = {v["persistentVolumeClaim"]["claimName"] for v in worker["volumes"] if "persistentVolumeClaim" in v}
    assert "tensorboard" in claims
    assert f"{builders.PVC_ROOT}/tensorboard" in {m["mountPath"] for m in worker["containers"][0]["volumeMounts"]}


def test_the_config_map_carries_spec_tracking_to_the_trainer() -> None:
    job = ftj(spec__tracking=TRACKING)
    document = yaml.safe_load(builders.config_map(job, builders.children(job))["data"][builders.CONFIG_KEY])
    assert document["spec"]["tracking"]["wandb"]["apiKeySecretRef"] == {"name": "wandb", "key": "api-key"}
    assert document["metadata"]["uid"] == "uid-1"  # the run's key


def test_tracked_rayjob_validates_against_kuberay_crd(rayjob_crd: dict[str, Any]) -> None:
    assert schema_errors(tracked_rayjob(), rayjob_crd) == []


# -- the evaluation ----------------------------------------------------------------------------------


def evaluation_rayjob(**paths: Any) -> dict[str, Any]:
    job = evj(**paths)
    uris = {c.name: c.model.uri or c.model.name or "s3://bucket/runs/viggo/best"
            for c in job.spec.candidates if c.model.served}
    urls = {c: cluster_base_url(service_name(job.metadata.name, c), "default") for c in uris}
    resolved = plan(job, uris, {"viggo": ftj("viggo")}, urls)
    return evalbuilders.eval_ray_job(job, evalbuilders.children(job), resolved)


def test_the_evaluator_gets_the_credentials_from_the_secrets(rayjob_crd: dict[str, Any]) -> None:
    rayjob = evaluation_rayjob(spec__tracking=TRACKING)
    head = rayjob["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    assert tracking_env(head) == EXPECTED_ENV
    assert "tensorboard" in {v["persistentVolumeClaim"]["claimName"] for v in head["volumes"]
                             if "persistentVolumeClaim" in v}
    assert schema_errors(rayjob, rayjob_crd) == []


EVALUATION = {"dataset": {"uri": "s3://bucket/viggo/test.jsonl", "reference": "{mr}"}, "scorer": {"name": "viggo"},
              "baselinePrompt": {"template": "Sentence: {ref}\nMeaning representation:"}}


def test_spec_evaluation_carries_tracking_with_the_trainings_tensorboard_folder() -> None:
    owner = ftj(spec__evaluation=EVALUATION, spec__tracking={**TRACKING, "tensorboard": {}})
    manifest = evalbuilders.evaluation_evaljob(owner, "meta-llama/Llama-2-7b-hf")
    assert manifest["spec"]["tracking"]["tensorboard"] == {"logUri": "s3://bucket/runs/viggo/tensorboard"}
    assert manifest["spec"]["tracking"]["mlflow"] == {**TRACKING["mlflow"], "experiment": "kubetune"}
    crd = yaml.safe_load((Path(ROOT) / "crds" / "kubetune.io_evaljobs.yaml").read_text())
    assert schema_errors(manifest, crd) == []
