"""`python -m kubetune.serving.evaluate --plan plan.json`: run an evaluation plan and report it.

A recipe, top to bottom:
1. read the dataset rows (split, limit) and check every row renders for every candidate (errors name the
   file and row before any request is sent);
2. build each candidate's prompts: instruction, few-shot examples (the same k for every row), question;
3. send every candidate its prompts at once (`concurrency` requests in flight per candidate, all
   candidates concurrently) through the OpenAI-compatible API;
4. score the completions with the task scorer; aggregate latency and tokens per request; judge the gate;
5. write results.json, report.html and the plots to `output.uri`, and put the per-candidate metrics and
   the gate verdict into the EvalJob's status (in a cluster) or print the table (locally).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import os
import random
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kubetune.api.common import now_rfc3339
from kubetune.api.evaljob import CandidateResult, EvalProgress, GateResult, Latency, ReportLocation
from kubetune.api.evaluation import CandidatePrompt, EvalDataset
from kubetune.contract.evalplan import EvalPlan, PlannedCandidate, judge_gate
from kubetune.contract.templates import MissingFields, fill_template
from kubetune.serving import scorers
from kubetune.serving.client import Completion, complete_all
from kubetune.serving.results import CandidateSummary, EvalJobName, EvalResults, ExampleRecord, Prediction

log = logging.getLogger("kubetune.evaluate")

WORST_EXAMPLES = 20


class PlanError(ValueError):
    """The plan cannot run as given (bad data, a template field a row lacks); the message names where."""


# -- 1. rows ---------------------------------------------------------------------------------------


def read_dataset(ds: EvalDataset, cache_dir: Path) -> list[dict[str, str]]:
    """The evaluated rows, as {field: value}, after `split` and `limit`."""
    from kubetune.contract.storage import resolve_uri
    from kubetune.trainer.data import DataError, read_rows

    try:
        rows = read_rows(resolve_uri(ds.uri, cache_dir), ds.format, ds.columns)
    except DataError as exc:
        raise PlanError(f"spec.dataset ({ds.uri}): {exc}") from None
    if ds.format == "chat":
        raise PlanError("spec.dataset.format: chat files cannot be evaluated yet (use jsonl or csv)")
    selected = [r.fields | {"_row": str(r.number), "_source": r.source} for r in rows]
    selected = apply_split(selected, ds.split)
    if ds.limit is not None:
        selected = selected[: ds.limit]
    if not selected:
        raise PlanError(f"spec.dataset: no rows left after split {ds.split!r}")
    return selected


def apply_split(rows: list[Any], split: str | None) -> list[Any]:
    """HF-datasets-style slice: '[:500]', '[80%:]', '[-200:]', '[100:300]'."""
    if not split:
        return rows
    inner = split.strip()[1:-1]
    start_s, _, stop_s = inner.partition(":")

    def bound(text: str) -> int | None:
        if not text:
            return None
        if text.endswith("%"):
            return int(len(rows) * int(text[:-1]) / 100)
        return int(text)

    return rows[bound(start_s): bound(stop_s)]


def fill(fmt: str, row: dict[str, str], what: str) -> str:
    """`fmt` with the row's fields, filled as the trainer fills its templates (`{0}` is the field "0");
    a missing field is a PlanError naming the file, row, field and template, never the row's values."""
    try:
        return fill_template(fmt, row)
    except MissingFields as exc:
        s = "s" if len(exc.missing) > 1 else ""
        raise PlanError(f"{row.get('_source', 'dataset')} row {row.get('_row', '?')}: missing field{s} {exc.names} "
                        f"used by {what}") from None


# -- 2. prompts ------------------------------------------------------------------------------------


