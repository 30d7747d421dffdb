"""EvalJob (kubetune.io/v1alpha1): serve candidate models and score them on a task against baselines.

Each candidate is a model kubetune serves with Ray Serve (a KubeRay RayService: a FineTuneJob's best
checkpoint, a model directory, or a Hugging Face id) or an external OpenAI-compatible endpoint, with its
own prompt: the special-token format for fine-tuned models, an instruction with few-shot examples for
baselines. One evaluation run sends the dataset to every candidate concurrently, scores the answers,
writes results.json + report.html, and records per-candidate metrics and the gate verdict in status.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any, Literal

from pydantic import Field, model_validator

from kubetune.api.common import (
    API_VERSION,
    DNS_LABEL_PATTERN,
    ApiModel,
    Condition,
    LocalObjectReference,
    ObjectMeta,
    SecretKeyReference,
    Uri,
    defaulted,
)
from kubetune.api.errors import FieldError
from kubetune.api.evaluation import (
    CandidatePrompt,
    EvalDataset,
    EvalOutput,
    GateSpec,
    Generation,
    ScorerSpec,
    ServingSpec,
)
from kubetune.api.pods import QUEUE_RULE, KueueName, PodTemplate, check_queue
from kubetune.api.tracking import TrackingSpec

KIND = "EvalJob"
PLURAL = "evaljobs"

class Phase(StrEnum):
    """An EvalJob's phase: the one-word summary of its conditions."""

    PENDING = "Pending"
    WAITING = "Waiting"
    SERVING = "Serving"
    QUEUED = "Queued"  # the evaluation RayJob waits for Kueue's admission (spec.queueName), or was preempted
    EVALUATING = "Evaluating"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"


class Endpoint(ApiModel):
    """An OpenAI-compatible API kubetune does not run (e.g. a hosted GPT-4, or a vLLM server of your own)."""

    url: str = Field(description="Base URL including /v1, e.g. https://api.openai.com/v1.",
                     pattern=r"^https?://[^\s]+$", max_length=2048)
    model: str = Field(description="Model name sent in every request.", min_length=1, max_length=256)
    api_key_secret_ref: SecretKeyReference | None = Field(
        default=None, description="Secret key holding the API key (sent as a Bearer token).")


class CandidateModel(ApiModel):
    """The model a candidate answers with: exactly one of fineTuneJobRef, uri, name, endpoint."""

    model_config = ApiModel.model_config | {
        "json_schema_extra": {
            "x-kubernetes-validations": [
                {
                    "rule": "(has(self.fineTuneJobRef) ? 1 : 0) + (has(self.uri) ? 1 : 0) + "
                    "(has(self.name) ? 1 : 0) + (has(self.endpoint) ? 1 : 0) == 1",
                    "message": "candidate model: set exactly one of fineTuneJobRef, uri, name, endpoint",
                },
                {
                    "rule": "!has(self.tokenSecretRef) || has(self.name)",
                    "fieldPath": ".tokenSecretRef",
                    "message": "candidate model tokenSecretRef is only used with name (a Hugging Face model id)",
                },
            ]
        }
    }

    fine_tune_job_ref: LocalObjectReference | None = Field(
        default=None, description="A FineTuneJob in this namespace: its best checkpoint is served, and its "
        "prompt template and stop token are the candidate's defaults.")
    uri: Uri | None = Field(default=None, description="A model directory (s3://, pvc://, local path) to serve.")
    name: str | None = Field(default=None, description="A Hugging Face model id to serve.", min_length=1,
                             max_length=256)
    endpoint: Endpoint | None = Field(default=None, description="An external OpenAI-compatible endpoint.")
    token_secret_ref: SecretKeyReference | None = Field(
        default=None, description="Secret key holding a Hugging Face token for a gated `name`: HF_TOKEN in this "
        "candidate's serving pods only.")

    @model_validator(mode="after")
    def _exactly_one(self) -> CandidateModel:
        given = [n for n in ("fine_tune_job_ref", "uri", "name", "endpoint") if getattr(self, n) is not None]
        if len(given) != 1:
            raise ValueError("set exactly one of fineTuneJobRef, uri, name, endpoint")
        if self.token_secret_ref is not None and self.name is None:
            raise FieldError("tokenSecretRef", "tokenSecretRef is only used with name (a Hugging Face model id)")
        return self

    @property
    def served(self) -> bool:
        """kubetune deploys this model (a RayService); an endpoint is only called."""
        return self.endpoint is None


