"""What an evaluation produced: results.json as typed models.

`EvalResults` is the whole document (`evaluate.results_document` builds it, `report` reads it); on the
wire it is camelCase JSON (`to_json` / `EvalResults.from_wire`), with the keys results.json always had.
The per-candidate summary extends the status's `CandidateResult`, so what the EvalJob's status shows and
what results.json holds cannot drift apart.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from pydantic import Field

from kubetune.api.common import ApiModel
from kubetune.api.evaljob import CandidateResult, GateResult
from kubetune.api.finetunejob import EpochResult


class EvalJobName(ApiModel):
    """The EvalJob the results belong to."""

    name: str = Field(description="EvalJob name.")
    namespace: str | None = Field(default=None, description="EvalJob namespace.")


class Prediction(ApiModel):
    """One candidate's answer to one row, and how it scored."""

    text: str = Field(description="The completion (empty when the request failed).")
    error: str | None = Field(default=None, description="Why the request failed (scored as wrong).")
    score: float | None = Field(default=None, description="The row's primary metric (0..1).")
    dropped: str | None = Field(default=None, description="Why the scorer excluded the row, if it did.")
    failure: str | None = Field(default=None, description="Why the prediction could not be scored, if it "
                                "could not (it then scores 0): timeout, memoryLimit, resultTooLarge, ...")
    latency_seconds: float | None = Field(default=None, description="Seconds the request took.")
    prompt_tokens: int | None = Field(default=None, description="Prompt tokens the server counted.")
    completion_tokens: int | None = Field(default=None, description="Tokens generated.")
    details: dict[str, Any] = Field(default_factory=dict,
                                    description="The scorer's per-row fields (parsed prediction, ...).")


class ExampleRecord(ApiModel):
    """One evaluated row with every candidate's prediction."""

    index: int = Field(description="Position among the evaluated rows (0-based).", ge=0)
    row: int = Field(description="Row number in the dataset file (1-based).")
    input: dict[str, str] = Field(description="The row's fields.")
    reference: str = Field(description="The expected answer.")
    predictions: dict[str, Prediction] = Field(default_factory=dict, description="Per candidate name.")


class CandidateSummary(CandidateResult):
    """A candidate's status entry plus what only results.json carries."""

    prompt: str = Field(default="", description="The prompt of the first row (what the candidate was asked).")
    notes: list[str] = Field(default_factory=list, description="The scorer's notes (dropped rows, ...).")
    failures: dict[str, int] = Field(default_factory=dict, description="Predictions that could not be scored "
                                     "(each scored 0), by reason.")
    fine_tune_job: str | None = Field(default=None, description="The FineTuneJob the model came from.")
    served: bool | None = Field(default=None, description="Whether kubetune served the model (else an "
                                "external endpoint).")
    seconds: float | None = Field(default=None, description="Seconds to get all its answers.")


class EvalResults(ApiModel):
    """results.json: the summary the status shows, plus every row's prediction for every candidate."""

    eval_job: EvalJobName = Field(description="The EvalJob.")
    created_at: str | None = Field(default=None, description="When the results were written (RFC 3339).")
    scorer: str = Field(description="The task scorer.")
    primary_metric: str | None = Field(default=None, description="The headline metric.")
    seconds: float = Field(description="Seconds the evaluation took (requests and scoring).")
    rows: int = Field(description="Rows evaluated.", ge=0)
    candidates: list[CandidateSummary] = Field(description="Per candidate, in spec order.")
    gate: GateResult | None = Field(default=None, description="The gate's verdict, if there is a gate.")
    learning_curve: list[EpochResult] = Field(default_factory=list,
                                              description="The fine-tuning run's epochs, if any.")
    base_val_perplexity: float | None = Field(default=None, description="That run's base-model perplexity.")
    examples: list[ExampleRecord] = Field(default_factory=list, description="Every row, in order.")

    @classmethod
    def of(cls, results: EvalResults | Mapping[str, Any]) -> EvalResults:
        """`results` as the model: as it is, or parsed from its wire form (a loaded results.json)."""
        if isinstance(results, EvalResults):
            return results
        parsed: EvalResults = cls.from_wire(results)
        return parsed

    def to_json(self) -> str:
        """results.json's text: camelCase, every key present (null where unset)."""
        return json.dumps(self.model_dump(by_alias=True, mode="json"), indent=1)

    def candidate(self, name: str) -> CandidateSummary:
        """The candidate called `name` (KeyError if none is)."""
        for c in self.candidates:
            if c.name == name:
                return c
        raise KeyError(name)
