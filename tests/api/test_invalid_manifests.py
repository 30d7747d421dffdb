"""Bad FineTuneJobs are rejected twice, each time naming the offending field.

1. By the pydantic model (`FineTuneJob.from_body`), as the operator and `kubetune validate` see it,
   turned into one line by `describe_validation_error`.
2. By the CRD, as the apiserver sees it (see conftest.CrdValidator): the OpenAPI schema for
   schema-expressible mistakes, and the CEL `x-kubernetes-validations` for cross-field ones.

Cases the CRD cannot catch yet are strict xfails of the CRD test, with the fix in the reason: when the
generator learns to express them the test turns XPASS, fails, and the mark must go.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import pydantic
import pytest

from factories import del_path, evj_manifest, ftj_manifest, set_path
from kubetune.api.errors import describe_validation_error
from kubetune.api.finetunejob import FineTuneJob, FineTuneJobSpec


@dataclass(frozen=True)
class Case:
    id: str
    field: str  # the path both error messages must name
    layer: str  # where the apiserver rejects it: schema | unknown-field | metadata | cel | list-type
    set: dict[str, Any] = field(default_factory=dict)
    unset: tuple[str, ...] = ()
    hint: str | None = None  # a second word the messages must contain (cross-field rules)
    crd_gap: str | None = None  # why the CRD accepts it today, and the fix

    def manifest(self) -> dict[str, Any]:
        doc = ftj_manifest()
        for path in self.unset:
            del_path(doc, path)
        for path, value in self.set.items():
            set_path(doc, path, value)
        return doc


HF = "meta-llama/Llama-2-7b-hf"
SECRET = {"name": "hf-token", "key": "token"}

CASES = [
    # --- base model
    Case("missing-base-model", "spec.baseModel", "schema", unset=("spec.baseModel",)),
    Case("two-base-model-sources", "spec.baseModel", "cel", hint="exactly one",
         set={"spec.baseModel": {"name": HF, "uri": "s3://models/llama"}}),
    Case("no-base-model-source", "spec.baseModel", "cel", hint="exactly one", set={"spec.baseModel": {}}),
    Case("token-secret-with-uri", "spec.baseModel", "cel", hint="tokenSecretRef",
         set={"spec.baseModel": {"uri": "s3://models/llama", "tokenSecretRef": SECRET}}),
    Case("token-secret-without-key", "spec.baseModel.tokenSecretRef.key", "schema",
         set={"spec.baseModel.tokenSecretRef": {"name": "hf-token"}}),
    # --- hyperparameters
    Case("zero-epochs", "spec.hyperparameters.epochs", "schema", set={"spec.hyperparameters.epochs": 0}),
    Case("epochs-not-a-number", "spec.hyperparameters.epochs", "schema",
         set={"spec.hyperparameters.epochs": "ten"}),
    Case("negative-learning-rate", "spec.hyperparameters.learningRate", "schema",
         set={"spec.hyperparameters.learningRate": -5e-6}),
    Case("zero-learning-rate", "spec.hyperparameters.learningRate", "schema",
         set={"spec.hyperparameters.learningRate": 0.0}),
    Case("typo-epoch", "spec.hyperparameters.epoch", "unknown-field", set={"spec.hyperparameters.epoch": 3}),
    # --- deepspeed
    Case("zero-stage-4", "spec.deepspeed.zeroStage", "schema", set={"spec.deepspeed.zeroStage": 4}),
    Case("offload-params-with-zero-2", "spec.deepspeed", "cel", hint="offloadParams",
         set={"spec.deepspeed": {"zeroStage": 2, "offloadParams": "cpu"}}),
    Case("offload-optimizer-with-zero-0", "spec.deepspeed", "cel", hint="offloadOptimizer",
         set={"spec.deepspeed": {"zeroStage": 0, "offloadOptimizer": "cpu"}}),
    Case("precision-int8", "spec.deepspeed.precision", "schema", set={"spec.deepspeed.precision": "int8"}),
    # --- dataset
    Case("validation-and-split", "spec.dataset", "cel", hint="validationSplit",
         set={"spec.dataset.validationSplit": 0.1}),
    Case("neither-validation-nor-split", "spec.dataset", "cel", hint="validationSplit",
         unset=("spec.dataset.validation",)),
    Case("validation-split-0.7", "spec.dataset.validationSplit", "schema",
         unset=("spec.dataset.validation",), set={"spec.dataset.validationSplit": 0.7}),
    Case("validation-split-0", "spec.dataset.validationSplit", "schema",
         unset=("spec.dataset.validation",), set={"spec.dataset.validationSplit": 0.0}),
    Case("max-length-8", "spec.dataset.maxLength", "schema", set={"spec.dataset.maxLength": 8}),
    Case("format-parquet", "spec.dataset.train.format", "schema", set={"spec.dataset.train.format": "parquet"}),
    Case("train-without-uri", "spec.dataset.train.uri", "schema", unset=("spec.dataset.train.uri",)),
    Case("jsonl-without-prompt", "spec.dataset", "cel", hint="template.prompt",
         unset=("spec.dataset.template.prompt",)),
    Case("jsonl-without-completion", "spec.dataset", "cel", hint="template.completion",
         unset=("spec.dataset.template.completion",)),
    Case("empty-placeholder", "spec.dataset.template.prompt", "cel",
         set={"spec.dataset.template.prompt": "<START_Q>{}<END_Q>"}),
    Case("placeholder-with-space", "spec.dataset.template.prompt", "cel",
         set={"spec.dataset.template.prompt": "<START_Q>{a b}<END_Q>"}),
    Case("unclosed-placeholder", "spec.dataset.template.completion", "cel",
         set={"spec.dataset.template.completion": "<START_A>{mr"}),
    Case("truncate-with-completion-loss", "spec.dataset", "cel", hint="truncation",
         set={"spec.dataset.lossOn": "completion", "spec.dataset.truncation": "truncate"}),
    Case("truncation-unknown", "spec.dataset.truncation", "schema", set={"spec.dataset.truncation": "cut"}),
    Case("duplicate-special-tokens", "spec.dataset.template.specialTokens", "list-type",
         set={"spec.dataset.template.specialTokens": ["<START_Q>", "<END_Q>", "<START_Q>"]}),
    # --- resources
    Case("zero-workers", "spec.resources.workers", "schema", set={"spec.resources.workers": 0}),
    Case("17-gpus-per-worker", "spec.resources.gpusPerWorker", "schema", set={"spec.resources.gpusPerWorker": 17}),
    Case("memory-lots", "spec.resources.worker.memory", "schema",
         set={"spec.resources.worker": {"cpu": "8", "memory": "lots"}}),
    Case("toleration-operator-maybe", "spec.resources.tolerations[0].operator", "schema",
         set={"spec.resources.tolerations": [{"key": "nvidia.com/gpu", "operator": "Maybe"}]}),
    # --- values Kubernetes or KubeRay would refuse only at pod creation (the job would sit Pending)
    Case("node-selector-key-with-space", "spec.resources.nodeSelector", "cel", hint="label key",
         set={"spec.resources.nodeSelector": {"node pool": "gpu"}}),
    Case("node-selector-key-two-slashes", "spec.resources.nodeSelector", "cel", hint="label key",
         set={"spec.resources.nodeSelector": {"a/b/c": "gpu"}}),
    Case("node-selector-key-64-char-name", "spec.resources.nodeSelector", "cel", hint="label key",
         set={"spec.resources.nodeSelector": {"x" * 64: "gpu"}}),
    Case("node-selector-value-with-slash", "spec.resources.nodeSelector.pool", "schema",
         set={"spec.resources.nodeSelector": {"pool": "gpu/a10g"}}),
    Case("node-selector-value-64-chars", "spec.resources.nodeSelector.pool", "schema",
         set={"spec.resources.nodeSelector": {"pool": "a" * 64}}),
    Case("gpu-type-with-space", "spec.resources.gpuType", "schema",
         set={"spec.resources.gpuType": "A100 80GB"}),
    Case("toleration-exists-with-value", "spec.resources.tolerations[0]", "cel", hint="Exists",
         set={"spec.resources.tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "value": "true"}]}),
    Case("toleration-key-not-a-label-key", "spec.resources.tolerations[0].key", "schema",
         set={"spec.resources.tolerations": [{"key": "gpu taint", "operator": "Exists"}]}),
    Case("ray-version-without-token-auth", "spec.resources.rayVersion", "schema",
         set={"spec.resources.rayVersion": "2.51.0"}),
    Case("ray-version-not-semver", "spec.resources.rayVersion", "schema",
         set={"spec.resources.rayVersion": "latest"}),
    Case("image-with-whitespace", "spec.resources.image", "schema",
         set={"spec.resources.image": "kubetune/runtime:0.1.0 --privileged"}),
    Case("image-uppercase-repository", "spec.resources.image", "schema",
         set={"spec.resources.image": "Kubetune/Runtime:0.1.0"}),
    Case("image-two-tags", "spec.resources.image", "schema",
         set={"spec.resources.image": "kubetune/runtime:0.1:0"}),
    Case("pvc-claim-uppercase", "spec.output.uri", "cel", hint="DNS-1123",
         set={"spec.output.uri": "pvc://Shared_Models/out"}),
    Case("pvc-claim-empty", "spec.dataset.train.uri", "cel", hint="DNS-1123",
         set={"spec.dataset.train.uri": "pvc:///train.jsonl"}),
    Case("pvc-base-model-claim-underscore", "spec.baseModel.uri", "cel", hint="DNS-1123",
         set={"spec.baseModel": {"uri": "pvc://llama_models/7b"}}),
    # --- output
    Case("missing-output-uri", "spec.output.uri", "schema", unset=("spec.output.uri",)),
    Case("keep-zero-checkpoints", "spec.output.keepCheckpoints", "schema", set={"spec.output.keepCheckpoints": 0}),
    # --- metadata and top level
    Case("uppercase-name", "metadata.name", "metadata", set={"metadata.name": "Viggo-Llama"}),
    Case("dotted-name", "metadata.name", "cel", set={"metadata.name": "viggo.llama-2"}),
    Case("missing-spec-output", "spec.output", "schema", unset=("spec.output",)),
    Case("negative-backoff-limit", "spec.backoffLimit", "schema", set={"spec.backoffLimit": -1}),
]

assert len({c.id for c in CASES}) == len(CASES)


def _crd_param(case: Case) -> Any:
    marks = [pytest.mark.xfail(strict=True, reason=f"CRD gap: {case.crd_gap}")] if case.crd_gap else []
    return pytest.param(case, id=case.id, marks=marks)


def test_base_manifest_is_valid_everywhere(ftj_validator):
    """The cases below fail because of their one mutation, not because of the starting point."""
    FineTuneJob.from_body(ftj_manifest())
    assert ftj_validator.errors(ftj_manifest()) == []


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_model_rejects(case):
    with pytest.raises(pydantic.ValidationError) as info:
        FineTuneJob.from_body(case.manifest())
    message = describe_validation_error(info.value)
    assert case.field in message, message
    assert case.hint is None or case.hint in message, message


@pytest.mark.parametrize("case", [_crd_param(c) for c in CASES])
def test_crd_rejects(request, ftj_validator, case):
    if case.layer == "cel":
        request.getfixturevalue("requires_cel")
    errors = ftj_validator.errors(case.manifest())
    report = "\n".join(map(str, errors)) or "(accepted)"
    named = [e for e in errors if e.layer == case.layer and case.field in str(e)
             and (case.hint is None or case.hint in str(e))]
    assert named, f"expected a {case.layer} error naming {case.field}, got:\n{report}"


# --------------------------------------------------------------------------- immutability once started

STARTED = {"phase": "Running", "startTime": "2024-05-01T12:00:00Z"}

# spec field -> a change to it (path, new value)
IMMUTABLE_CHANGES = {
    "baseModel": ("spec.baseModel.revision", "main"),
    "dataset": ("spec.dataset.maxLength", 1024),
    "hyperparameters": ("spec.hyperparameters.epochs", 3),
    "deepspeed": ("spec.deepspeed.zeroStage", 2),
    "resources": ("spec.resources.workers", 8),
    "output": ("spec.output.keepCheckpoints", 2),
    "activeDeadlineSeconds": ("spec.activeDeadlineSeconds", 3600),
    "preRunningDeadlineSeconds": ("spec.preRunningDeadlineSeconds", 600),
    "backoffLimit": ("spec.backoffLimit", 2),
    "ttlSecondsAfterFinished": ("spec.ttlSecondsAfterFinished", 60),
    "podTemplate": ("spec.podTemplate", {"serviceAccountName": "ml-team-s3"}),
    "queueName": ("spec.queueName", "team-a"),
    "workloadPriorityClassName": ("spec.workloadPriorityClassName", "high"),
    "evaluation": ("spec.evaluation", {"dataset": {"uri": "s3://b/test.jsonl", "reference": "{mr}"},
                                       "scorer": {"name": "viggo"}, "baselinePrompt": {"template": "{ref}"}}),
    "tracking": ("spec.tracking", {"tensorboard": {}}),
}


def test_immutability_cases_cover_every_spec_field_but_suspend():
    fields = {f.alias or name for name, f in FineTuneJobSpec.model_fields.items()}
    assert set(IMMUTABLE_CHANGES) == fields - {"suspend"}


@pytest.fixture
def started_job():
    doc = ftj_manifest()
    doc["status"] = dict(STARTED)
    return doc


@pytest.mark.usefixtures("requires_cel")
@pytest.mark.parametrize(("spec_field", "change"), IMMUTABLE_CHANGES.items(), ids=list(IMMUTABLE_CHANGES))
def test_spec_change_after_start_is_rejected(ftj_validator, started_job, spec_field, change):
    new = set_path(copy.deepcopy(started_job), *change)
    errors = ftj_validator.errors(new, old=started_job)
    assert any(e.layer == "cel" and f"spec.{spec_field} is immutable" in str(e) for e in errors), errors


@pytest.mark.usefixtures("requires_cel")
def test_dataset_change_after_start_is_rejected_naming_spec_dataset(ftj_validator, started_job):
    new = copy.deepcopy(started_job)
    set_path(new, "spec.dataset.train.uri", "s3://bucket/viggo/train-v2.jsonl")
    expected = ("spec.dataset: Forbidden: spec.dataset is immutable once the job has started "
                "(only spec.suspend may change)")
    assert [str(e) for e in ftj_validator.errors(new, old=started_job)] == [expected]


@pytest.mark.usefixtures("requires_cel")
def test_removing_an_optional_field_after_start_is_rejected(ftj_validator, started_job):
    started_job["spec"]["activeDeadlineSeconds"] = 3600
    new = del_path(copy.deepcopy(started_job), "spec.activeDeadlineSeconds")
    assert any("spec.activeDeadlineSeconds is immutable" in str(e)
               for e in ftj_validator.errors(new, old=started_job))


@pytest.mark.usefixtures("requires_cel")
def test_suspend_may_change_after_start(ftj_validator, started_job):
    new = set_path(copy.deepcopy(started_job), "spec.suspend", True)
    assert ftj_validator.errors(new, old=started_job) == []


@pytest.mark.usefixtures("requires_cel")
def test_status_may_change_after_start(ftj_validator, started_job):
    new = set_path(copy.deepcopy(started_job), "status.progress", {"epoch": 3, "totalEpochs": 10})
    assert ftj_validator.errors(new, old=started_job) == []


@pytest.mark.usefixtures("requires_cel")
def test_any_change_allowed_before_start(ftj_validator):
    old = ftj_manifest()
    old["status"] = {"phase": "Pending"}
    new = ftj_manifest(spec__hyperparameters={"epochs": 3}, spec__resources={"workers": 4})
    set_path(new, "spec.dataset.maxLength", 1024)
    assert ftj_validator.errors(new, old=old) == []


@pytest.mark.usefixtures("requires_cel")
def test_transition_rules_skipped_on_create(ftj_validator, started_job):
    assert ftj_validator.errors(started_job) == []



# --------------------------------------------------------------------------- EvalJob


def test_crd_rejects_duplicate_evaljob_candidate_names(evj_validator):
    candidates = [{"name": "a", "model": {"name": "m1"}}, {"name": "a", "model": {"name": "m2"}}]
    errors = evj_validator.errors(evj_manifest(spec__candidates=candidates))
    assert any("spec.candidates[1]" in str(e) for e in errors), errors


@pytest.mark.usefixtures("requires_cel")
def test_crd_rejects_evaljob_candidate_with_two_sources(evj_validator):
    candidates = [{"name": "a", "model": {"name": "m1", "uri": "s3://b/m"}, "prompt": {"template": "{ref}"}}]
    errors = evj_validator.errors(evj_manifest(spec__candidates=candidates))
    assert [e.path for e in errors if e.layer == "cel"] == ["spec.candidates[0].model"], errors
