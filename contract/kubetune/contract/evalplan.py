"""The resolved evaluation plan: what the evaluator runs, decided by the operator (or `kubetune run`).

An EvalJob names its candidates abstractly (a FineTuneJob, a model directory, a Hub id, an endpoint);
the plan says, for each one, which URL to call with which model name, prompt, stop sequences and API
key. The operator writes it into the evaluation RayJob's ConfigMap; `kubetune run` builds the same
plan with local URLs. `python -m kubetune.serving.evaluate --plan plan.json` runs it. Pure data: no I/O.
"""

from __future__ import annotations

import re
import string
from typing import Any

from pydantic import Field

from kubetune.api.common import ApiModel, DataSource, ObjectMeta, SecretKeyReference
from kubetune.api.evaljob import Candidate, EvalJob, EvalJobSpec, GateCheck, GateResult
from kubetune.api.evaluation import CandidatePrompt, Generation
from kubetune.api.finetunejob import EpochResult, FineTuneJob
from kubetune.contract.tracking import TrackingTarget, evaluation_target

# Environment variable that carries a candidate's API key into the evaluator pod (from its Secret).
API_KEY_ENV_PREFIX = "KUBETUNE_API_KEY_"


class PlannedCandidate(ApiModel):
    """One candidate as the evaluator calls it."""

    name: str = Field(description="Candidate name.")
    base_url: str = Field(description="OpenAI-compatible base URL, ending in /v1.")
    model: str = Field(description="Model name sent in requests (the served name, or the endpoint's).")
    served: bool = Field(description="kubetune serves it (a RayService, or local Ray Serve).")
    model_uri: str | None = Field(default=None, description="What is served: a directory URI or Hub id.")
    service: str | None = Field(default=None, description="The RayService serving it (cluster only).")
    api_key_env: str | None = Field(default=None, description="Environment variable holding the API key.")
    api_key_secret_ref: SecretKeyReference | None = Field(default=None, description="Where the key is.")
    prompt: CandidatePrompt = Field(description="Resolved prompt.")
    generation: Generation = Field(description="Resolved sampling parameters (stop sequences merged).")
    fine_tune_job: str | None = Field(default=None, description="The FineTuneJob it came from.")
    special_tokens: list[str] = Field(default_factory=list,
                                      description="Special tokens of its fine-tuning (kept in the output).")


class EvalPlan(ApiModel):
    """Everything `kubetune.serving.evaluate` needs, resolved."""

    eval_job: ObjectMeta = Field(description="The EvalJob (name, namespace) results are reported to.")
    spec: EvalJobSpec = Field(description="The EvalJob's spec.")
    candidates: list[PlannedCandidate] = Field(description="Resolved candidates, in spec order.")
    learning_curve: list[EpochResult] = Field(
        default_factory=list, description="Epochs of the FineTuneJob behind the first fine-tuned candidate.")
    base_val_perplexity: float | None = Field(default=None, description="That run's base-model perplexity.")
    tracking: TrackingTarget | None = Field(default=None, description="The experiment-tracking run the scores "
                                            "are logged to (spec.tracking).")


def completion_prefix(completion: str) -> str:
    """The literal text a completion template starts with: '<START_A>{mr}' -> '<START_A>'."""
    prefix = ""
    for literal, field, _spec, _conv in string.Formatter().parse(completion):
        prefix += literal  # the parser has already unescaped {{ and }}
        if field is not None:
            break
    return prefix


def fine_tuned_prompt(ftj: FineTuneJob) -> tuple[CandidatePrompt, list[str]]:
    """A fine-tuned model's own format: the training prompt plus the completion's literal prefix.

    Returns (prompt, stop sequences): the model was trained on prompt + completion + stop, so at inference
    it is given prompt + the completion's fixed beginning and stops at the stop token.
    """
    template = ftj.spec.dataset.template
    text = template.prompt + completion_prefix(template.completion).replace("{", "{{").replace("}", "}}")
    stops = [template.stop] if template.stop else []
    return CandidatePrompt(template=text), stops


def merged_generation(candidate: Candidate, extra_stops: list[str]) -> Generation:
    stops = list(candidate.generation.stop)
    stops += [s for s in extra_stops if s not in stops]
    return candidate.generation.model_copy(update={"stop": stops[:8]})


