"""Evaluation building blocks shared by EvalJob and FineTuneJob.spec.evaluation.

An evaluation sends every row of a dataset to each candidate model, with the candidate's own prompt,
and scores the completions against the row's reference answer with a task scorer.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator

from kubetune.api.common import (
    TEMPLATE_PATTERN,
    ApiModel,
    DataSource,
    ImageReference,
    LabelValue,
    NodeSelector,
    PodResources,
    RayVersion,
    Toleration,
    Uri,
    defaulted,
    template_fields,
)

SCORER_NAMES = ("viggo", "sqlExecution", "gsm8k", "exactMatch", "chrf", "bleu")
ScorerName = Literal["viggo", "sqlExecution", "gsm8k", "exactMatch", "chrf", "bleu"]

# HF-datasets-style slice of the rows: "[:500]", "[80%:]", "[-200:]", "[100:300]".
SPLIT_PATTERN = r"^\[(-?[0-9]+%?)?:(-?[0-9]+%?)?\]$"
METRIC_PATTERN = r"^[A-Za-z][A-Za-z0-9_]*$"


def _template(value: str) -> str:
    template_fields(value)
    return value


class EvalDataset(DataSource):
    """The rows every candidate answers, and where each row's reference answer is."""

    model_config = DataSource.model_config | {
        "json_schema_extra": {
            "x-kubernetes-validations": [
                {"rule": f"self.reference.matches('{TEMPLATE_PATTERN}')", "fieldPath": ".reference",
                 "message": "dataset.reference: placeholders must be field names like {answer}"},
            ]
        }
    }

    reference: str = Field(
        description="Format string of the reference (gold) answer, e.g. '{mr}' (ViGGO), '{answer}' (GSM8K, "
        "SQL).", min_length=1, max_length=4096,
    )
    split: str | None = Field(
        default=None, pattern=SPLIT_PATTERN, max_length=32,
        description="Slice of the file's rows, as in Hugging Face datasets: '[:500]', '[80%:]', '[-200:]'. "
        "Applied before `limit`.",
    )
    limit: int | None = Field(default=None, description="Evaluate at most this many rows (after `split`).",
                              ge=1, le=1_000_000)

    _reference_parses = field_validator("reference")(_template)


class FewShot(ApiModel):
    """Worked examples put in front of every prompt (for baselines that were not fine-tuned)."""

    k: int = Field(default=3, description="Number of examples.", ge=0, le=64)
    source: DataSource | None = Field(
        default=None, description="Rows the examples are drawn from (never the evaluated rows); defaults to "
        "the FineTuneJob's training data when the evaluation is declared in a FineTuneJob.",
    )
    seed: int = Field(default=0, description="Seed of the draw: the same examples for every row.", ge=0)
    separator: str = Field(default="\n\n", description="Text between examples and before the question.",
                           max_length=256)


class CandidatePrompt(ApiModel):
    """How a candidate sees a row: an optional instruction, optional few-shot examples, the row's prompt."""

    model_config = ApiModel.model_config | {
        "json_schema_extra": {
            "x-kubernetes-validations": [
                {"rule": f"self.template.matches('{TEMPLATE_PATTERN}')", "fieldPath": ".template",
                 "message": "prompt.template: placeholders must be field names like {question}"},
                {"rule": f"!has(self.answer) || self.answer.matches('{TEMPLATE_PATTERN}')",
                 "fieldPath": ".answer",
                 "message": "prompt.answer: placeholders must be field names like {answer}"},
            ]
        }
    }

    template: str = Field(
        description="Format string of the question part, e.g. '<START_Q>{ref}<END_Q><START_A>' for a model "
        "fine-tuned with special tokens, or 'Sentence: {ref}\\nMeaning representation:' for a baseline.",
        min_length=1, max_length=65536,
    )
    answer: str | None = Field(
        default=None, max_length=65536,
        description="Format string of a few-shot example's answer, appended to its template; defaults to the "
        "dataset's reference followed by the first stop sequence.",
    )
    instruction: str = Field(default="", description="Text before everything else (the task description).",
                             max_length=65536)
    few_shot: FewShot | None = Field(default=None, description="Few-shot examples.")
    chat: bool = Field(
        default=False,
        description="Send the prompt as one user message to /v1/chat/completions (chat models, external "
        "endpoints) instead of raw text to /v1/completions.",
    )

    _templates_parse = field_validator("template", "answer")(
        lambda v: v if v is None else _template(v))


class Generation(ApiModel):
    """Sampling parameters of every request."""

    max_tokens: int = Field(default=256, description="Most tokens generated per answer.", ge=1, le=32768)
    temperature: float = Field(default=0.0, description="0 is greedy decoding (reproducible scores).",
                               ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, description="Nucleus sampling mass.", gt=0.0, le=1.0)
    stop: list[Annotated[str, Field(min_length=1, max_length=64)]] = Field(
        default_factory=list, max_length=8,
        description="Stop sequences; generation ends before them. For a fineTuneJobRef candidate the job's "
        "template.stop is added.",
    )
    seed: int | None = Field(default=None, description="Sampling seed when temperature > 0.", ge=0)


class ScorerSpec(ApiModel):
    """How completions are scored."""

    name: ScorerName = Field(
        description="viggo (function, attribute set and order-sensitive exact match of ViGGO meaning "
        "representations), sqlExecution (execution match on the example's tables), gsm8k ('#### <n>'), "
        "exactMatch, chrf or bleu (sacrebleu)."
    )
    options: dict[str, str] = Field(
        default_factory=dict, max_length=32,
        description="Scorer options, e.g. caseSensitive: 'false' for exactMatch.",
    )


