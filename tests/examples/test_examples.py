"""The seed case study's three tasks as FineTuneJob examples: sized as in the study, wired, and runnable.

tests/api/test_crds.py already checks every FineTuneJob and EvalJob under examples/ against the CRDs
(schema, unknown fields, CEL rules) and the pydantic models, and tests/api/test_cli.py runs
`kubetune validate` on them. This file checks what those cannot: that the examples state the case
study's model sizes and GPU counts, that the two-stage GSM8K run points at its first stage, that each
task's EvalJob evaluates the FineTuneJob beside it, that the RayJob each FineTuneJob becomes and the
RayServices and evaluation RayJob each EvalJob becomes are objects KubeRay accepts, and that their
templates fit the real data.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from kube_schema import schema_errors
from kubetune.api.common import template_fields
from kubetune.api.evaljob import EvalJob
from kubetune.api.finetunejob import FineTuneJob
from kubetune.contract.evalplan import EvalPlan, cluster_base_url, plan, service_name
from kubetune.operator import builders, evalbuilders
from support import shared
from support.shared import kuberay_crd

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"

Obj = dict[str, Any]


def examples_of_kind(kind: str) -> dict[str, tuple[Path, Obj]]:
    """Every `kind` document under examples/, by name."""
    found: dict[str, tuple[Path, Obj]] = {}
    for path in sorted(EXAMPLES.rglob("*.y*ml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if isinstance(doc, dict) and doc.get("kind") == kind:
                name = doc["metadata"]["name"]
                assert name not in found, f"{name} is defined twice ({found[name][0]} and {path})"
                found[name] = (path, doc)
    return found


def finetunejobs() -> dict[str, tuple[Path, Obj]]:
    """Every FineTuneJob document under examples/, by name."""
    return examples_of_kind("FineTuneJob")


JOBS = finetunejobs()
EVALJOBS = examples_of_kind("EvalJob")

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
    return kuberay_crd("rayjobs")


@pytest.fixture(scope="module")
def rayservice_crd() -> Obj:
    return kuberay_crd("rayservices")


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


# --------------------------------------------------------------------------- the EvalJobs

# Each task folder: its EvalJob, and the FineTuneJob (in the same folder) its fine-tuned candidate serves.
TASK_EVALUATIONS = {
    "viggo": ("viggo/evaljob.yaml", "viggo/finetunejob.yaml"),
    "sql": ("sql/evaljob.yaml", "sql/finetunejob.yaml"),
    # The GSM8K stage, trained from the MathQA stage: the model the two-stage run ends with.
    "gsm8k": ("gsm8k/evaljob.yaml", "gsm8k/finetunejob.yaml"),
}


def evaljob_in(relative: str) -> Obj:
    (doc,) = [d for p, d in EVALJOBS.values() if p == EXAMPLES / relative]
    return doc


def fine_tuned_refs(evaljob: Obj) -> list[str]:
    return [c["model"]["fineTuneJobRef"]["name"] for c in evaljob["spec"]["candidates"]
            if "fineTuneJobRef" in c["model"]]


@pytest.mark.parametrize(("task", "evaljob_file", "finetunejob_file"),
                         [(t, *v) for t, v in TASK_EVALUATIONS.items()], ids=list(TASK_EVALUATIONS))
def test_task_evaljob_evaluates_the_finetunejob_beside_it(task: str, evaljob_file: str,
                                                          finetunejob_file: str) -> None:
    evaljob = evaljob_in(evaljob_file)
    (ref,) = fine_tuned_refs(evaljob)
    assert ref == job_in(finetunejob_file)["metadata"]["name"]
    assert JOBS[ref][0].parent == EXAMPLES / task, f"{ref} is not defined in examples/{task}"
    # Namespaced references: both are applied to the same namespace (neither pins one).
    assert "namespace" not in evaljob["metadata"] and "namespace" not in JOBS[ref][1]["metadata"]
    # The fine-tuned candidate is the one the gate judges.
    gate = evaljob["spec"].get("gate")
    fine_tuned = next(c["name"] for c in evaljob["spec"]["candidates"] if "fineTuneJobRef" in c["model"])
    assert gate is None or gate["candidate"] == fine_tuned


def test_gsm8k_evaljob_serves_the_stage_trained_from_mathqa() -> None:
    (ref,) = fine_tuned_refs(evaljob_in("gsm8k/evaljob.yaml"))
    stage1 = job_in("gsm8k/mathqa-finetunejob.yaml")["metadata"]["name"]
    assert JOBS[ref][1]["spec"]["baseModel"]["fineTuneJobRef"]["name"] == stage1
    assert ref != stage1


NAMESPACE = "ml-team"


def as_applied(doc: Obj, uid: str) -> Obj:
    """The manifest as the operator reads it back: namespaced, with a uid and a generation."""
    body = json.loads(json.dumps(doc))
    body["metadata"] = {**body["metadata"], "namespace": NAMESPACE, "uid": uid, "generation": 1}
    return body


def resolved_plan(job: EvalJob) -> EvalPlan:
    """The plan as the operator resolves it once every FineTuneJob referred to has succeeded: a
    fineTuneJobRef serves that job's best checkpoint, `uri` and `name` are served as given."""
    model_uris: dict[str, str] = {}
    fine_tune_jobs: dict[str, FineTuneJob] = {}
    for c in job.spec.candidates:
        ref = c.model.fine_tune_job_ref
        if ref is not None:
            fine_tune_jobs[ref.name] = FineTuneJob.from_body(as_applied(JOBS[ref.name][1], f"uid-{ref.name}"))
            model_uris[c.name] = f"{fine_tune_jobs[ref.name].spec.output.uri.rstrip('/')}/checkpoints/best"
        elif c.model.uri is not None:
            model_uris[c.name] = c.model.uri
        elif c.model.name is not None:
            model_uris[c.name] = c.model.name
    base_urls = {c.name: cluster_base_url(service_name(job.metadata.name, c.name), NAMESPACE)
                 for c in job.spec.candidates if c.model.served}
    return plan(job, model_uris, fine_tune_jobs, base_urls)


