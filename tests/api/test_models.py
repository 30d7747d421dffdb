"""The pydantic API models: defaults, wire format, descriptions and unknown fields."""

from __future__ import annotations

import types
import typing
from pathlib import Path
from typing import Any

import pydantic
import pytest
import yaml
from pydantic.alias_generators import to_camel

from factories import evj_manifest, ftj_manifest, get_path, set_path
from kubetune.api.common import ApiModel, Toleration
from kubetune.api.errors import describe_validation_error
from kubetune.api.evaljob import EvalJob
from kubetune.api.finetunejob import FineTuneJob

VIGGO = Path(__file__).resolve().parents[2] / "examples" / "viggo" / "finetunejob.yaml"


def _rejection(body: dict[str, Any], model: type[FineTuneJob | EvalJob] = FineTuneJob) -> str:
    with pytest.raises(pydantic.ValidationError) as info:
        model.from_body(body)
    return describe_validation_error(info.value)


# --------------------------------------------------------------------------- defaults

# What a FineTuneJob gets when it only says what to train on (the issue's defaults, wire names).
DEFAULTS = {
    "hyperparameters.epochs": 10,
    "hyperparameters.perDeviceBatchSize": 16,
    "deepspeed.zeroStage": 3,
    "deepspeed.offloadOptimizer": "cpu",
    "deepspeed.offloadParams": "none",
    "deepspeed.precision": "bf16",
    "deepspeed.gradientCheckpointing": True,
    "resources.workers": 16,
    "resources.gpusPerWorker": 1,
    "resources.gpuType": "A10G",
    "dataset.maxLength": 512,
    "dataset.train.format": "jsonl",
    "output.keepCheckpoints": 1,
    "suspend": False,
}


@pytest.mark.parametrize(("path", "expected"), DEFAULTS.items(), ids=list(DEFAULTS))
def test_default(path, expected):
    spec = FineTuneJob.from_body(ftj_manifest()).spec.to_wire()
    assert get_path(spec, path) == expected


def test_default_tolerates_the_nvidia_gpu_taint():
    tolerations = FineTuneJob.from_body(ftj_manifest()).spec.resources.tolerations
    assert Toleration(key="nvidia.com/gpu", operator="Exists", effect="NoSchedule") in tolerations


def test_explicit_value_overrides_only_that_default():
    spec = FineTuneJob.from_body(ftj_manifest(spec__hyperparameters={"epochs": 3})).spec
    assert (spec.hyperparameters.epochs, spec.hyperparameters.per_device_batch_size) == (3, 16)


@pytest.mark.parametrize(("loss_on", "truncation", "expected"), [
    ("completion", None, "dropTruncated"), ("all", None, "truncate"), ("completion", "fail", "fail"),
    ("all", "dropTruncated", "dropTruncated")])
def test_truncation_defaults_by_loss_on_and_an_explicit_policy_wins(loss_on, truncation, expected):
    dataset = {"lossOn": loss_on} | ({"truncation": truncation} if truncation else {})
    spec = FineTuneJob.from_body(ftj_manifest(**{f"spec__dataset__{k}": v for k, v in dataset.items()})).spec
    assert spec.dataset.truncation_policy == expected


def test_nested_defaults_fill_a_partial_object():
    resources = FineTuneJob.from_body(ftj_manifest(spec__resources={"workers": 2})).spec.resources
    assert (resources.workers, resources.gpu_type, resources.worker.memory) == (2, "A10G", "48Gi")


# --------------------------------------------------------------------------- wire format


def _leaves(node: Any, prefix: str = "") -> list[tuple[str, Any]]:
    if isinstance(node, dict) and node:
        return [leaf for k, v in node.items() for leaf in _leaves(v, f"{prefix}.{k}" if prefix else k)]
    if isinstance(node, list) and node and all(isinstance(i, dict) for i in node):
        return [leaf for i, v in enumerate(node) for leaf in _leaves(v, f"{prefix}[{i}]")]
    return [(prefix, node)]


def test_camel_case_round_trip_is_lossless():
    manifest = yaml.safe_load(VIGGO.read_text())
    job = FineTuneJob.from_body(manifest)
    assert FineTuneJob.from_body(job.to_wire()) == job


def test_wire_form_keeps_every_field_as_written():
    manifest = yaml.safe_load(VIGGO.read_text())
    wire = FineTuneJob.from_body(manifest).to_wire()
    changed = [(path, value) for path, value in _leaves(manifest["spec"])
               if get_path(wire["spec"], path) != value]
    assert changed == []


def test_wire_form_omits_unset_optional_fields():
    wire = FineTuneJob.from_body(ftj_manifest()).spec.to_wire()
    assert "validationSplit" not in wire["dataset"] and "activeDeadlineSeconds" not in wire


def _models(root: type[pydantic.BaseModel]) -> list[type[pydantic.BaseModel]]:
    """Every model reachable from `root` through field annotations (Optional, list, dict, Annotated)."""
    seen: list[type[pydantic.BaseModel]] = []

    def visit(annotation: Any) -> None:
        if isinstance(annotation, type) and issubclass(annotation, pydantic.BaseModel):
            if annotation not in seen:
                seen.append(annotation)
                for field in annotation.model_fields.values():
                    visit(field.annotation)
            return
        origin = typing.get_origin(annotation)
        if origin is typing.Annotated:
            visit(typing.get_args(annotation)[0])
        elif origin is not None or isinstance(annotation, types.UnionType):
            for arg in typing.get_args(annotation):
                visit(arg)

    visit(root)
    return seen


