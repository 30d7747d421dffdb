"""EvalJob (kubetune.io/v1alpha1): serve candidate models and score them on a task.

Minimal for now, so that both CRDs ship together; the evaluation issue fills in serving, scorers,
baselines, gates and reports.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from kubetune import API_VERSION
from kubetune.api.common import ApiModel, Condition, LocalObjectReference
from kubetune.api.finetunejob import DataSource, ObjectMeta

KIND = "EvalJob"
PLURAL = "evaljobs"


class CandidateModel(ApiModel):
    """The model a candidate answers with: exactly one of fineTuneJobRef, uri, name."""

    model_config = ApiModel.model_config | {
        "json_schema_extra": {
            "x-kubernetes-validations": [
                {
                    "rule": "(has(self.fineTuneJobRef) ? 1 : 0) + (has(self.uri) ? 1 : 0) + "
                    "(has(self.name) ? 1 : 0) == 1",
                    "message": "candidate model: set exactly one of fineTuneJobRef, uri, name",
                }
            ]
        }
    }

    fine_tune_job_ref: LocalObjectReference | None = Field(
        default=None, description="A FineTuneJob in this namespace: its best checkpoint is served."
    )
    uri: str | None = Field(default=None, description="A model directory (s3://, pvc://, local path).",
                            min_length=1, max_length=2048)
    name: str | None = Field(default=None, description="A Hugging Face model id.", min_length=1,
                             max_length=256)

    @model_validator(mode="after")
    def _exactly_one(self) -> CandidateModel:
        given = [n for n in ("fine_tune_job_ref", "uri", "name") if getattr(self, n) is not None]
        if len(given) != 1:
            raise ValueError("set exactly one of fineTuneJobRef, uri, name")
        return self


class Candidate(ApiModel):
    """One model under evaluation."""

    name: str = Field(description="Candidate name, unique in the EvalJob.", min_length=1, max_length=63)
    model: CandidateModel = Field(description="The model to evaluate.")


class ScorerSpec(ApiModel):
    """How predictions are scored."""

    name: Literal["viggo", "sqlExecution", "gsm8k", "exactMatch", "chrf", "bleu"] = Field(
        description="Scorer: viggo, sqlExecution, gsm8k, exactMatch, chrf or bleu."
    )


class EvalJobSpec(ApiModel):
    """Desired state of an EvalJob."""

    candidates: list[Candidate] = Field(
        description="Models to compare.", min_length=1, max_length=32,
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["name"]},
    )
    dataset: DataSource = Field(description="Evaluation data.")
    scorer: ScorerSpec = Field(description="Task scorer.")

    @model_validator(mode="after")
    def _unique_names(self) -> EvalJobSpec:
        names = [c.name for c in self.candidates]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"duplicate candidate names: {', '.join(dupes)}")
        return self


class EvalJobStatus(ApiModel):
    """Observed state of an EvalJob."""

    observed_generation: int | None = Field(default=None, description="Generation this status describes.")
    phase: str | None = Field(default=None, description="One-word summary of the conditions.", max_length=32)
    conditions: list[Condition] = Field(default_factory=list, description="Ready, Succeeded, Failed, ...",
                                        max_length=32)


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
        """Parse a kopf body (or any mapping) once; raises pydantic.ValidationError on a bad spec."""
        job: EvalJob = cls.from_wire({"metadata": dict(body.get("metadata") or {}),
                                      "spec": dict(body.get("spec") or {})})
        return job