class Candidate(ApiModel):
    """One model under evaluation, with the prompt and sampling it is evaluated with."""

    model_config = ApiModel.model_config | {
        "json_schema_extra": {
            "x-kubernetes-validations": [
                {"rule": "has(self.prompt) || has(self.model.fineTuneJobRef)", "fieldPath": ".prompt",
                 "message": "candidate prompt is required unless the model is a fineTuneJobRef (whose "
                            "template is the default)"},
            ]
        }
    }

    name: str = Field(description="Candidate name, unique in the EvalJob (a DNS label: it names the "
                      "candidate's RayService).", pattern=DNS_LABEL_PATTERN, min_length=1, max_length=30)
    model: CandidateModel = Field(description="The model to evaluate.")
    prompt: CandidatePrompt | None = Field(
        default=None, description="How rows are put to this model; defaults to the FineTuneJob's template "
        "for a fineTuneJobRef.")
    generation: Generation = defaulted(Generation, "Sampling parameters.")

    @model_validator(mode="after")
    def _prompt_known(self) -> Candidate:
        if self.prompt is None and self.model.fine_tune_job_ref is None:
            raise FieldError("prompt", "prompt is required unless the model is a fineTuneJobRef")
        return self


class EvalJobSpec(ApiModel):
    """Desired state of an EvalJob."""

    model_config = ApiModel.model_config | {
        "json_schema_extra": {
            "x-kubernetes-validations": [
                {"rule": "!has(self.gate) || self.candidates.exists(c, c.name == self.gate.candidate)",
                 "fieldPath": ".gate.candidate", "message": "gate.candidate must name one of the candidates"},
                {"rule": "!has(self.gate) || self.gate.beats.all(b, self.candidates.exists(c, "
                         "c.name == b.candidate) && b.candidate != self.gate.candidate)",
                 "fieldPath": ".gate.beats",
                 "message": "gate.beats must name other candidates of this EvalJob"},
                {"rule": "self.candidates.all(c, !has(c.prompt) || !has(c.prompt.fewShot) || "
                         "c.prompt.fewShot.k == 0 || has(c.prompt.fewShot.source))",
                 "fieldPath": ".candidates",
                 "message": "candidates[].prompt.fewShot.source is required when fewShot.k > 0"},
                QUEUE_RULE,
            ]
        }
    }

    candidates: list[Candidate] = Field(
        description="Models to compare.", min_length=1, max_length=16,
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["name"]},
    )
    dataset: EvalDataset = Field(description="Evaluation rows and their reference answers.")
    scorer: ScorerSpec = Field(description="Task scorer.")
    gate: GateSpec | None = Field(default=None, description="Pass/fail criterion; none means always pass.")
    serving: ServingSpec = defaulted(ServingSpec, "How kubetune-served candidates are deployed.")
    concurrency: int = Field(default=32, description="Requests in flight per candidate.", ge=1, le=4096)
    pod_template: PodTemplate | None = Field(
        default=None, description="What the serving and evaluation pods get besides what kubetune builds: "
        "ServiceAccount (cloud identity that reads the checkpoints), env and envFrom, volumes and mounts, labels, "
        "annotations, priorityClassName, schedulerName, serving-worker affinity, imagePullSecrets. kubetune's own "
        "settings win; colliding names are rejected.")
    queue_name: KueueName | None = Field(
        default=None, description="Kueue LocalQueue of the namespace for the evaluation RayJob: it is created "
        "suspended with the kueue.x-k8s.io/queue-name label and runs when Kueue admits it (the EvalJob is Queued "
        "until then). The RayServices are not queued (Kueue does not manage RayServices as jobs everywhere, and a "
        "preempted server would fail the evaluation's requests).")
    workload_priority_class_name: KueueName | None = Field(
        default=None, description="Kueue WorkloadPriorityClass of the evaluation RayJob (label "
        "kueue.x-k8s.io/priority-class). Needs queueName.")
    keep_serving: bool = Field(default=False, description="Leave the RayServices running after the "
                               "evaluation (to try the models); by default they are deleted.")
    output: EvalOutput = Field(description="Where results.json, report.html and the plots are written.")
    active_deadline_seconds: int | None = Field(
        default=None, description="Fail the evaluation when it has been active longer than this.", ge=1)
    ttl_seconds_after_finished: int | None = Field(
        default=None, description="Delete the children this long after the EvalJob finished.", ge=0)
    backoff_limit: int = Field(
        default=0, description="How many times a RayService or the evaluation RayJob deleted while the "
        "EvalJob runs is re-created before the EvalJob fails (ServingDeleted, RayJobDeleted).", ge=0, le=10)
    tracking: TrackingSpec | None = Field(
        default=None, description="Log each candidate's scores and the gate's verdict to MLflow, Weights & "
        "Biases and/or TensorBoard: to the run of the first fineTuneJobRef candidate's FineTuneJob, else to "
        "a run of this EvalJob.")

    @model_validator(mode="after")
    def _consistent(self) -> EvalJobSpec:
        check_queue(self.queue_name, self.workload_priority_class_name)
        names = [c.name for c in self.candidates]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            where = f"candidates[{len(names) - 1 - names[::-1].index(dupes[0])}]"
            raise FieldError(where, f"duplicate candidate names: {', '.join(dupes)}")
        if self.gate is not None:
            if self.gate.candidate not in names:
                raise FieldError("gate.candidate", f"{self.gate.candidate!r} is not a candidate "
                                 f"(candidates: {', '.join(names)})")
            for i, beat in enumerate(self.gate.beats):
                if beat.candidate not in names or beat.candidate == self.gate.candidate:
                    raise FieldError(f"gate.beats[{i}].candidate",
                                     f"{beat.candidate!r}: gate.beats must name other candidates of this EvalJob")
        for i, c in enumerate(self.candidates):
            few = c.prompt.few_shot if c.prompt else None
            if few is not None and few.k > 0 and few.source is None:
                raise FieldError(f"candidates[{i}].prompt.fewShot.source",
                                 "fewShot.source is required when fewShot.k > 0")
        return self


