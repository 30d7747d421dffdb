"""FineTuneJob (kubetune.io/v1alpha1): full-parameter fine-tuning of an open LLM on a KubeRay RayJob.

These models are the single source of truth: the CRD in crds/ is generated from them (`make crds`),
the operator parses `body` with them once, and the trainer reads the same spec from its ConfigMap.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator

from kubetune.api.common import (
    API_VERSION,
    TEMPLATE_PATTERN,
    ApiModel,
    Condition,
    ConfigMapKeyReference,
    DataSource,
    ImageReference,
    LabelValue,
    LocalObjectReference,
    NodeSelector,
    ObjectMeta,
    PodResources,
    RayVersion,
    SecretKeyReference,
    Toleration,
    Uri,
    defaulted,
    template_fields,
)
from kubetune.api.evaluation import EvaluationSpec
from kubetune.api.pods import QUEUE_RULE, KueueName, PodTemplate, check_queue
from kubetune.api.tracking import TrackingSpec

KIND = "FineTuneJob"
PLURAL = "finetunejobs"
TRUNCATE_WITH_COMPLETION_LOSS = (
    "dataset.truncation: truncate with lossOn completion keeps the prompt of a long row and cuts its answer "
    "and stop token, which teaches the model to stop mid-answer or not at all; use dropTruncated or fail, "
    "or raise maxLength")


def _count_set(*names: str) -> str:
    """CEL: how many of the optional fields are set."""
    return " + ".join(f"(has(self.{n}) ? 1 : 0)" for n in names)


class BaseModelSource(ApiModel):
    """Where the model to fine-tune comes from: exactly one of name, uri, fineTuneJobRef."""

    model_config = ApiModel.model_config | {
        "json_schema_extra": {
            "x-kubernetes-validations": [
                {
                    "rule": _count_set("name", "uri", "fineTuneJobRef") + " == 1",
                    "message": "baseModel: set exactly one of name, uri, fineTuneJobRef",
                },
                {
                    "rule": "!has(self.tokenSecretRef) || has(self.name)",
                    "message": "baseModel.tokenSecretRef is only used with baseModel.name",
                },
            ]
        }
    }

    name: str | None = Field(
        default=None,
        description="Hugging Face model id, e.g. meta-llama/Llama-2-7b-hf.",
        min_length=1,
        max_length=256,
    )
    revision: str | None = Field(
        default=None, description="Hub revision (branch, tag or commit) of `name`.", max_length=256
    )
    token_secret_ref: SecretKeyReference | None = Field(
        default=None, description="Secret key holding a Hugging Face token, for gated models."
    )
    uri: Uri | None = Field(
        default=None,
        description="Model directory: s3://bucket/prefix, pvc://claim/path, or a local path in the image.",
    )
    fine_tune_job_ref: LocalObjectReference | None = Field(
        default=None,
        description="Another FineTuneJob in this namespace: its best checkpoint is the base (two-stage tuning).",
    )

    @model_validator(mode="after")
    def _exactly_one_source(self) -> BaseModelSource:
        given = [n for n in ("name", "uri", "fine_tune_job_ref") if getattr(self, n) is not None]
        if len(given) != 1:
            raise ValueError("set exactly one of name, uri, fineTuneJobRef"
                             + (f" (got {', '.join(given)})" if given else ""))
        if self.token_secret_ref is not None and self.name is None:
            raise ValueError("tokenSecretRef is only used with name")
        return self


class PromptTemplate(ApiModel):
    """How a row becomes one training sequence: prompt + completion + stop token."""

    model_config = ApiModel.model_config | {
        "json_schema_extra": {
            "x-kubernetes-validations": [
                {"rule": f"self.{f}.matches('{TEMPLATE_PATTERN}')", "fieldPath": f".{f}",
                 "message": f"template.{f}: placeholders must be field names like {{question}} "
                            "(write {{{{ and }}}} for literal braces)"}
                for f in ("prompt", "completion")
            ]
        }
    }

    special_tokens: list[Annotated[str, Field(min_length=1, max_length=64)]] = Field(
        default_factory=list,
        json_schema_extra={"x-kubernetes-list-type": "set"},
        description="Tokens added to the tokenizer as special tokens (the embeddings are resized), "
        "e.g. ['<START_Q>', '<END_Q>', '<START_A>', '<END_A>'].",
        max_length=256,
    )
    prompt: str = Field(
        default="",
        description="Format string of the prompt, with {field} placeholders, e.g. '<START_Q>{ref}<END_Q>'.",
        max_length=65536,
    )
    completion: str = Field(
        default="",
        description="Format string of the completion the model learns to produce, e.g. '<START_A>{mr}'.",
        max_length=65536,
    )
    stop: str | None = Field(
        default=None,
        description="Token appended to every completion and used as the stop sequence at inference; "
        "defaults to the tokenizer's EOS token.",
        max_length=64,
    )

    @field_validator("prompt", "completion")
    @classmethod
    def _placeholders_parse(cls, value: str) -> str:
        template_fields(value)
        return value

    @field_validator("special_tokens")
    @classmethod
    def _unique_tokens(cls, value: list[str]) -> list[str]:
        dupes = sorted({t for t in value if value.count(t) > 1})
        if dupes:
            raise ValueError(f"duplicate special tokens: {', '.join(dupes)}")
        return value


class Truncation(StrEnum):
    """What pre-flight does with a row longer than `maxLength` tokens."""

    DROP_TRUNCATED = "dropTruncated"  # leave the row out of training (and of validation), counted
    TRUNCATE = "truncate"  # keep its first maxLength tokens: its end and its stop token are lost
    FAIL = "fail"  # fail pre-flight, naming the first such row


class DatasetSpec(ApiModel):
    """Training data, validation data and the prompt format."""

    model_config = ApiModel.model_config | {
        "json_schema_extra": {
            "x-kubernetes-validations": [
                {
                    "rule": "has(self.validation) != has(self.validationSplit)",
                    "message": "dataset: set exactly one of validation, validationSplit",
                },
                {
                    "rule": "self.train.format == 'chat' || (self.template.prompt != '' && "
                    "self.template.completion != '')",
                    "message": "dataset.template.prompt and dataset.template.completion are required "
                    "unless the data is in chat format",
                },
                {
                    "rule": "!has(self.truncation) || self.truncation != 'truncate' || "
                    "!has(self.lossOn) || self.lossOn != 'completion'",
                    "message": TRUNCATE_WITH_COMPLETION_LOSS,
                },
            ]
        }
    }

    train: DataSource = Field(description="Training data.")
    validation: DataSource | None = Field(default=None, description="Validation data (perplexity every epoch).")
    validation_split: float | None = Field(
        default=None,
        description="Fraction of the training rows held out for validation, instead of `validation`.",
        gt=0.0,
        lt=0.5,
    )
    template: PromptTemplate = defaulted(PromptTemplate, "Prompt format.")
    loss_on: Literal["all", "completion"] = Field(
        default="all",
        description="Compute the loss on all tokens (as the seed case study) or on the completion only.",
    )
    max_length: int = Field(default=512, description="Context length in tokens; what happens to a longer row is "
                            "`truncation`.", ge=16, le=131072)
    truncation: Truncation | None = Field(
        default=None,
        description="What to do with a row longer than maxLength: dropTruncated (leave it out, counted in "
        "pre-flight and status.data), truncate (keep its first maxLength tokens; it loses the end of its "
        "completion and its stop token) or fail. Default: dropTruncated with lossOn completion, truncate with "
        "lossOn all. truncate with lossOn completion is refused: a cut answer without its stop token teaches "
        "the model to stop mid-answer or not at all.",
    )

    @model_validator(mode="after")
    def _consistent(self) -> DatasetSpec:
        if (self.validation is None) == (self.validation_split is None):
            raise ValueError("set exactly one of validation, validationSplit")
        if self.train.format != "chat" and not (self.template.prompt and self.template.completion):
            raise ValueError("template.prompt and template.completion are required unless format is chat")
        if self.truncation == Truncation.TRUNCATE and self.loss_on == "completion":
            raise ValueError(TRUNCATE_WITH_COMPLETION_LOSS)
        return self

    @property
    def truncation_policy(self) -> Truncation:
        """`truncation`, or its default for `lossOn`."""
        if self.truncation is not None:
            return self.truncation
        return Truncation.DROP_TRUNCATED if self.loss_on == "completion" else Truncation.TRUNCATE


class EarlyStopping(ApiModel):
    """When to stop before the last epoch."""

    patience: int | None = Field(
        default=None, description="Stop after this many epochs without a lower validation perplexity.",
        ge=1, le=1000,
    )
    target_perplexity: float | None = Field(
        default=None, description="Stop as soon as validation perplexity is at or below this value.", gt=1.0
    )


class Hyperparameters(ApiModel):
    """Optimisation settings."""

    epochs: int = Field(default=10, description="Number of passes over the training data.", ge=1, le=1000)
    learning_rate: float = Field(default=1e-5, description="Peak learning rate (AdamW).", gt=0.0, le=1.0)
    per_device_batch_size: int = Field(default=16, description="Sequences per worker per micro-step.",
                                       ge=1, le=4096)
    gradient_accumulation_steps: int = Field(default=1, description="Micro-steps per optimizer step.",
                                             ge=1, le=1024)
    warmup_ratio: float = Field(default=0.0, description="Share of optimizer steps spent warming up.",
                                ge=0.0, lt=1.0)
    weight_decay: float = Field(default=0.0, description="AdamW weight decay.", ge=0.0, le=1.0)
    scheduler: Literal["cosine", "linear", "constant"] = Field(
        default="cosine", description="Learning-rate schedule after warmup."
    )
    max_grad_norm: float = Field(default=1.0, description="Gradient clipping norm; 0 disables.", ge=0.0)
    seed: int = Field(default=42, description="Random seed (data order, initialisation of new embeddings).",
                      ge=0)
    early_stopping: EarlyStopping | None = Field(default=None, description="Optional early stopping.")


OffloadDevice = Literal["none", "cpu"]


class DeepSpeedSpec(ApiModel):
    """DeepSpeed ZeRO settings (or a raw DeepSpeed config in a ConfigMap, which then takes precedence)."""

    model_config = ApiModel.model_config | {
        "json_schema_extra": {
            "x-kubernetes-validations": [
                {
                    "rule": "self.offloadParams == 'none' || self.zeroStage == 3",
                    "message": "deepspeed.offloadParams requires zeroStage 3",
                },
                {
                    "rule": "self.offloadOptimizer == 'none' || self.zeroStage >= 1",
                    "message": "deepspeed.offloadOptimizer requires zeroStage 1, 2 or 3",
                },
            ]
        }
    }

    zero_stage: int = Field(default=3, description="ZeRO stage: 0 (DDP), 1, 2 or 3 (shard parameters).",
                            ge=0, le=3)
    offload_optimizer: OffloadDevice = Field(default="cpu", description="Where optimizer state lives.")
    offload_params: OffloadDevice = Field(default="none",
                                          description="Where parameters live between uses (ZeRO-3 only).")
    gradient_checkpointing: bool = Field(default=True,
                                         description="Recompute activations in the backward pass to save memory.")
    precision: Literal["bf16", "fp16", "fp32"] = Field(default="bf16", description="Training precision.")
    config_map_ref: ConfigMapKeyReference | None = Field(
        default=None, description="A ConfigMap key holding a raw DeepSpeed JSON config used as-is."
    )

    @model_validator(mode="after")
    def _consistent(self) -> DeepSpeedSpec:
        if self.offload_params != "none" and self.zero_stage != 3:
            raise ValueError("offloadParams requires zeroStage 3")
        if self.offload_optimizer != "none" and self.zero_stage == 0:
            raise ValueError("offloadOptimizer requires zeroStage 1, 2 or 3")
        return self


def _default_tolerations() -> list[Toleration]:
    return [Toleration(key="nvidia.com/gpu", operator="Exists", effect="NoSchedule")]


class ResourcesSpec(ApiModel):
    """The Ray cluster the job runs on: a CPU head and a group of GPU workers."""

    workers: int = Field(default=16, description="Number of Ray Train workers (one pod each).", ge=1, le=1024)
    gpus_per_worker: int = Field(default=1, description="nvidia.com/gpu per worker pod; 0 trains on CPU.",
                                 ge=0, le=16)
    gpu_type: LabelValue = Field(
        default="A10G",
        description="GPU model, mapped to the node label nvidia.com/gpu.product (A10G, A100-40GB, A100-80GB, "
        "H100, H200, L4, L40S, T4, V100); any other value is used as the label value as-is, so it must be one.",
        min_length=1,
    )
    node_selector: NodeSelector = Field(
        default_factory=dict, description="Extra node labels the worker pods must match (label keys and values).",
        max_length=64,
    )
    tolerations: list[Toleration] = defaulted(
        _default_tolerations,
        "Tolerations of the worker pods; by default the nvidia.com/gpu taint is tolerated.",
        max_length=64,
    )
    worker: PodResources = defaulted(lambda: PodResources(cpu="8", memory="48Gi"),
                                     "CPU and memory of each worker pod.")
    head: PodResources = defaulted(lambda: PodResources(cpu="4", memory="16Gi"),
                                   "CPU and memory of the head pod (no GPU).")
    image: ImageReference = Field(default="ghcr.io/kubetune/kubetune-runtime:0.1.0",
                                  description="Container image with torch, DeepSpeed, Ray and kubetune's trainer.")
    ray_version: RayVersion = Field(default="2.60.0", description="Ray version inside the image "
                                         "(at least 2.52.0: Ray token authentication).")


class OutputSpec(ApiModel):
    """Where results go."""

    uri: Uri = Field(description="Checkpoints, metrics and logs: s3://bucket/prefix or pvc://claim/path.")
    keep_checkpoints: int = Field(default=1, description="How many best checkpoints (by val perplexity) to keep.",
                                  ge=1, le=100)


class FineTuneJobSpec(ApiModel):
    """Desired state of a FineTuneJob."""

    model_config = ApiModel.model_config | {"json_schema_extra": {"x-kubernetes-validations": [QUEUE_RULE]}}

    base_model: BaseModelSource = Field(description="The model to fine-tune.")
    dataset: DatasetSpec = Field(description="Training and validation data and their prompt format.")
    hyperparameters: Hyperparameters = defaulted(Hyperparameters, "Optimisation settings.")
    deepspeed: DeepSpeedSpec = defaulted(DeepSpeedSpec, "DeepSpeed ZeRO settings.")
    resources: ResourcesSpec = defaulted(ResourcesSpec, "The Ray cluster to run on.")
    pod_template: PodTemplate | None = Field(
        default=None, description="What the job's pods get besides what kubetune builds: ServiceAccount (cloud "
        "identity), env and envFrom, volumes and mounts, labels, annotations, priorityClassName, schedulerName, "
        "worker affinity, imagePullSecrets. kubetune's own settings win; colliding names are rejected.")
    queue_name: KueueName | None = Field(
        default=None, description="Kueue LocalQueue of the namespace: the RayJob is created suspended with the "
        "kueue.x-k8s.io/queue-name label and runs when Kueue admits it (the job is Queued until then).")
    workload_priority_class_name: KueueName | None = Field(
        default=None, description="Kueue WorkloadPriorityClass of the queued RayJob (label "
        "kueue.x-k8s.io/priority-class): its priority in the queue and for preemption. Needs queueName.")
    output: OutputSpec = Field(description="Where checkpoints, metrics and logs are written.")
    suspend: bool = Field(default=False, description="Suspend the job (the Ray cluster is deleted) and resume it; "
                          "a queued job's RayJob is deleted (leaving Kueue's queue) and re-queued on resume.")
    active_deadline_seconds: int | None = Field(
        default=None, description="Fail the job when it has been active longer than this.", ge=1
    )
    pre_running_deadline_seconds: int | None = Field(
        default=None, description="Fail the job when it is not running this long after creation.", ge=1
    )
    backoff_limit: int = Field(default=0, description="Retries (each on a new Ray cluster) before failing.",
                               ge=0, le=100)
    ttl_seconds_after_finished: int | None = Field(
        default=None, description="Delete the children (RayJob, ConfigMap) this long after the job finished; "
        "the FineTuneJob and its status stay.", ge=0
    )
    evaluation: EvaluationSpec | None = Field(
        default=None, description="On success, create an owned EvalJob `<name>-eval` comparing the fine-tuned "
        "model with the base model prompted few-shot."
    )
    tracking: TrackingSpec | None = Field(
        default=None, description="Log parameters, metrics and the best checkpoint to MLflow, Weights & Biases "
        "and/or TensorBoard (and the evaluation's scores, with spec.evaluation).")

    @model_validator(mode="after")
    def _queue(self) -> FineTuneJobSpec:
        check_queue(self.queue_name, self.workload_priority_class_name)
        return self


class Progress(ApiModel):
    """Live training progress, reported by the training driver."""

    epoch: int = Field(default=0, description="Current epoch (1-based; 0 before the first).", ge=0)
    total_epochs: int = Field(default=0, description="Epochs planned.", ge=0)
    step: int = Field(default=0, description="Optimizer steps done so far.", ge=0)
    total_steps: int = Field(default=0, description="Optimizer steps planned.", ge=0)
    train_loss: float | None = Field(default=None, description="Recent training loss.")
    val_perplexity: float | None = Field(default=None, description="Latest validation perplexity.")
    eta_seconds: int | None = Field(default=None, description="Estimated seconds to the end.", ge=0)
    learning_rate: float | None = Field(default=None, description="Learning rate of the last optimizer step.",
                                        ge=0.0)
    grad_norm: float | None = Field(
        default=None, description="Global gradient norm (L2, over all workers, before clipping) of the last "
        "optimizer step; absent where it is not known (a raw DeepSpeed config that turns it off).", ge=0.0)
    tokens_per_second: float | None = Field(
        default=None, description="Real (non-padding) tokens trained per second over all workers, since the "
        "previous report.", ge=0.0)
    update_time: str | None = Field(default=None, description="When the driver last reported (RFC 3339).")


class SplitData(ApiModel):
    """Pre-flight's counts for one split of the data."""

    rows: int = Field(description="Rows read from the data.", ge=0)
    used: int = Field(description="Rows trained (or validated) on.", ge=0)
    tokens: int = Field(description="Tokens of the rows used.", ge=0)
    truncated: int = Field(default=0, description="Rows longer than maxLength that were cut to it and kept "
                           "(truncation: truncate).", ge=0)
    dropped: int = Field(default=0, description="Rows longer than maxLength that were left out "
                         "(truncation: dropTruncated).", ge=0)