def few_shot_examples(prompt: CandidatePrompt, reference: str, stop: Sequence[str], cache_dir: Path,
                      where: str) -> list[str]:
    """The k worked examples every row of this candidate is prefixed with (one seeded draw)."""
    few = prompt.few_shot
    if few is None or few.k == 0:
        return []
    assert few.source is not None
    from kubetune.contract.storage import resolve_uri
    from kubetune.trainer.data import DataError, read_rows

    try:
        source = [r.fields | {"_row": str(r.number), "_source": r.source}
                  for r in read_rows(resolve_uri(few.source.uri, cache_dir), few.source.format, few.source.columns)]
    except DataError as exc:
        raise PlanError(f"{where}.fewShot.source ({few.source.uri}): {exc}") from None
    picked = random.Random(few.seed).sample(source, min(few.k, len(source)))
    answer = prompt.answer if prompt.answer is not None else reference
    # The stop sequence ends each worked answer, so the model learns where to stop ("\n" for most baselines).
    end = stop[0] if stop and stop[0] != "\n" and not prompt.chat else ""
    return [fill(prompt.template, row, f"{where}.template") + fill(answer, row, f"{where}.answer") + end
            for row in picked]


def render_prompts(prompt: CandidatePrompt, examples: list[str], rows: Sequence[dict[str, str]],
                   where: str) -> list[str]:
    sep = prompt.few_shot.separator if prompt.few_shot else "\n\n"
    head = sep.join(([prompt.instruction.rstrip("\n")] if prompt.instruction else []) + examples)
    return [(head + sep if head else "") + fill(prompt.template, row, f"{where}.template") for row in rows]


# -- 3. + 4. ask and score -------------------------------------------------------------------------


@dataclass
class CandidateRun:
    """One candidate's prompts, answers and scores."""

    candidate: PlannedCandidate
    prompts: list[str]
    completions: list[Completion] = field(default_factory=list)
    scored: scorers.Scored | None = None
    seconds: float = 0.0
    scoring_error: str | None = None

    def result(self) -> CandidateResult:
        ok = [c for c in self.completions if c.error is None]
        lat = sorted(c.latency_s for c in ok)
        return CandidateResult(
            name=self.candidate.name,
            model=self.candidate.model_uri or self.candidate.model,
            endpoint=self.candidate.base_url,
            service=self.candidate.service,
            metrics=dict(self.scored.metrics) if self.scored else {},
            examples=self.scored.kept if self.scored else 0,
            dropped=self.scored.dropped if self.scored else 0,
            errors=len(self.completions) - len(ok),
            latency=Latency(mean_seconds=round(sum(lat) / len(lat), 4), p95_seconds=round(percentile(lat, 95), 4))
            if lat else None,
            prompt_tokens_per_request=round(sum(c.prompt_tokens for c in ok) / len(ok), 2) if ok else None,
            completion_tokens_per_request=round(sum(c.completion_tokens for c in ok) / len(ok), 2) if ok else None,
        )

    def summary(self) -> CandidateSummary:
        """`result()` plus what only results.json carries: the first prompt, notes, provenance, time."""
        return CandidateSummary(
            **dict(self.result()), prompt=self.prompts[0] if self.prompts else "",
            notes=self.scored.notes if self.scored else [self.scoring_error or "not scored"],
            failures=self.scored.failures if self.scored else {}, fine_tune_job=self.candidate.fine_tune_job,
            served=self.candidate.served, seconds=round(self.seconds, 2))


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of already sorted values."""
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(q / 100 * len(sorted_values)))
    return sorted_values[rank - 1]


async def ask_all(runs: list[CandidateRun], concurrency: int, on_done: Callable[[str], None]) -> None:
    """Every candidate at once; each keeps `concurrency` requests in flight."""

    async def one(run: CandidateRun) -> None:
        c = run.candidate
        api_key = os.environ.get(c.api_key_env) if c.api_key_env else None
        started = time.perf_counter()
        run.completions = await complete_all(
            c.base_url, c.model, run.prompts, max_tokens=c.generation.max_tokens,
            temperature=c.generation.temperature, stop=c.generation.stop or None, concurrency=concurrency,
            api_key=api_key or "none", chat=c.prompt.chat, extra_body=extra_body(c))
        run.seconds = time.perf_counter() - started
        on_done(c.name)

    await asyncio.gather(*(one(r) for r in runs))


def check_api_keys(plan: EvalPlan) -> None:
    """Every endpoint with an apiKeySecretRef got its key (the pod's secretKeyRef is optional, so a
    missing Secret or key arrives here as an empty variable): checked before any request is sent."""
    for i, c in enumerate(plan.candidates):
        ref = c.api_key_secret_ref
        if c.api_key_env and ref is not None and not os.environ.get(c.api_key_env):
            raise PlanError(f'spec.candidates[{i}].model.endpoint.apiKeySecretRef: no API key for candidate '
                            f'{c.name}: Secret "{ref.name}" or its key "{ref.key}" does not exist '
                            f"(${c.api_key_env} is empty)")


def extra_body(c: PlannedCandidate) -> dict[str, Any]:
    """Request fields beyond the client's own: sampling, and vLLM's special-token handling."""
    body: dict[str, Any] = {}
    if c.generation.top_p != 1.0:
        body["top_p"] = c.generation.top_p
    if c.generation.seed is not None:
        body["seed"] = c.generation.seed
    if c.special_tokens and c.served:
        # A stop sequence like <END_A> is a special token: vLLM only sees it in text it did not skip.
        body["skip_special_tokens"] = False
    return body


def score_run(run: CandidateRun, plan: EvalPlan, golds: list[str], rows: list[dict[str, str]]) -> None:
    predictions = [c.text if c.error is None else "" for c in run.completions]
    run.scored = scorers.score(plan.spec.scorer.name, predictions, golds, rows, plan.spec.scorer.options)


# -- 5. results ------------------------------------------------------------------------------------


def results_document(plan: EvalPlan, runs: list[CandidateRun], rows: list[dict[str, str]], golds: list[str],
                     gate: GateResult | None, seconds: float) -> EvalResults:
    """results.json: the summary the status shows, plus every example's prediction for every candidate."""
    primary = runs[0].scored.primary if runs and runs[0].scored else None
    examples = []
    for i, (row, gold) in enumerate(zip(rows, golds, strict=True)):
        predictions = {}
        for run in runs:
            comp = run.completions[i]
            per = run.scored.per_example[i] if run.scored else {}
            predictions[run.candidate.name] = Prediction(
                text=comp.text, error=comp.error, score=per.get("score"), dropped=per.get("dropped"),
                failure=per.get("failure"), latency_seconds=round(comp.latency_s, 4),
                prompt_tokens=comp.prompt_tokens, completion_tokens=comp.completion_tokens,
                details={k: v for k, v in per.items() if k not in ("score", "dropped", "failure")})
        examples.append(ExampleRecord(index=i, row=int(row.get("_row", i + 1)),
                                      input={k: v for k, v in row.items() if not k.startswith("_")},
                                      reference=gold, predictions=predictions))
    return EvalResults(
        eval_job=EvalJobName(name=plan.eval_job.name, namespace=plan.eval_job.namespace),
        created_at=now_rfc3339(),
        scorer=plan.spec.scorer.name,
        primary_metric=primary,
        seconds=round(seconds, 2),
        rows=len(rows),
        candidates=[run.summary() for run in runs],
        gate=gate,
        learning_curve=plan.learning_curve,
        base_val_perplexity=plan.base_val_perplexity,
        examples=examples,
    )