def service_name(eval_job: str, candidate: str) -> str:
    """Deterministic RayService name `<evaljob>-<candidate>`, shortened with a hash past 40 characters.

    KubeRay derives Service and pod names from it (`<name>-serve-svc`, `<name>-head-...`), which must
    stay DNS labels of at most 63 characters.
    """
    name = f"{eval_job}-{candidate}"
    if len(name) <= 40:
        return name
    import hashlib

    digest = hashlib.sha256(name.encode()).hexdigest()[:6]
    return f"{name[:33].rstrip('-')}-{digest}"


def cluster_base_url(service: str, namespace: str, port: int = 8000) -> str:
    """The Ray Serve endpoint of a RayService inside the cluster (its `<name>-serve-svc` Service)."""
    return f"http://{service}-serve-svc.{namespace}.svc:{port}/v1"


def api_key_env(candidate: str) -> str:
    return API_KEY_ENV_PREFIX + re.sub(r"[^A-Z0-9]", "_", candidate.upper())


def plan(job: EvalJob, model_uris: dict[str, str], fine_tune_jobs: dict[str, FineTuneJob],
         base_urls: dict[str, str]) -> EvalPlan:
    """Resolve `job` given each served candidate's model URI and base URL, and the referenced FineTuneJobs.

    `model_uris[c]`: what candidate c serves (a FineTuneJob's best checkpoint, a uri, a Hub id);
    `base_urls[c]`: where it is served. Endpoint candidates need neither.
    """
    out: list[PlannedCandidate] = []
    curve: list[EpochResult] = []
    base_ppl: float | None = None
    for c in job.spec.candidates:
        prompt = c.prompt
        stops: list[str] = []
        special: list[str] = []
        ftj_name = c.model.fine_tune_job_ref.name if c.model.fine_tune_job_ref else None
        if ftj_name is not None:
            ftj = fine_tune_jobs[ftj_name]
            own_prompt, stops = fine_tuned_prompt(ftj)
            prompt = prompt or own_prompt
            special = list(ftj.spec.dataset.template.special_tokens)
            if not curve:
                curve = list(ftj.status.epochs)
                base_ppl = ftj.status.base_val_perplexity
        assert prompt is not None  # the model validator requires it for non-FineTuneJob candidates
        if c.model.endpoint is not None:
            ep = c.model.endpoint
            out.append(PlannedCandidate(
                name=c.name, base_url=ep.url.rstrip("/"), model=ep.model, served=False,
                api_key_env=api_key_env(c.name) if ep.api_key_secret_ref else None,
                api_key_secret_ref=ep.api_key_secret_ref, prompt=prompt, generation=merged_generation(c, stops)))
            continue
        out.append(PlannedCandidate(
            name=c.name, base_url=base_urls[c.name], model=c.name, served=True, model_uri=model_uris[c.name],
            service=service_name(job.metadata.name, c.name), prompt=prompt,
            generation=merged_generation(c, stops), fine_tune_job=ftj_name, special_tokens=special))
    return EvalPlan(eval_job=job.metadata, spec=job.spec, candidates=out, learning_curve=curve,
                    base_val_perplexity=base_ppl, tracking=evaluation_target(job, fine_tune_jobs))