class PreflightSummary(ApiModel):
    """What pre-flight found in the data before the first training step (written by the training driver)."""

    max_length: int = Field(description="dataset.maxLength the rows were measured against.", ge=1)
    truncation: Truncation = Field(description="The truncation policy applied (dataset.truncation or its "
                                   "default for lossOn).")
    train: SplitData = Field(description="The training split.")
    validation: SplitData = Field(description="The validation split.")


class EpochResult(ApiModel):
    """Metrics of one finished epoch."""

    epoch: int = Field(description="Epoch number (1-based).", ge=1)
    train_loss: float = Field(description="Mean training loss over the epoch.")
    val_loss: float = Field(description="Mean validation loss.")
    val_perplexity: float = Field(description="exp(validation loss).")
    checkpoint_uri: str | None = Field(default=None, description="Checkpoint written at the end of the epoch: "
                                       "DeepSpeed's sharded training state, for resuming (serve bestCheckpoint).")


class BestCheckpoint(ApiModel):
    """The checkpoint with the lowest validation perplexity."""

    uri: str = Field(description="Where the checkpoint (a Hugging Face model directory) is.")
    epoch: int = Field(description="Epoch it was taken at.", ge=1)
    val_perplexity: float = Field(description="Its validation perplexity.")


class Children(ApiModel):
    """Names of the objects the operator creates for this job (recorded before creating them)."""

    ray_job: str | None = Field(default=None, description="The KubeRay RayJob.")
    ray_cluster: str | None = Field(default=None, description="The RayCluster KubeRay created for the RayJob.")
    config_map: str | None = Field(default=None, description="The ConfigMap with the resolved trainer config.")
    service_account: str | None = Field(default=None,
                                        description="ServiceAccount the Ray pods report progress with.")
    eval_job: str | None = Field(default=None, description="The EvalJob created from spec.evaluation.")


