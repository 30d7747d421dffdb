"""spec.tracking: accepted as documented, and every bad value rejected twice (the model and the CRD), each
naming the field, before any pod starts."""

from __future__ import annotations

import copy
from typing import Any

import pydantic
import pytest

from factories import evj_manifest, ftj_manifest, set_path
from kubetune.api.errors import describe_validation_error
from kubetune.api.evaljob import EvalJob
from kubetune.api.finetunejob import FineTuneJob
from kubetune.api.tracking import TrackingSpec

FULL = {
    "mlflow": {"trackingUri": "https://mlflow.example.com", "experiment": "viggo",
               "credentialsSecretRef": {"name": "mlflow-creds", "usernameKey": "username", "passwordKey": "password"}},
    "wandb": {"project": "kubetune", "entity": "ml-team", "apiKeySecretRef": {"name": "wandb", "key": "api-key"},
              "mode": "online", "baseUrl": "https://wandb.example.com"},
    "tensorboard": {"logUri": "s3://bucket/tensorboard"},
}


@pytest.mark.parametrize("tracking", [
    FULL,
    {"mlflow": {"trackingUri": "databricks", "credentialsSecretRef": {"name": "dbx", "tokenKey": "token"}}},
    {"mlflow": {"trackingUri": "file:///mnt/mlruns"}},
    {"wandb": {"project": "kubetune", "mode": "offline"}},
    {"tensorboard": {}},
    {"tensorboard": {"logUri": "pvc://shared/tb"}},
], ids=["all-three", "databricks-token", "mlflow-file-store", "wandb-offline", "tensorboard-default",
        "tensorboard-pvc"])
def test_tracking_is_accepted_by_the_model_and_the_crd(ftj_validator: Any, tracking: dict[str, Any]) -> None:
    doc = ftj_manifest(spec__tracking=tracking)
    assert FineTuneJob.from_body(doc).spec.tracking is not None
    assert ftj_validator.errors(doc) == []


def test_an_evaljob_accepts_tracking(evj_validator: Any) -> None:
    doc = evj_manifest(spec__tracking=FULL)
    assert EvalJob.from_body(doc).spec.tracking == TrackingSpec.from_wire(FULL)
    assert evj_validator.errors(doc) == []


def test_tensorboard_log_uri_defaults_to_the_jobs_output() -> None:
    spec = TrackingSpec.from_wire({"tensorboard": {}}).with_defaults("s3://bucket/runs/viggo/")
    assert spec.tensorboard is not None and spec.tensorboard.log_uri == "s3://bucket/runs/viggo/tensorboard"


CREDS = "spec.tracking.mlflow.credentialsSecretRef"
# (id, path both messages name, layer, change to spec.tracking, hint)
BAD = [
    ("no-backend", "spec.tracking", "cel", {}, "at least one"),
    ("mlflow-ftp-uri", "spec.tracking.mlflow.trackingUri", "schema", {"mlflow": {"trackingUri": "ftp://host"}}, None),
    ("mlflow-relative-file-uri", "spec.tracking.mlflow.trackingUri", "schema",
     {"mlflow": {"trackingUri": "file:mlruns"}}, None),
    ("mlflow-username-without-password", CREDS, "cel",
     {"mlflow": {"trackingUri": "https://m.example.com",
                 "credentialsSecretRef": {"name": "m", "usernameKey": "user"}}}, "passwordKey"),
    ("mlflow-credentials-without-keys", CREDS, "cel",
     {"mlflow": {"trackingUri": "https://m.example.com", "credentialsSecretRef": {"name": "m"}}}, "tokenKey"),
    ("mlflow-secret-name-uppercase", f"{CREDS}.name", "schema",
     {"mlflow": {"trackingUri": "https://m.example.com",
                 "credentialsSecretRef": {"name": "MLflow_Creds", "tokenKey": "t"}}}, None),
    ("mlflow-secret-key-with-slash", f"{CREDS}.tokenKey", "schema",
     {"mlflow": {"trackingUri": "https://m.example.com",
                 "credentialsSecretRef": {"name": "m", "tokenKey": "a/b"}}}, None),
    ("wandb-project-with-slash", "spec.tracking.wandb.project", "schema", {"wandb": {"project": "team/proj"}}, None),
    ("wandb-mode-sometimes", "spec.tracking.wandb.mode", "schema",
     {"wandb": {"project": "p", "mode": "sometimes"}}, None),
    ("wandb-api-key-without-key", "spec.tracking.wandb.apiKeySecretRef.key", "schema",
     {"wandb": {"project": "p", "apiKeySecretRef": {"name": "wandb"}}}, None),
    ("tensorboard-pvc-claim-uppercase", "spec.tracking.tensorboard.logUri", "cel",
     {"tensorboard": {"logUri": "pvc://Shared/tb"}}, "DNS-1123"),
    ("typo-experiment-name", "spec.tracking.mlflow.experimentName", "unknown-field",
     {"mlflow": {"trackingUri": "https://m.example.com", "experimentName": "x"}}, None),
]


@pytest.mark.parametrize(("path", "tracking", "hint"), [(p, t, h) for _, p, _, t, h in BAD], ids=[b[0] for b in BAD])
def test_model_rejects_bad_tracking(path: str, tracking: dict[str, Any], hint: str | None) -> None:
    with pytest.raises(pydantic.ValidationError) as info:
        FineTuneJob.from_body(ftj_manifest(spec__tracking=tracking))
    message = describe_validation_error(info.value)
    assert path in message and (hint is None or hint in message), message


@pytest.mark.parametrize(("path", "layer", "tracking", "hint"), [(p, la, t, h) for _, p, la, t, h in BAD],
                         ids=[b[0] for b in BAD])
def test_crd_rejects_bad_tracking(request: Any, ftj_validator: Any, path: str, layer: str,
                                  tracking: dict[str, Any], hint: str | None) -> None:
    if layer == "cel":
        request.getfixturevalue("requires_cel")
    errors = ftj_validator.errors(ftj_manifest(spec__tracking=tracking))
    named = [e for e in errors if e.layer == layer and path in str(e) and (hint is None or hint in str(e))]
    assert named, "\n".join(map(str, errors)) or "(accepted)"


def test_tracking_warning_is_a_status_field_the_driver_may_write(ftj_validator: Any) -> None:
    doc = ftj_manifest()
    new = set_path(copy.deepcopy(doc), "status.trackingWarning", "experiment tracking: mlflow failed (...)")
    assert ftj_validator.errors(new, old=doc) == []
    assert ftj_validator.unknown_fields(new) == []