def publish(local_dir: Path, uri: str) -> tuple[str, str]:
    """Copy the outputs to `uri` (a local path, pvc:// or an object store); returns (report, results) URIs."""
    if "://" not in uri or uri.startswith(("file://", "pvc://")):
        from kubetune.contract.storage import resolve_uri

        target = resolve_uri(uri, local_dir)
        if target.resolve() != local_dir.resolve():
            target.mkdir(parents=True, exist_ok=True)
            for f in local_dir.iterdir():
                if f.is_file():
                    (target / f.name).write_bytes(f.read_bytes())
    else:
        import fsspec  # type: ignore[import-untyped]

        from kubetune.contract.storage import storage_options

        fs, root = fsspec.core.url_to_fs(uri, **storage_options(uri))
        for f in local_dir.iterdir():
            if f.is_file():
                fs.put_file(str(f), f"{root.rstrip('/')}/{f.name}")
    base = uri.rstrip("/")
    return f"{base}/report.html", f"{base}/results.json"


@dataclass
class Outcome:
    """What `run` produced."""

    results: EvalResults
    gate: GateResult | None
    report: str
    results_uri: str
    local_dir: Path


def run(plan: EvalPlan, work_dir: Path, reporter: Any = None, cache_dir: Path | None = None) -> Outcome:
    """The whole evaluation; `reporter` (a progress.StatusReporter) gets progress and results."""
    cache = cache_dir or Path(os.environ.get("KUBETUNE_CACHE_DIR", Path.home() / ".cache" / "kubetune"))
    spec = plan.spec
    try:
        scorers.check_options(spec.scorer.name, spec.scorer.options)
    except ValueError as exc:
        raise PlanError(f"spec.scorer.options: {exc}") from None
    check_api_keys(plan)
    rows = read_dataset(spec.dataset, cache)
    golds = [fill(spec.dataset.reference, r, "spec.dataset.reference") for r in rows]
    runs = []
    for i, c in enumerate(plan.candidates):
        where = f"spec.candidates[{i}].prompt"
        examples = few_shot_examples(c.prompt, spec.dataset.reference, c.generation.stop, cache, where)
        runs.append(CandidateRun(c, render_prompts(c.prompt, examples, rows, where)))
    total = len(rows) * len(runs)
    print(f"evaluating {len(runs)} candidate(s) on {len(rows)} rows ({spec.scorer.name}), "
          f"{spec.concurrency} requests in flight per candidate", flush=True)
    done: list[str] = []

    def on_done(name: str) -> None:
        done.append(name)
        print(f"  {name}: {len(rows)} answers", flush=True)
        if reporter is not None:
            n = len(done) * len(rows)
            reporter.patch({"progress": EvalProgress(done=n, total=total, summary=f"{n}/{total}",
                                                     update_time=now_rfc3339()).to_wire()})

    started = time.perf_counter()
    asyncio.run(ask_all(runs, spec.concurrency, on_done))
    for r in runs:
        try:
            score_run(r, plan, golds, rows)
        except Exception as exc:  # noqa: BLE001 - a scorer's bug must not lose every candidate's results
            # Scorers score a bad prediction 0 rather than raise: this is a bug. Only the exception's type
            # is kept (its message may quote the data).
            log.error("scoring candidate %s failed: %s", r.candidate.name, type(exc).__name__)
            r.scoring_error = f"scoring failed ({type(exc).__name__}): no metrics"
    gate = judge_gate(spec, {r.candidate.name: r.scored.metrics for r in runs if r.scored})
    results = results_document(plan, runs, rows, golds, gate, time.perf_counter() - started)

    work_dir.mkdir(parents=True, exist_ok=True)
    (work_dir / "results.json").write_text(results.to_json())
    from kubetune.serving.report import write_report

    write_report(results, work_dir)
    report_uri, results_uri = publish(work_dir, spec.output.uri)
    from kubetune.serving.tracking import log_evaluation

    log_evaluation(plan, [r.result() for r in runs], gate, report_uri, work_dir / ".tracking")  # spec.tracking
    if reporter is not None:
        reporter.patch({
            "candidates": [r.result().to_wire() for r in runs],
            "gate": gate.to_wire() if gate else None,
            "report": ReportLocation(uri=report_uri, results_uri=results_uri).to_wire(),
            "progress": EvalProgress(done=total, total=total, summary=f"{total}/{total}",
                                     update_time=now_rfc3339()).to_wire(),
        })
    return Outcome(results, gate, report_uri, results_uri, work_dir)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kubetune.serving.evaluate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--plan", type=Path, default=Path(os.environ.get("KUBETUNE_PLAN", "/etc/kubetune/plan.json")))
    parser.add_argument("--work-dir", type=Path, help="where outputs are staged (default: a temporary folder)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from kubetune.contract.progress import StatusReporter
    from kubetune.serving.report import format_table

    plan = EvalPlan.from_wire(json.loads(args.plan.read_text()))
    reporter = StatusReporter.from_environment(plural="evaljobs")
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="kubetune-eval-"))
    try:
        outcome = run(plan, work, reporter)
    except PlanError as exc:
        print(f"error: {exc}", file=sys.stderr)
        if reporter is not None:  # the operator puts it into the Failed condition's message
            reporter.patch({"evaluationError": str(exc)[:4096],
                            "progress": {"summary": "failed", "updateTime": now_rfc3339()}})
        return 2
    print(format_table(outcome.results))
    print(f"report: {outcome.report}")
    # The gate's verdict is the operator's to record (Failed/GateFailed); the evaluation itself succeeded.
    return 0


if __name__ == "__main__":
    sys.exit(main())