class Phase(StrEnum):
    """A FineTuneJob's phase: the one-word summary of its conditions."""

    PENDING = "Pending"
    WAITING = "Waiting"
    QUEUED = "Queued"  # its RayJob waits for Kueue's admission (spec.queueName), or was preempted
    RUNNING = "Running"
    SUSPENDED = "Suspended"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"
    CANCELLED = "Cancelled"


class FineTuneJobStatus(ApiModel):
    """Observed state of a FineTuneJob."""

    observed_generation: int | None = Field(default=None, description="Generation this status describes.")
    phase: Phase | None = Field(default=None, description="One-word summary of the conditions.")
    conditions: list[Condition] = Field(default_factory=list, description="Ready, Running, Succeeded, Failed, "
                                        "Suspended, Reconciling, Stalled, Queued.", max_length=32)
    children: Children | None = Field(default=None, description="Names of the child objects.")
    ray_job_status: str | None = Field(default=None, description="The RayJob's jobDeploymentStatus/jobStatus.")
    retries: int | None = Field(default=None, description="Failed attempts so far (RayJob retries).", ge=0)
    start_time: str | None = Field(default=None, description="When the RayJob was created (RFC 3339).")
    completion_time: str | None = Field(default=None, description="When the job finished (RFC 3339).")
    progress: Progress | None = Field(default=None, description="Live progress from the training driver.")
    preflight: PreflightSummary | None = Field(default=None, description="What pre-flight found in the data: "
                                               "rows read, used, truncated and dropped per split.")
    epochs: list[EpochResult] = Field(default_factory=list, description="Metrics of every finished epoch.",
                                      max_length=1000)
    best_checkpoint: BestCheckpoint | None = Field(default=None, description="Checkpoint with the lowest val "
                                                   "perplexity.")
    resolved_base_model_uri: str | None = Field(default=None, description="Base model after resolving "
                                                "fineTuneJobRef.")
    base_val_perplexity: float | None = Field(default=None, description="Validation perplexity of the base "
                                              "model before any training step: what the epochs improve on.")
    tracking_warning: str | None = Field(default=None, description="The first experiment-tracking failure "
                                         "(training went on): backend and error.", max_length=1024)


