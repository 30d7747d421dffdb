"""Bad EvalJobs (and FineTuneJob.spec.evaluation) are rejected by the model and by the CRD, naming the field.

Same two layers as test_invalid_manifests: what the operator and `kubetune validate` say, and what the
apiserver says (schema, unknown fields, CEL).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pydantic
import pytest

from factories import del_path, evj_manifest, ftj_manifest, set_path
from kubetune.api.errors import describe_validation_error
from kubetune.api.evaljob import EvalJob
from kubetune.api.finetunejob import FineTuneJob


@dataclass(frozen=True)
class Case:
    id: str
    field: str  # the path both messages must name
    layer: str  # schema | unknown-field | cel | list-type
    set: dict[str, Any] = field(default_factory=dict)
    unset: tuple[str, ...] = ()
    hint: str | None = None


FEW_SHOT_PROMPT = {"template": "{ref} ->", "fewShot": {"k": 2}}
ENDPOINT = {"url": "https://api.openai.com/v1", "model": "gpt-4"}

CASES = [
    Case("unknown-scorer", "spec.scorer.name", "schema", set={"spec.scorer.name": "rouge"}),
    Case("no-candidates", "spec.candidates", "schema", set={"spec.candidates": []}),
    Case("missing-candidates", "spec.candidates", "schema", unset=("spec.candidates",)),
    Case("duplicate-candidate", "spec.candidates[1]", "list-type",
         set={"spec.candidates[1].name": "fine-tuned"}),
    Case("candidate-two-sources", "spec.candidates[1].model", "cel", hint="exactly one",
         set={"spec.candidates[1].model.uri": "s3://models/llama"}),
    Case("candidate-no-source", "spec.candidates[1].model", "cel", hint="exactly one",
         set={"spec.candidates[1].model": {}}),
    Case("candidate-uppercase-name", "spec.candidates[0].name", "schema",
         set={"spec.candidates[0].name": "Tuned"}),
    Case("baseline-without-prompt", "spec.candidates[1].prompt", "cel", hint="prompt",
         unset=("spec.candidates[1].prompt",)),
    Case("few-shot-without-source", "spec.candidates", "cel", hint="fewShot.source",
         set={"spec.candidates[1].prompt": FEW_SHOT_PROMPT}),
    Case("endpoint-not-a-url", "spec.candidates[1].model.endpoint.url", "schema",
         set={"spec.candidates[1].model": {"endpoint": {"url": "api.openai.com", "model": "gpt-4"}}}),
    Case("secret-ref-without-key", "spec.candidates[1].model.endpoint.apiKeySecretRef.key", "schema",
         set={"spec.candidates[1].model": {"endpoint": {**ENDPOINT, "apiKeySecretRef": {"name": "openai"}}}}),
    Case("bad-prompt-placeholder", "spec.candidates[1].prompt.template", "cel",
         set={"spec.candidates[1].prompt.template": "{a b} ->"}),
    Case("negative-temperature", "spec.candidates[0].generation.temperature", "schema",
         set={"spec.candidates[0].generation": {"temperature": -1}}),
    Case("zero-max-tokens", "spec.candidates[0].generation.maxTokens", "schema",
         set={"spec.candidates[0].generation": {"maxTokens": 0}}),
    Case("dataset-without-reference", "spec.dataset.reference", "schema", unset=("spec.dataset.reference",)),
    Case("bad-reference-placeholder", "spec.dataset.reference", "cel", set={"spec.dataset.reference": "{mr"}),
    Case("bad-split", "spec.dataset.split", "schema", set={"spec.dataset.split": "first half"}),
    Case("zero-limit", "spec.dataset.limit", "schema", set={"spec.dataset.limit": 0}),
    Case("gate-unknown-candidate", "spec.gate.candidate", "cel", hint="candidate",
         set={"spec.gate": {"candidate": "gpt-5", "minimum": 0.5}}),
    Case("gate-beats-itself", "spec.gate.beats", "cel", hint="other candidates",
         set={"spec.gate": {"candidate": "fine-tuned", "beats": [{"candidate": "fine-tuned"}]}}),
    Case("gate-without-criterion", "spec.gate", "cel", hint="minimum",
         set={"spec.gate": {"candidate": "fine-tuned"}}),
    Case("negative-margin", "spec.gate.beats[0].margin", "schema",
         set={"spec.gate": {"candidate": "fine-tuned", "beats": [{"candidate": "base", "margin": -0.1}]}}),
    Case("zero-concurrency", "spec.concurrency", "schema", set={"spec.concurrency": 0}),
    Case("serving-engine-tgi", "spec.serving.engine", "schema", set={"spec.serving.engine": "tgi"}),
    Case("zero-replicas", "spec.serving.replicas", "schema", set={"spec.serving.replicas": 0}),
    Case("serving-node-selector-bad-key", "spec.serving.nodeSelector", "cel", hint="label key",
         set={"spec.serving.nodeSelector": {"gpu pool": "a10g"}}),
    Case("serving-gpu-type-not-a-label-value", "spec.serving.gpuType", "schema",
         set={"spec.serving.gpuType": "A10G (24GB)"}),
    Case("serving-toleration-exists-with-value", "spec.serving.tolerations[0]", "cel", hint="Exists",
         set={"spec.serving.tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "value": "x"}]}),
    Case("serving-ray-version-without-token-auth", "spec.serving.rayVersion", "schema",
         set={"spec.serving.rayVersion": "2.47.1"}),
    Case("token-for-a-checkpoint", "spec.candidates[0].model.tokenSecretRef", "cel", hint="name",
         set={"spec.candidates[0].model.tokenSecretRef": {"name": "hf", "key": "token"}}),
    Case("serving-image-with-whitespace", "spec.serving.image", "schema",
         set={"spec.serving.image": "kubetune/runtime :0.1.0"}),
    Case("output-pvc-claim-uppercase", "spec.output.uri", "cel", hint="DNS-1123",
         set={"spec.output.uri": "pvc://Results/evals"}),
    Case("missing-output", "spec.output", "schema", unset=("spec.output",)),
    Case("typo-candidate-field", "spec.candidates[0].generations", "unknown-field",
         set={"spec.candidates[0].generations": {}}),
]
assert len({c.id for c in CASES}) == len(CASES)


def _manifest(case: Case) -> dict[str, Any]:
    doc = evj_manifest()
    for path in case.unset:
        del_path(doc, path)
    for path, value in case.set.items():
        set_path(doc, path, value)
    return doc


def test_base_evaljob_is_valid_everywhere(evj_validator):
    EvalJob.from_body(evj_manifest())
    assert evj_validator.errors(evj_manifest()) == []


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_model_rejects(case):
    with pytest.raises(pydantic.ValidationError) as info:
        EvalJob.from_body(_manifest(case))
    message = describe_validation_error(info.value)
    assert case.field in message, message
    assert case.hint is None or case.hint in message, message


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_crd_rejects(request, case, evj_validator):
    if case.layer == "cel":
        request.getfixturevalue("requires_cel")
    errors = evj_validator.errors(_manifest(case))
    report = "\n".join(map(str, errors)) or "(accepted)"
    named = [e for e in errors if e.layer == case.layer and case.field in str(e)
             and (case.hint is None or case.hint in str(e))]
    assert named, f"expected a {case.layer} error naming {case.field}, got:\n{report}"


EVALUATION = {"dataset": {"uri": "s3://b/viggo/test.jsonl", "reference": "{mr}"}, "scorer": {"name": "viggo"},
              "baselinePrompt": {"template": "{ref} ->"}}


def test_finetunejob_evaluation_is_valid_everywhere(ftj_validator):
    doc = set_path(ftj_manifest(), "spec.evaluation", EVALUATION)
    assert FineTuneJob.from_body(doc).spec.evaluation is not None
    assert ftj_validator.errors(doc) == []


def test_finetunejob_evaluation_with_unknown_scorer_names_the_field(ftj_validator):
    doc = set_path(ftj_manifest(), "spec.evaluation", {**EVALUATION, "scorer": {"name": "rouge"}})
    with pytest.raises(pydantic.ValidationError) as info:
        FineTuneJob.from_body(doc)
    assert "spec.evaluation.scorer.name" in describe_validation_error(info.value)
    assert any("spec.evaluation.scorer.name" in str(e) for e in ftj_validator.errors(doc))
