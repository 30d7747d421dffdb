"""The seed case study's three tasks as FineTuneJob examples: sized as in the study, wired, and runnable.

tests/api/test_crds.py already checks every FineTuneJob and EvalJob under examples/ against the CRDs
(schema, unknown fields, CEL rules) and the pydantic models, and tests/api/test_cli.py runs
`kubetune validate` on them. This file checks what those cannot: that the examples state the case
study's model sizes and GPU counts, that the two-stage GSM8K run points at its first stage, that the
RayJob each example becomes is one KubeRay accepts, and that their templates fit the real data.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from factories import KUBERAY_CRDS, SHARED
from kube_schema import schema_errors
from kubetune.api.common import template_fields
from kubetune.api.finetunejob import FineTuneJob
from kubetune.operator import builders

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"

Obj = dict[str, Any]


def finetunejobs() -> dict[str, tuple[Path, Obj]]:
    """Every FineTuneJob document under examples/, by name."""
    found: dict[str, tuple[Path, Obj]] = {}
    for path in sorted(EXAMPLES.rglob("*.y*ml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if isinstance(doc, dict) and doc.get("kind") == "FineTuneJob":
                name = doc["metadata"]["name"]
                assert name not in found, f"{name} is defined twice ({found[name][0]} and {path})"
                found[name] = (path, doc)
    return found


JOBS = finetunejobs()

# The seed case study (Anyscale, "Fine-Tuning Llama-2: A Comprehensive Case Study for Tailoring Models
# to Unique Applications"): task -> (file, base model, workers x A10G).
CASE_STUDY = {
    "viggo": ("viggo/finetunejob.yaml", "meta-llama/Llama-2-7b-hf", 16),
    "sql": ("sql/finetunejob.yaml", "meta-llama/Llama-2-13b-hf", 16),
    "gsm8k-mathqa": ("gsm8k/mathqa-finetunejob.yaml", "meta-llama/Llama-2-70b-hf", 32),
}


def job_in(relative: str) -> Obj:
    (doc,) = [d for p, d in JOBS.values() if p == EXAMPLES / relative]
    return doc


@pytest.mark.parametrize(("task", "file", "model", "gpus"), [(t, *v) for t, v in CASE_STUDY.items()],
                         ids=list(CASE_STUDY))
def test_example_is_sized_as_in_the_case_study(task: str, file: str, model: str, gpus: int) -> None:
    job = FineTuneJob.from_body(job_in(file))
    res = job.spec.resources
    assert job.spec.base_model.name == model
    assert (res.workers * res.gpus_per_worker, res.gpu_type) == (gpus, "A10G")
    assert job.spec.deepspeed.zero_stage == 3


def test_the_70b_stages_offload_parameters_and_optimizer_state() -> None:
    for file in ("gsm8k/mathqa-finetunejob.yaml", "gsm8k/finetunejob.yaml"):
        deepspeed = FineTuneJob.from_body(job_in(file)).spec.deepspeed
        assert (deepspeed.offload_params, deepspeed.offload_optimizer) == ("cpu", "cpu"), file


def test_gsm8k_trains_from_the_mathqa_job() -> None:
    stage2 = FineTuneJob.from_body(job_in("gsm8k/finetunejob.yaml"))
    stage1 = FineTuneJob.from_body(job_in("gsm8k/mathqa-finetunejob.yaml"))
    ref = stage2.spec.base_model.fine_tune_job_ref
    assert ref is not None and ref.name == stage1.metadata.name
    assert stage1.metadata.namespace == stage2.metadata.namespace
    assert stage2.spec.resources.workers * stage2.spec.resources.gpus_per_worker == 32


def test_every_fine_tune_job_ref_names_an_example_that_is_not_itself() -> None:
    for name, (_, doc) in JOBS.items():
        ref = (doc["spec"]["baseModel"].get("fineTuneJobRef") or {}).get("name")
        if ref is not None:
            assert ref in JOBS and ref != name, f"{name} refers to {ref}"


def test_two_stage_keeps_the_first_stages_special_tokens_and_stop() -> None:
    first = job_in("gsm8k/mathqa-finetunejob.yaml")["spec"]["dataset"]["template"]
    second = job_in("gsm8k/finetunejob.yaml")["spec"]["dataset"]["template"]
    assert set(first["specialTokens"]) <= set(second["specialTokens"])
    assert first["stop"] == second["stop"]


def test_gated_models_name_a_token_secret() -> None:
    for name, (_, doc) in JOBS.items():
        base = doc["spec"]["baseModel"]
        if str(base.get("name", "")).startswith("meta-llama/"):
            assert base.get("tokenSecretRef"), f"{name}: Llama-2 is gated on the Hub"


def test_outputs_do_not_overlap() -> None:
    uris = [doc["spec"]["output"]["uri"].rstrip("/") for _, doc in JOBS.values()]
    for uri in uris:
        assert not [other for other in uris if other != uri and other.startswith(uri + "/")], uri
    assert len(uris) == len(set(uris))


@pytest.fixture(scope="module")
def rayjob_crd() -> Obj:
    path = KUBERAY_CRDS / "ray.io_rayjobs.yaml"
    if not path.exists():
        pytest.skip("../shared/kuberay-crds is absent")
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the CRD is 22k lines: libyaml when present
    return yaml.load(path.read_text(), Loader=loader)  # type: ignore[no-any-return]


@pytest.mark.parametrize("name", list(JOBS))
def test_example_becomes_a_rayjob_kuberay_accepts(name: str, rayjob_crd: Obj) -> None:
    body = dict(JOBS[name][1])
    body["metadata"] = {**body["metadata"], "namespace": "default", "uid": "uid-1", "generation": 1}
    job = FineTuneJob.from_body(body)
    ref = job.spec.base_model.fine_tune_job_ref
    resolved = f"s3://kubetune-examples/runs/{ref.name}/best" if ref else None
    rayjob = builders.ray_job(job, builders.children(job), base_model_uri=resolved)
    assert schema_errors(rayjob, rayjob_crd) == []
    group = rayjob["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]
    assert group["replicas"] == job.spec.resources.workers


# --------------------------------------------------------------------------- the real data (../shared)


def _fields(doc: Obj) -> set[str]:
    dataset = doc["spec"]["dataset"]
    template = dataset.get("template") or {}
    fields = set(template_fields(template.get("prompt", ""))) | set(template_fields(template.get("completion", "")))
    columns = dataset["train"].get("columns") or {}
    return {columns.get(f, f) for f in fields}


def test_gsm8k_template_fields_are_the_keys_of_real_gsm8k_rows() -> None:
    path = SHARED / "datasets" / "gsm8k" / "train.jsonl"
    if not path.exists():
        pytest.skip("../shared/datasets/gsm8k is absent")
    with path.open() as rows:
        keys = set(json.loads(next(rows)))
    assert _fields(job_in("gsm8k/finetunejob.yaml")) <= keys


def test_viggo_template_fields_are_columns_of_real_viggo_data() -> None:
    path = SHARED / "datasets" / "viggo" / "train.csv"
    if not path.exists():
        pytest.skip("../shared/datasets/viggo is absent")
    with path.open(newline="") as rows:
        header = set(next(csv.reader(rows)))
    assert _fields(job_in("viggo/finetunejob.yaml")) <= header


def test_gsm8k_completion_ends_in_the_answer_marker_the_scorer_reads() -> None:
    """Stage 1 teaches `#### <choice>`, the same final line as every GSM8K answer."""
    completion = job_in("gsm8k/mathqa-finetunejob.yaml")["spec"]["dataset"]["template"]["completion"]
    assert "\n#### {" in completion
    path = SHARED / "datasets" / "gsm8k" / "train.jsonl"
    if path.exists():
        with path.open() as rows:
            answers = [json.loads(line)["answer"] for _, line in zip(range(200), rows, strict=False)]
        assert all("\n#### " in answer for answer in answers)