class FineTuneJob(ApiModel):
    """FineTuneJob fine-tunes every parameter of an open LLM on a KubeRay RayJob and keeps the best checkpoint."""

    model_config = ApiModel.model_config | {"extra": "ignore"}

    api_version: str = Field(default=API_VERSION, description="API version.")
    kind: Literal["FineTuneJob"] = Field(default="FineTuneJob", description="Kind.")
    metadata: ObjectMeta = Field(description="Standard object metadata.")
    spec: FineTuneJobSpec = Field(description="Desired state.")
    status: FineTuneJobStatus = Field(default_factory=FineTuneJobStatus, description="Observed state.")

    @classmethod
    def from_body(cls, body: Any) -> FineTuneJob:
        """Parse a kopf body (or any mapping) once.

        Raises pydantic.ValidationError when metadata or spec is invalid. A status that does not parse
        (written by an older version, say) is treated as empty rather than making the job invalid.
        """
        job: FineTuneJob = cls.from_wire(
            {
                "apiVersion": body.get("apiVersion", API_VERSION),
                "kind": KIND,
                "metadata": dict(body.get("metadata") or {}),
                "spec": dict(body.get("spec") or {}),
            }
        )
        try:
            job.status = FineTuneJobStatus.from_wire(dict(body.get("status") or {}))
        except ValueError:
            job.status = FineTuneJobStatus()
        return job