MODELS = _models(FineTuneJob) + [m for m in _models(EvalJob) if m not in _models(FineTuneJob)]
FIELDS = [(model, name) for model in MODELS for name in model.model_fields]


def test_model_walk_reaches_nested_models():
    names = {m.__name__ for m in MODELS}
    assert {"Toleration", "SecretKeyReference", "EarlyStopping", "Condition", "CandidateModel"} <= names


@pytest.mark.parametrize(("model", "name"), FIELDS, ids=[f"{m.__name__}.{n}" for m, n in FIELDS])
def test_field_has_description(model, name):
    description = model.model_fields[name].description
    assert description and description.strip(), f"{model.__name__}.{name} needs a description (it becomes " \
                                                 "the CRD's field documentation in `kubectl explain`)"


# core/v1 fields whose Kubernetes spelling is not plain camelCase (podTemplate mirrors core/v1's names).
KUBERNETES_SPELLINGS = {"downward_api": "downwardAPI"}


@pytest.mark.parametrize(("model", "name"), FIELDS, ids=[f"{m.__name__}.{n}" for m, n in FIELDS])
def test_field_alias_is_camel_case(model, name):
    alias = model.model_fields[name].alias or name
    assert alias == KUBERNETES_SPELLINGS.get(name, to_camel(name)) and "_" not in alias


@pytest.mark.parametrize("model", MODELS, ids=[m.__name__ for m in MODELS])
def test_model_has_a_docstring(model):
    assert (model.__doc__ or "").strip()


def test_snake_case_field_name_is_rejected():
    body = ftj_manifest()
    body["spec"]["base_model"] = body["spec"].pop("baseModel")
    assert "spec.base_model" in _rejection(body)


# --------------------------------------------------------------------------- unknown fields

UNKNOWN = [
    "spec.hyperparameters.epoch",
    "spec.learningRate",
    "spec.dataset.train.path",
    "spec.dataset.template.system",
    "spec.deepspeed.stage",
    "spec.resources.tolerations[0].tolerationSeconds",
    "spec.output.bucket",
    "spec.baseModel.tokenSecretRef.namespace",
]


@pytest.mark.parametrize("path", UNKNOWN)
def test_unknown_field_is_rejected_by_name(path):
    body = set_path(ftj_manifest(spec__resources={"tolerations": [{"key": "k", "operator": "Exists"}]},
                                 spec__baseModel={"name": "m", "tokenSecretRef": {"name": "s", "key": "k"}}), path, 1)
    message = _rejection(body)
    assert f"{path}: Extra inputs are not permitted" in message


def test_unknown_evaljob_field_is_rejected_by_name():
    message = _rejection(set_path(evj_manifest(), "spec.scorer.metric", "f1"), EvalJob)
    assert "spec.scorer.metric: Extra inputs are not permitted" in message


def test_server_populated_metadata_is_ignored():
    body = ftj_manifest()
    body["metadata"].update(uid="1234", resourceVersion="7", creationTimestamp="2024-01-01T00:00:00Z",
                            managedFields=[{"manager": "kubectl"}], generation=3)
    job = FineTuneJob.from_body(body)
    assert (job.metadata.uid, job.metadata.generation) == ("1234", 3)


def test_unparseable_status_is_treated_as_empty():
    body = ftj_manifest()
    body["status"] = {"phase": "Exploded", "epochs": "many"}
    assert FineTuneJob.from_body(body).status.phase is None


def test_status_round_trips():
    body = ftj_manifest()
    body["status"] = {"phase": "Running", "startTime": "2024-01-01T00:00:00Z",
                      "progress": {"epoch": 2, "totalEpochs": 10, "valPerplexity": 1.7},
                      "conditions": [{"type": "Ready", "status": "False", "reason": "Training",
                                      "lastTransitionTime": "2024-01-01T00:00:00Z"}]}
    wire = FineTuneJob.from_body(body).status.to_wire()
    assert wire["progress"]["valPerplexity"] == 1.7 and wire["conditions"][0]["reason"] == "Training"


# --------------------------------------------------------------------------- EvalJob


def test_evaljob_candidate_names_must_be_unique():
    candidates = [{"name": "a", "model": {"name": "m1"}, "prompt": {"template": "{ref}"}},
                  {"name": "a", "model": {"name": "m2"}, "prompt": {"template": "{ref}"}}]
    assert "duplicate candidate names: a" in _rejection(evj_manifest(spec__candidates=candidates), EvalJob)


def test_evaljob_candidate_needs_exactly_one_model_source():
    candidates = [{"name": "a", "model": {"name": "m1", "uri": "s3://b/m"}}]
    message = _rejection(evj_manifest(spec__candidates=candidates), EvalJob)
    assert "spec.candidates[0].model" in message and "exactly one" in message


def test_api_models_share_the_base_config():
    assert all(issubclass(m, ApiModel) for m in MODELS)