def evaljob_for(ftj: FineTuneJob, base_model: str) -> dict[str, Any]:
    """The EvalJob manifest FineTuneJob.spec.evaluation asks for: fine-tuned vs base model few-shot.

    `base_model` is what the baseline serves: the FineTuneJob's base model, its Hub id (baseModel.name) or
    a model directory URI (baseModel.uri, or the checkpoint a fineTuneJobRef resolved to).
    """
    ev = ftj.spec.evaluation
    assert ev is not None
    baseline = ev.baseline_prompt
    if baseline.few_shot is not None and baseline.few_shot.k > 0 and baseline.few_shot.source is None:
        train = ftj.spec.dataset.train
        baseline = baseline.model_copy(update={"few_shot": baseline.few_shot.model_copy(
            update={"source": DataSource(uri=train.uri, format=train.format, columns=train.columns)})})
    if not base_model:
        raise ValueError(f"FineTuneJob {ftj.metadata.name}: no base model to compare with")
    base_model_field: dict[str, Any] = (
        {"name": base_model} if base_model == ftj.spec.base_model.name else {"uri": base_model})
    token = ftj.spec.base_model.token_secret_ref
    if "name" in base_model_field and token is not None:  # a gated base model: the same token serves it
        base_model_field["tokenSecretRef"] = token.to_wire()
    gen = ev.generation.to_wire()
    spec: dict[str, Any] = {
        "candidates": [
            {"name": "fine-tuned", "model": {"fineTuneJobRef": {"name": ftj.metadata.name}}, "generation": gen},
            {"name": "base-few-shot", "model": base_model_field, "prompt": baseline.to_wire(),
             "generation": gen},
        ],
        "dataset": ev.dataset.to_wire(),
        "scorer": ev.scorer.to_wire(),
        "serving": ev.serving.to_wire(),
        "concurrency": ev.concurrency,
        "output": (ev.output.to_wire() if ev.output else {"uri": ftj.spec.output.uri.rstrip("/") + "/eval"}),
    }
    if ev.gate is not None:
        spec["gate"] = ev.gate.to_wire()
    if ftj.spec.tracking is not None:  # the same backends, and TensorBoard's folder, as the training's
        spec["tracking"] = ftj.spec.tracking.with_defaults(ftj.spec.output.uri).to_wire()
    # The FineTuneJob's pods' settings (the identity that wrote the checkpoint reads it back) and its queue.
    if ftj.spec.pod_template is not None:
        spec["podTemplate"] = ftj.spec.pod_template.to_wire()
    for field, value in (("queueName", ftj.spec.queue_name),
                         ("workloadPriorityClassName", ftj.spec.workload_priority_class_name)):
        if value is not None:
            spec[field] = value
    return {"apiVersion": ftj.api_version, "kind": "EvalJob",
            "metadata": {"name": evaljob_name(ftj.metadata.name), "namespace": ftj.metadata.namespace},
            "spec": spec}


def evaljob_name(ftj_name: str) -> str:
    """`<job>-eval`, within the 63-character DNS label."""
    return f"{ftj_name[:58].rstrip('-')}-eval"


# -- the gate --------------------------------------------------------------------------------------

DEFAULT_METRICS = {"viggo": "exactMatch", "gsm8k": "accuracy", "sqlExecution": "executionAccuracy",
                   "exactMatch": "exactMatch", "chrf": "chrf", "bleu": "bleu"}


def judge_gate(spec: EvalJobSpec, metrics: dict[str, dict[str, float]]) -> GateResult | None:
    """The gate's verdict over each candidate's metrics; None when the EvalJob has no gate.

    A metric a candidate lacks (its requests all failed, say) fails the check that needs it.
    """
    gate = spec.gate
    if gate is None:
        return None
    metric = gate.metric or DEFAULT_METRICS[spec.scorer.name]
    value = metrics.get(gate.candidate, {}).get(metric)
    checks: list[GateCheck] = []
    if gate.minimum is not None:
        checks.append(GateCheck(description=f"{gate.candidate} {metric} >= {gate.minimum:g}",
                                passed=value is not None and value >= gate.minimum,
                                value=value, threshold=gate.minimum))
    for beat in gate.beats:
        other = metrics.get(beat.candidate, {}).get(metric)
        threshold = None if other is None else other + beat.margin
        # To beat is to be strictly better: a tie fails even with margin 0. The margin is met "at least"
        # (up to float rounding: 0.55 beats 0.50 by 0.05).
        beaten = (value is not None and other is not None and value > other
                  and value - other >= beat.margin - 1e-9)
        checks.append(GateCheck(
            description=(f"{gate.candidate} {metric} > {beat.candidate} {metric}" if beat.margin == 0 else
                         f"{gate.candidate} {metric} >= {beat.candidate} {metric} + {beat.margin:g}"),
            passed=beaten, value=value, threshold=threshold))
    failed = [c for c in checks if not c.passed]
    shown = "n/a" if value is None else f"{value:.4g}"
    if failed:
        detail = "; ".join(f"{c.description}: {shown} vs {'n/a' if c.threshold is None else f'{c.threshold:.4g}'}"
                           for c in failed)
        message = f"gate failed: {detail}"
    else:
        message = f"gate passed: {gate.candidate} {metric} = {shown} ({len(checks)} check(s))"
    return GateResult(passed=not failed, metric=metric, message=message, checks=checks)