class GateComparison(ApiModel):
    """The gated candidate must beat another candidate on the metric by a margin."""

    candidate: str = Field(description="Name of the candidate to beat.", min_length=1, max_length=63)
    margin: float = Field(default=0.0, description="By at least this much (absolute, in the metric's units); "
                          "with 0 it must be strictly better, so a tie fails.",
                          ge=0.0)


class GateSpec(ApiModel):
    """Pass/fail verdict of the evaluation: Failed with reason GateFailed when not met."""

    model_config = ApiModel.model_config | {
        "json_schema_extra": {
            "x-kubernetes-validations": [
                {"rule": "has(self.minimum) || size(self.beats) > 0",
                 "message": "gate: set minimum and/or beats"},
            ]
        }
    }

    candidate: str = Field(description="The candidate the gate judges.", min_length=1, max_length=63)
    metric: str | None = Field(default=None, pattern=METRIC_PATTERN, max_length=63,
                               description="Metric name; defaults to the scorer's headline metric "
                               "(viggo: exactMatch, gsm8k: accuracy, sqlExecution: executionAccuracy).")
    minimum: float | None = Field(default=None, description="The metric must reach at least this value "
                                  "(accuracies are fractions 0..1; chrf and bleu are 0..100).")
    beats: list[GateComparison] = Field(default_factory=list, max_length=16,
                                        description="Candidates the gated one must beat.")

    @model_validator(mode="after")
    def _something(self) -> GateSpec:
        if self.minimum is None and not self.beats:
            raise ValueError("set minimum and/or beats")
        return self


def _default_serving_tolerations() -> list[Toleration]:
    return [Toleration(key="nvidia.com/gpu", operator="Exists", effect="NoSchedule")]


class ServingSpec(ApiModel):
    """The Ray Serve deployment (a KubeRay RayService) each kubetune-served candidate gets."""

    engine: Literal["vllm", "transformers"] = Field(
        default="vllm", description="vllm (Ray Serve LLM, GPU) or transformers (CPU fallback, same API).")
    replicas: int = Field(default=1, description="Model replicas (one GPU worker pod each).", ge=1, le=64)
    gpus_per_replica: int = Field(default=1, description="nvidia.com/gpu per replica; 0 serves on CPU.",
                                  ge=0, le=16)
    gpu_type: LabelValue = Field(default="A10G", min_length=1,
                                 description="GPU model, mapped to the node label nvidia.com/gpu.product "
                                 "(any other value is the label value as-is, so it must be one).")
    node_selector: NodeSelector = Field(default_factory=dict, max_length=64,
                                        description="Extra node labels the worker pods must match.")
    tolerations: list[Toleration] = defaulted(
        _default_serving_tolerations, "Tolerations of the worker pods.", max_length=64)
    worker: PodResources = defaulted(lambda: PodResources(cpu="8", memory="32Gi"),
                                     "CPU and memory of each worker pod.")
    head: PodResources = defaulted(lambda: PodResources(cpu="2", memory="8Gi"),
                                   "CPU and memory of the head pod.")
    max_batch_size: int = Field(default=32, description="Requests batched together per replica.", ge=1,
                                le=1024)
    max_model_len: int | None = Field(default=None, description="Context length served (vLLM).", ge=16,
                                      le=1_048_576)
    image: ImageReference = Field(default="ghcr.io/kubetune/kubetune-runtime:0.1.0",
                                  description="Image with Ray Serve, vLLM and kubetune's serving code.")
    ray_version: RayVersion = Field(default="2.60.0", description="Ray version inside the image "
                                         "(at least 2.52.0: Ray token authentication).")


class EvalOutput(ApiModel):
    """Where results.json, report.html and the plots go."""

    uri: Uri = Field(description="s3://bucket/prefix, pvc://claim/path or a local path.")


class EvaluationSpec(ApiModel):
    """FineTuneJob.spec.evaluation: on success, compare the fine-tuned model with the base model few-shot.

    The operator creates an owned EvalJob `<job>-eval` with two candidates: `fine-tuned` (the best
    checkpoint, the job's own template) and `base-few-shot` (the base model with `baselinePrompt`, whose
    few-shot examples default to the job's training rows) — the seed case study's comparison. The EvalJob
    gets the FineTuneJob's podTemplate (the identity that wrote the checkpoint reads it back), queueName and
    workloadPriorityClassName.
    """

    dataset: EvalDataset = Field(description="Evaluation rows (held out from training).")
    scorer: ScorerSpec = Field(description="Task scorer.")
    baseline_prompt: CandidatePrompt = Field(description="Prompt of the base-model baseline (instruction, "
                                             "template, few-shot).")
    generation: Generation = defaulted(Generation, "Sampling parameters of both candidates.")
    gate: GateSpec | None = Field(default=None, description="Pass/fail criterion; candidates are named "
                                  "fine-tuned and base-few-shot.")
    serving: ServingSpec = defaulted(ServingSpec, "How both models are deployed.")
    concurrency: int = Field(default=32, description="Requests in flight per candidate.", ge=1, le=4096)
    output: EvalOutput | None = Field(default=None, description="Where the report goes; defaults to "
                                      "<job output>/eval.")