# -- status ----------------------------------------------------------------------------------------


class Latency(ApiModel):
    """Request latency seen by the evaluator (queueing included)."""

    mean_seconds: float = Field(description="Mean seconds per request.", ge=0)
    p95_seconds: float = Field(description="95th percentile seconds per request.", ge=0)


class CandidateResult(ApiModel):
    """What one candidate scored, and what it cost."""

    name: str = Field(description="Candidate name.", max_length=63)
    model: str | None = Field(default=None, description="Model served or called (resolved URI, id or "
                              "endpoint model).", max_length=2048)
    endpoint: str | None = Field(default=None, description="Base URL the evaluator called.", max_length=2048)
    service: str | None = Field(default=None, description="The candidate's RayService.", max_length=63)
    metrics: dict[str, float] = Field(default_factory=dict, description="Scorer metrics (fractions 0..1; "
                                      "chrf and bleu 0..100).", max_length=64)
    examples: int | None = Field(default=None, description="Rows scored.", ge=0)
    dropped: int | None = Field(default=None, description="Rows the scorer excluded (e.g. SQL gold result "
                                "empty).", ge=0)
    errors: int | None = Field(default=None, description="Requests that failed (scored as wrong).", ge=0)
    latency: Latency | None = Field(default=None, description="Request latency.")
    prompt_tokens_per_request: float | None = Field(default=None, description="Mean prompt tokens per "
                                                    "request (the cost of a long few-shot prompt).", ge=0)
    completion_tokens_per_request: float | None = Field(default=None, description="Mean generated tokens "
                                                        "per request.", ge=0)


class GateCheck(ApiModel):
    """One comparison of the gate."""

    description: str = Field(description="What was compared, e.g. 'exactMatch >= 0.8'.", max_length=512)
    passed: bool = Field(description="Whether it held.")
    value: float | None = Field(default=None, description="The gated candidate's value.")
    threshold: float | None = Field(default=None, description="What it had to reach.")


class GateResult(ApiModel):
    """The gate's verdict."""

    passed: bool = Field(description="Every check held.")
    metric: str = Field(description="The metric judged.", max_length=63)
    message: str = Field(default="", description="Summary for humans.", max_length=4096)
    checks: list[GateCheck] = Field(default_factory=list, description="Each comparison.", max_length=32)


