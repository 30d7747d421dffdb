"""An evaluation's scores in the experiment-tracking run (`spec.tracking` of the EvalJob).

The plan names the run (`EvalPlan.tracking`): for an EvalJob that evaluates a FineTuneJob (the one
`spec.evaluation` creates, or any with a fineTuneJobRef candidate), the training's own run, found again by
the FineTuneJob's uid; otherwise a run of the EvalJob. Logged: `eval/<candidate>/<metric>` for every
score, rows, errors, the gate's verdict, and the report's URI as a tag. Best effort, like training.
"""

from __future__ import annotations

from pathlib import Path

from kubetune.api.evaljob import CandidateResult, GateResult
from kubetune.contract.evalplan import EvalPlan
from kubetune.trainer.tracking import Tracker, Warn, status_warning


def evaluation_metrics(results: list[CandidateResult], gate: GateResult | None) -> dict[str, float]:
    """The scores per candidate, as metric names: `eval/<candidate>/<metric>`."""
    metrics: dict[str, float] = {}
    for r in results:
        metrics |= {f"eval/{r.name}/{name}": value for name, value in r.metrics.items()}
        if r.examples is not None:
            metrics[f"eval/{r.name}/examples"] = r.examples
        if r.errors is not None:
            metrics[f"eval/{r.name}/errors"] = r.errors
    if gate is not None:
        metrics["eval/gate_passed"] = 1.0 if gate.passed else 0.0
    return metrics


def log_evaluation(plan: EvalPlan, results: list[CandidateResult], gate: GateResult | None, report_uri: str,
                   work_dir: Path, warn: Warn | None = None) -> Tracker | None:
    """Log the evaluation to its run; None when the EvalJob tracks nothing. Never raises."""
    if plan.tracking is None:
        return None
    tracker = Tracker.open(plan.tracking, work_dir, files_uri=plan.spec.output.uri, attach=True,
                           warn=warn if warn is not None else status_warning("evaljobs"))
    tags = {"kubetune.eval.job": f"{plan.eval_job.namespace}/{plan.eval_job.name}",
            "kubetune.eval.scorer": plan.spec.scorer.name, "kubetune.eval.report": report_uri}
    if gate is not None:
        tags["kubetune.eval.gate"] = gate.message[:500]
    tracker.log_summary(evaluation_metrics(results, gate), tags)
    tracker.finish()
    return tracker