def built(name: str) -> tuple[EvalJob, list[Obj], Obj]:
    """An example EvalJob, its RayServices and its evaluation RayJob, from the operator's builders."""
    job = EvalJob.from_body(as_applied(EVALJOBS[name][1], "evj-uid-1"))
    resolved = resolved_plan(job)
    services = [evalbuilders.ray_service(job, p) for p in resolved.candidates if p.served]
    return job, services, evalbuilders.eval_ray_job(job, evalbuilders.children(job), resolved)


@pytest.mark.parametrize("name", list(EVALJOBS))
def test_example_evaljob_becomes_rayservices_kuberay_accepts(name: str, rayservice_crd: Obj) -> None:
    job, services, _ = built(name)
    assert [s["metadata"]["name"] for s in services] == evalbuilders.children(job).ray_services
    assert services, f"{name} serves no candidate"
    for service in services:
        assert schema_errors(service, rayservice_crd) == [], service["metadata"]["name"]
        workers = service["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]
        assert workers["replicas"] == job.spec.serving.replicas
        limits = workers["template"]["spec"]["containers"][0]["resources"]["limits"]
        assert int(limits.get("nvidia.com/gpu", "0")) == job.spec.serving.gpus_per_replica


@pytest.mark.parametrize("name", list(EVALJOBS))
def test_example_evaljob_becomes_an_evaluation_rayjob_kuberay_accepts(name: str, rayjob_crd: Obj) -> None:
    job, _, rayjob = built(name)
    assert rayjob["metadata"]["name"] == evalbuilders.children(job).ray_job
    assert schema_errors(rayjob, rayjob_crd) == []


# --------------------------------------------------------------------------- the real data (../shared)


def _fields(doc: Obj) -> set[str]:
    dataset = doc["spec"]["dataset"]
    template = dataset.get("template") or {}
    fields = set(template_fields(template.get("prompt", ""))) | set(template_fields(template.get("completion", "")))
    columns = dataset["train"].get("columns") or {}
    return {columns.get(f, f) for f in fields}


def test_gsm8k_template_fields_are_the_keys_of_real_gsm8k_rows() -> None:
    path = shared.require(shared.DATASETS / "gsm8k" / "train.jsonl",
                          "the gsm8k template's fields are not checked against real rows")
    with path.open() as rows:
        keys = set(json.loads(next(rows)))
    assert _fields(job_in("gsm8k/finetunejob.yaml")) <= keys


def test_viggo_template_fields_are_columns_of_real_viggo_data() -> None:
    path = shared.require(shared.DATASETS / "viggo" / "train.csv",
                          "the viggo template's fields are not checked against real columns")
    with path.open(newline="") as rows:
        header = set(next(csv.reader(rows)))
    assert _fields(job_in("viggo/finetunejob.yaml")) <= header


def test_gsm8k_completion_ends_in_the_answer_marker_the_scorer_reads() -> None:
    """Stage 1 teaches `#### <choice>`, the same final line as every GSM8K answer."""
    completion = job_in("gsm8k/mathqa-finetunejob.yaml")["spec"]["dataset"]["template"]["completion"]
    assert "\n#### {" in completion


def test_real_gsm8k_answers_end_in_the_answer_marker() -> None:
    path = shared.require(shared.DATASETS / "gsm8k" / "train.jsonl",
                          "real gsm8k answers are not checked for the `#### ` marker")
    with path.open() as rows:
        answers = [json.loads(line)["answer"] for _, line in zip(range(200), rows, strict=False)]
    assert all("\n#### " in answer for answer in answers)


# --------------------------------------------------------------------------- a shared cloud cluster (examples/eks)


def test_the_eks_example_runs_as_an_irsa_account_with_a_secret_and_a_queue(rayjob_crd: Obj) -> None:
    """IRSA: the pods run as the team's ServiceAccount, whose role-arn annotation EKS turns into credentials;
    a value comes from a Secret; the RayJob waits in a Kueue LocalQueue."""
    doc = job_in("eks/finetunejob.yaml")
    job = FineTuneJob.from_body({**doc, "metadata": {**doc["metadata"], "namespace": "ml-team", "uid": "u"}})
    template = job.spec.pod_template
    assert template is not None and template.service_account_name
    (account,) = [d for d in yaml.safe_load_all((EXAMPLES / "eks" / "serviceaccount.yaml").read_text())]
    assert account["kind"] == "ServiceAccount" and account["metadata"]["name"] == template.service_account_name
    assert account["metadata"]["annotations"]["eks.amazonaws.com/role-arn"].startswith("arn:aws:iam::")
    assert any(e.value_from is not None and e.value_from.secret_key_ref is not None for e in template.env or [])
    rayjob = builders.ray_job(job, builders.children(job))
    assert schema_errors(rayjob, rayjob_crd) == []
    assert rayjob["spec"]["suspend"] is True
    assert rayjob["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == job.spec.queue_name
    head = rayjob["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    assert head["serviceAccountName"] == template.service_account_name
    assert [o["kind"] for o in builders.trainer_identity(job, builders.children(job))] == ["Role", "RoleBinding"]