class EvalChildren(ApiModel):
    """Names of the objects the operator created for the EvalJob."""

    ray_services: list[str] = Field(default_factory=list, description="One RayService per served candidate.",
                                    max_length=16)
    ray_job: str | None = Field(default=None, description="The RayJob running the evaluation.", max_length=63)
    config_map: str | None = Field(default=None, description="The resolved evaluation config.", max_length=253)
    service_account: str | None = Field(default=None, description="The EvalJob's own ServiceAccount (and Role "
                                        "and RoleBinding): the evaluator reports with it.", max_length=253)


class EvalProgress(ApiModel):
    """Live progress reported by the evaluator."""

    done: int = Field(default=0, description="Requests answered so far (all candidates).", ge=0)
    total: int = Field(default=0, description="Requests planned.", ge=0)
    summary: str | None = Field(default=None, description="done/total, for the printer column.", max_length=64)
    update_time: str | None = Field(default=None, description="When the evaluator last reported (RFC 3339).")


class ReportLocation(ApiModel):
    """Where the evaluator wrote its outputs."""

    uri: str | None = Field(default=None, description="report.html.", max_length=2048)
    results_uri: str | None = Field(default=None, description="results.json.", max_length=2048)


class EvalJobStatus(ApiModel):
    """Observed state of an EvalJob."""

    observed_generation: int | None = Field(default=None, description="Generation this status describes.")
    phase: Phase | None = Field(default=None, description="One-word summary of the conditions.")
    conditions: list[Condition] = Field(default_factory=list, max_length=32,
                                        description="Ready, Running, Succeeded, Failed, Reconciling, Stalled, "
                                        "GatePassed, Queued.")
    start_time: str | None = Field(default=None, description="When serving was requested (RFC 3339).")
    completion_time: str | None = Field(default=None, description="When the evaluation finished (RFC 3339).")
    children: EvalChildren | None = Field(default=None, description="Names of the child objects.")
    candidate_count: int | None = Field(default=None, description="Number of candidates.", ge=0)
    candidates: list[CandidateResult] = Field(default_factory=list, max_length=16,
                                              description="Per-candidate results.")
    gate: GateResult | None = Field(default=None, description="The gate's verdict.")
    progress: EvalProgress | None = Field(default=None, description="Live progress from the evaluator.")
    report: ReportLocation | None = Field(default=None, description="Where the report is.")
    evaluation_error: str | None = Field(default=None, description="Why the evaluator stopped before "
                                         "scoring, naming the field or data row (it reports this itself).",
                                         max_length=4096)
    ray_job_status: str | None = Field(default=None, description="The evaluation RayJob's "
                                       "jobDeploymentStatus/jobStatus.", max_length=128)
    retries: int | None = Field(default=None, description="Children re-created after being deleted while the "
                                "EvalJob ran (at most spec.backoffLimit).", ge=0)
    tracking_warning: str | None = Field(default=None, description="The first experiment-tracking failure "
                                         "(the evaluation went on): backend and error.", max_length=1024)


class EvalJob(ApiModel):
    """EvalJob serves candidate models and scores them on a task against baselines."""

    model_config = ApiModel.model_config | {"extra": "ignore"}

    api_version: str = Field(default=API_VERSION, description="API version.")
    kind: Literal["EvalJob"] = Field(default="EvalJob", description="Kind.")
    metadata: ObjectMeta = Field(description="Standard object metadata.")
    spec: EvalJobSpec = Field(description="Desired state.")
    status: EvalJobStatus = Field(default_factory=EvalJobStatus, description="Observed state.")

    @classmethod
    def from_body(cls, body: Any) -> EvalJob:
        """Parse a kopf body (or any mapping) once; a status that does not parse is treated as empty."""
        job: EvalJob = cls.from_wire({"apiVersion": body.get("apiVersion", API_VERSION), "kind": KIND,
                                      "metadata": dict(body.get("metadata") or {}),
                                      "spec": dict(body.get("spec") or {})})
        try:
            job.status = EvalJobStatus.from_wire(dict(body.get("status") or {}))
        except ValueError:
            job.status = EvalJobStatus()
        return job
